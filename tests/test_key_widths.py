"""Per-channel key code widths (benchmarks/key_widths.py): the allocation and the codec that its table measures."""

import importlib.util
import itertools
from pathlib import Path

import pytest
import torch

from calib_helpers import random_calibration
from kvquant_vllm.quant.kvquant import CalibrationSpec, KVQuantCodec, KVQuantOptions
from test_kvquant import D, H, _reference_keys

_SPEC = importlib.util.spec_from_file_location("key_widths", Path(__file__).parents[1] / "benchmarks" / "key_widths.py")
key_widths = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(key_widths)
MAX_WIDTH = key_widths.MAX_WIDTH


def test_allocation_is_the_exhaustive_optimum(rng):
    """With errors that fall by a constant factor per bit (as a channel's rounding error does), the greedy widths
    are the cheapest of all widths in 1..MAX_WIDTH that sum to the head's budget."""
    heads, channels, mean_bits = 2, 4, 3
    magnitude = 10 ** (4 * torch.rand(heads, channels, generator=rng, dtype=torch.float64))
    costs = magnitude[..., None] * 4.0 ** -torch.arange(1, MAX_WIDTH + 1, dtype=torch.float64)
    widths = key_widths.allocate_widths(costs, mean_bits)
    assert widths.sum(-1).tolist() == [mean_bits * channels] * heads
    for h in range(heads):
        candidates = (w for w in itertools.product(range(1, MAX_WIDTH + 1), repeat=channels)
                      if sum(w) == mean_bits * channels)
        best = min(candidates, key=lambda w: sum(float(costs[h, c, b - 1]) for c, b in enumerate(w)))
        assert widths[h].tolist() == list(best)


def test_codec_codes_each_key_channel_in_its_own_width(rng):
    """Keys decode to the nearest entry of their channel's book of its width (float64 reference), outliers and
    sink exact; values and bits per element are kvquant's."""
    spec = CalibrationSpec(3)
    cal = random_calibration(spec, rng, H, D)
    layer = cal.layers[0]
    widths = torch.randint(1, MAX_WIDTH + 1, (H, D), generator=rng)
    widths[0, 0] = 1
    books = torch.empty(H, D, 1 << MAX_WIDTH)
    for h, c in itertools.product(range(H), range(D)):
        book = (torch.rand(1 << int(widths[h, c]), generator=rng) * 2 - 1).sort().values
        books[h, c] = torch.cat([book, book[-1:].expand((1 << MAX_WIDTH) - len(book))])
    options = KVQuantOptions(spec, block_size=None)
    codec = key_widths.KeyWidthsCodec("widths", options, cal, [books])
    plain = KVQuantCodec("kvquant3", options, cal)
    x = torch.randn(33, H, D, generator=rng) * layer.key_scale * 1.2 + layer.key_offset
    got = codec.fake_quant(x, "key", 0).double()
    assert (got - _reference_keys(x, layer, books, books)).abs().max() < 1e-5
    # Channel 0 of head 0 has 1 bit: its inliers take two values.
    inliers = ((x[1:, 0, 0] - layer.key_offset[0, 0]) / layer.key_scale[0, 0]).abs() <= 1
    assert got[1:, 0, 0][inliers].unique().numel() <= 2
    v = torch.randn(33, H, D, generator=rng)
    assert torch.equal(codec.fake_quant(v, "value", 0), plain.fake_quant(v, "value", 0))
    assert codec.bits_per_element(D, 64) == plain.bits_per_element(D, 64)


def test_width_groups_are_the_exhaustive_optimum(rng):
    """RoPE pairs in fixed width groups: each pair's two channels share a width, every head has the asked number
    of pairs per width, and the assignment is the cheapest of all such (three widths, so cycles of three pairs
    must be found, not only swaps)."""
    heads, pairs = 200, 6
    groups = {4: 2, 3: 2, 1: 2}
    costs = torch.rand(heads, 2 * pairs, MAX_WIDTH, generator=rng, dtype=torch.float64)
    widths = key_widths.allocate_width_groups(costs, groups)
    assert torch.equal(widths[:, :pairs], widths[:, pairs:])
    slots = [w for w, n in groups.items() for _ in range(n)]
    assert all(sorted(w) == sorted(slots) for w in widths[:, :pairs].tolist())
    pair_costs = costs[:, :pairs] + costs[:, pairs:]  # [heads, pairs, MAX_WIDTH]
    assignments = torch.tensor(sorted(set(itertools.permutations(slots)))) - 1  # [90, pairs]
    every = pair_costs[:, torch.arange(pairs), assignments].sum(-1)  # [heads, 90]
    got = pair_costs.gather(-1, widths[:, :pairs, None] - 1).sum((1, 2))
    torch.testing.assert_close(got, every.min(-1).values, rtol=1e-12, atol=0)


def test_width_groups_must_hold_every_pair():
    with pytest.raises(ValueError, match=r"hold 5 pairs, not 6"):
        key_widths.allocate_width_groups(torch.zeros(1, 12, MAX_WIDTH), {4: 2, 2: 3})
