"""The other published methods (CQ, SKVQ, WKVQuant, KIVI) and the order-aware harness."""

import math

import pytest
import torch

from kvquant_vllm.calib.collect import LayerActivations, collect_activations
from kvquant_vllm.calib.file import read_calibration, write_calibration
from kvquant_vllm.calib.methods import CLIP_RATIOS, calibrate_cq_layer, weighted_kmeans
from kvquant_vllm.calib.run import calibrate_layers
from kvquant_vllm.eval.fakequant import fake_quantized
from kvquant_vllm.quant.codec import KVCodec, Unquantized
from kvquant_vllm.quant.cq import CQCodec, CQSpec, nearest_centroid
from kvquant_vllm.quant.geometry import AttentionGeometry, attention_geometry
from kvquant_vllm.quant.intn import IntTokenCodec
from kvquant_vllm.quant.kivi import KIVICodec
from kvquant_vllm.quant.kvquant import KVQuantCalibration
from kvquant_vllm.quant.registry import MissingCalibrationError, get_codec, method_names
from kvquant_vllm.quant.rope import apply_rope, sequence_cos_sin
from kvquant_vllm.quant.skvq import SKVQCodec, SKVQSpec
from kvquant_vllm.quant.wkvquant import WKVQuantCodec, WKVQuantSpec

GEO = AttentionGeometry(num_layers=1, num_kv_heads=2, head_dim=16, rope_theta=10000.0, rope_type="default")


class Masked(KVCodec):
    """int4-token numerics with chosen full-precision masks, to test the order-aware harness."""

    name = "masked"

    def __init__(self, exact: bool):
        self.inner, self.exact = IntTokenCodec(4), exact

    def encode(self, x, kind, layer):
        return self.inner.encode(x, kind, layer)

    def decode(self, packed):
        return self.inner.decode(packed)

    def bits_per_element(self, head_dim, seq_len):
        return 4.0

    def full_precision_masks(self, seq_len):
        m = torch.full((seq_len, seq_len), self.exact)
        return m, m.clone()


def _logits(model, ids, codec):
    with torch.no_grad(), fake_quantized(model, codec):
        return model(ids).logits.float()


@pytest.fixture(scope="module")
def ids(tiny_model):
    return torch.randint(0, tiny_model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))


# ------------------------------------------------------------------ order-aware harness
def test_order_aware_all_quantized_equals_plain_fake_quant(tiny_model, ids):
    torch.testing.assert_close(_logits(tiny_model, ids, Masked(False)), _logits(tiny_model, ids, IntTokenCodec(4)),
                               rtol=1e-4, atol=1e-4)


def test_order_aware_all_exact_equals_unquantized(tiny_model, ids):
    exact = _logits(tiny_model, ids, Masked(True))
    torch.testing.assert_close(exact, _logits(tiny_model, ids, Unquantized()), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(exact, _logits(tiny_model, ids, IntTokenCodec(4)), atol=1e-3)
    # The model is left as it was: plain SDPA again after the block.
    assert tiny_model.config._attn_implementation == "sdpa"


@pytest.fixture(scope="module")
def tiny_calibrations(tiny_model):
    geo = attention_geometry(tiny_model.config)
    windows = torch.randint(0, tiny_model.config.vocab_size, (3, 48), generator=torch.Generator().manual_seed(5))
    acts = collect_activations(tiny_model, windows, skip_tokens=1)
    specs = [CQSpec("cq2", channels=4, code_bits=6), SKVQSpec("skvq", 4, 3, group_size=16, window=6, sink_tokens=2),
             WKVQuantSpec("wkvquant-k4v4")]
    positions = torch.arange(1, windows.shape[1]).repeat(windows.shape[0])
    by_spec = calibrate_layers(acts, specs, geo, positions, num_workers=0)
    return {spec.family: KVQuantCalibration(spec, geo, layers) for spec, layers in by_spec.items()}


def test_wkvquant_past_only_uses_the_exact_current_token(tiny_model, ids, tiny_calibrations):
    codec = WKVQuantCodec(tiny_calibrations["wkvquant"].spec, tiny_calibrations["wkvquant"])
    quant, exact = _logits(tiny_model, ids, codec), _logits(tiny_model, ids, Unquantized())
    # Position 0 attends to itself only, which past-only quantization leaves exact.
    torch.testing.assert_close(quant[:, 0], exact[:, 0], rtol=1e-5, atol=1e-5)
    assert (quant[:, 1:] - exact[:, 1:]).abs().amax() > 1e-4
    key_exact, value_exact = codec.full_precision_masks(5)
    assert torch.equal(key_exact, torch.eye(5, dtype=torch.bool)) and torch.equal(value_exact, key_exact)


def test_skvq_window_and_sinks_stay_exact(tiny_model, ids, tiny_calibrations):
    cal = tiny_calibrations["skvq"]
    codec = SKVQCodec(cal.spec, cal)
    quant, exact = _logits(tiny_model, ids, codec), _logits(tiny_model, ids, Unquantized())
    w = cal.spec.window
    # Until a query has more than `window` tokens behind it, everything it sees is exact.
    torch.testing.assert_close(quant[:, :w], exact[:, :w], rtol=1e-5, atol=1e-5)
    assert (quant[:, w:] - exact[:, w:]).abs().amax() > 1e-4
    key_exact, _ = codec.full_precision_masks(12)
    for i in range(12):
        seen_exact = {j for j in range(i + 1) if key_exact[i, j]}
        assert seen_exact == set(range(max(0, i - w + 1), i + 1)) | set(range(min(cal.spec.sink_tokens, i + 1)))


def test_kivi_residual_masks():
    codec = KIVICodec(2, GEO, group=4, residual=8)
    key_exact, value_exact = codec.full_precision_masks(20)
    # Keys: flushed 8 at a time once the residual is full; query 17 sees 0..15 quantized, 16, 17 exact.
    assert key_exact[17, :18].tolist() == [False] * 16 + [True] * 2
    assert key_exact[7, :8].all()
    # Values: a sliding window of the 8 most recent tokens.
    assert value_exact[17, :18].tolist() == [False] * 10 + [True] * 8


def test_kivi_first_residual_is_exact_in_the_model(tiny_model, ids):
    codec = KIVICodec(2, attention_geometry(tiny_model.config), group=4, residual=8)
    quant, exact = _logits(tiny_model, ids, codec), _logits(tiny_model, ids, Unquantized())
    torch.testing.assert_close(quant[:, :8], exact[:, :8], rtol=1e-5, atol=1e-5)
    assert (quant[:, 8:] - exact[:, 8:]).abs().amax() > 1e-4


# ------------------------------------------------------------------ round trips
def _keys_values(rng, t=40):
    x = torch.randn(t, GEO.num_kv_heads, GEO.head_dim, generator=rng) * torch.logspace(-1, 0.7, GEO.head_dim)
    return x + torch.randn(GEO.head_dim, generator=rng)


def _post_rope(x):
    return apply_rope(x, *sequence_cos_sin(x.shape[0], GEO.head_dim, GEO.rope_theta))


@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_round_trip_within_half_a_step(bits, rng):
    codec = KIVICodec(bits, GEO, group=8, residual=16)
    x = _keys_values(rng, t=37)  # a last, partial key group
    levels = (1 << bits) - 1
    # Keys: per channel over groups of 8 tokens, after RoPE.
    k = _post_rope(x)
    err = (_post_rope(codec.fake_quant(x, "key", 0)) - k).abs()
    for start in range(0, 37, 8):
        g = k[start:start + 8]
        step = (g.amax(0) - g.amin(0)) / levels
        assert (err[start:start + 8] <= step / 2 * 1.01 + 1e-3).all()
    # Values: per token over groups of 8 channels.
    v = x.reshape(37, GEO.num_kv_heads, 2, 8)
    step = (v.amax(-1, keepdim=True) - v.amin(-1, keepdim=True)) / levels
    verr = (codec.fake_quant(x, "value", 0) - x).reshape(v.shape).abs()
    assert (verr <= step / 2 * 1.01 + 1e-3).all()
    assert float((verr / step).max()) > 0.3  # the bound is nearly reached: this really is b-bit


def test_skvq_round_trip_and_clip(rng, tiny_calibrations):
    cal = tiny_calibrations["skvq"]
    tables = cal.layers[0]
    order = tables.order("value")
    assert sorted(order.tolist()) == list(range(GEO.num_kv_heads * GEO.head_dim))  # a permutation
    assert any(abs(float(t) - c) < 1e-6 for c in CLIP_RATIOS for t in (tables.key_clip,))
    assert any(abs(float(t) - c) < 1e-6 for c in CLIP_RATIOS for t in (tables.value_clip,))
    x = _keys_values(rng)
    spec = SKVQSpec("skvq", 16, 16, group_size=16, window=4, sink_tokens=1)
    unclipped = KVQuantCalibration(spec, cal.geometry, [type(tables)(
        key_order=tables.key_order, key_clip=torch.ones(1), value_order=tables.value_order, value_clip=torch.ones(1))])
    codec = SKVQCodec(spec, unclipped)
    # Values per token, in groups of 16 reordered channels: within half a 16-level step of the group range.
    groups = x.reshape(x.shape[0], -1)[:, order].reshape(x.shape[0], -1, 16)
    step = (groups.amax(-1) - groups.amin(-1)) / 15
    err = (codec.fake_quant(x, "value", 0) - x).reshape(x.shape[0], -1)[:, order].reshape(groups.shape).abs()
    assert (err <= step[..., None] / 2 * 1.01 + 1e-3).all()
    # Three levels (the 1.5-bit values): each group decodes to at most 3 distinct values.
    ternary = SKVQCodec(cal.spec, cal).fake_quant(x, "value", 0).reshape(x.shape[0], -1)[:, order]
    assert all(len(torch.unique(g)) <= 3 for g in ternary.reshape(-1, 16))


def test_wkvquant_round_trip_in_smoothed_space(rng, tiny_calibrations):
    cal = tiny_calibrations["wkvquant"]
    codec = WKVQuantCodec(cal.spec, cal)
    x = _keys_values(rng)
    shift, smooth = cal.layers[0].smoothing("value")
    assert (smooth > 0).all()
    xs = (x - shift) / smooth
    step = (xs.amax(-1, keepdim=True) - xs.amin(-1, keepdim=True)) / 15
    err = ((codec.fake_quant(x, "value", 0) - shift) / smooth - xs).abs()
    assert (err <= step / 2 * 1.01 + 1e-3).all()
    k = _post_rope(x)
    kshift, ksmooth = cal.layers[0].smoothing("key")
    ks = (k - kshift) / ksmooth
    kerr = ((_post_rope(codec.fake_quant(x, "key", 0)) - kshift) / ksmooth - ks).abs()
    kstep = (ks.amax(-1, keepdim=True) - ks.amin(-1, keepdim=True)) / 15
    assert (kerr <= kstep / 2 * 1.01 + 1e-3).all()


def test_cq_codes_the_nearest_centroid(rng, tiny_calibrations):
    cal = tiny_calibrations["cq"]
    codec = CQCodec(cal.spec, cal)
    x = _keys_values(rng)
    y = codec.fake_quant(x, "key", 0)
    centroids = cal.layers[0].key_centroids.reshape(-1, 64, 4)  # [H * D / 4, K, 4]
    groups, decoded = x.reshape(x.shape[0], -1, 4), y.reshape(x.shape[0], -1, 4)
    best = torch.cdist(groups.transpose(0, 1), centroids).amin(-1).transpose(0, 1)  # brute force
    torch.testing.assert_close((decoded - groups).norm(dim=-1), best, rtol=1e-4, atol=1e-5)
    # Centroids themselves decode exactly.
    exact = centroids[:, :5].transpose(0, 1).reshape(5, GEO.num_kv_heads, GEO.head_dim)
    torch.testing.assert_close(codec.fake_quant(exact, "key", 0), exact)
    assert torch.equal(nearest_centroid(groups, centroids), nearest_centroid(groups, centroids, chunk=7))


def test_cq_joint_codebook_beats_independent_channels():
    """Two strongly correlated channels at 1 bit each: 4 joint centroids vs 2 x 2 independent levels."""
    g = torch.Generator().manual_seed(0)
    n = 4000
    base = torch.randn(n, generator=g)
    x = torch.stack([base, base + 0.1 * torch.randn(n, generator=g)], -1)  # [N, 2]
    x = x.reshape(n, 1, 2)
    geo = AttentionGeometry(1, 1, 2, 10000.0, "default")
    act = LayerActivations(keys=x, key_grad=torch.ones_like(x), values=x, value_grad=torch.ones_like(x))
    positions = torch.arange(n)
    errors = {}
    for spec in (CQSpec("joint", channels=2, code_bits=2), CQSpec("independent", channels=1, code_bits=1)):
        codec = CQCodec(spec, KVQuantCalibration(spec, geo, [calibrate_cq_layer(act, spec, geo, positions)]))
        assert codec.bits_per_element(2, n) == 1.0
        errors[spec.method] = float((codec.fake_quant(x, "key", 0) - x).square().mean())
    assert errors["joint"] < 0.5 * errors["independent"], errors


def test_weighted_kmeans_follows_the_weights():
    x = torch.tensor([[0.0], [1.0], [10.0], [11.0]])
    heavy_right = weighted_kmeans(x, torch.tensor([1.0, 1.0, 1.0, 100.0]), k=1)
    assert abs(float(heavy_right) - (0 + 1 + 10 + 1100) / 103) < 1e-4
    two = weighted_kmeans(x, torch.ones(4), k=2).sort(0).values.flatten().tolist()
    assert two == pytest.approx([0.5, 10.5])


# ------------------------------------------------------------------ calibration files, registry, bits
def test_calibration_files_round_trip_every_family(tmp_path, tiny_calibrations, tiny_model):
    geo = attention_geometry(tiny_model.config)
    for family, cal in tiny_calibrations.items():
        path = write_calibration(tmp_path / f"{family}.safetensors", cal)
        back = read_calibration(path, geo)
        assert back.spec == cal.spec and type(back.layers[0]) is type(cal.layers[0])
        for name in cal.layers[0].TENSORS:
            assert torch.equal(getattr(back.layers[1], name), getattr(cal.layers[1], name).float())


def test_registry_lists_every_method_and_names_the_calibrate_command(tiny_model):
    names = method_names()
    for m in ("cq1", "cq2", "skvq-k2v1.5", "skvq-k4v4", "wkvquant-k4v4", "kivi2", "kivi4"):
        assert m in names
    with pytest.raises(MissingCalibrationError, match="--method cq2"):
        get_codec("cq2", [])
    with pytest.raises(ValueError, match="geometry"):
        get_codec("kivi2")
    assert get_codec("kivi4", geometry=attention_geometry(tiny_model.config)).name == "kivi4"


def test_bits_per_element_count_side_data_and_windows(tiny_calibrations):
    geo = AttentionGeometry(30, 3, 64, 100000.0, "default")
    assert KIVICodec(2, geo).bits_per_element(64, 2048) == pytest.approx((1 - 128 / 2048) * 3 + 128 / 2048 * 16)
    skvq = SKVQSpec("skvq-k2v1.5", key_levels=4, value_levels=3)
    cal = KVQuantCalibration(skvq, geo, [])
    exact = (128 + 4) / 2048
    assert SKVQCodec(skvq, cal).bits_per_element(64, 2048) == pytest.approx((1 - exact) * (1.8 + 0.5) + exact * 16)
    wk = WKVQuantSpec("wkvquant-k4v4")
    assert WKVQuantCodec(wk, KVQuantCalibration(wk, geo, [])).bits_per_element(64, 2048) == 4.5
    cq = CQSpec("cq1", channels=8)
    assert CQCodec(cq, KVQuantCalibration(cq, geo, [])).bits_per_element(64, 2048) == 1.0
