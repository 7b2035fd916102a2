import pytest
import torch

from kvquant_vllm.quant.codebook import nearest_code, uniform_codebook
from kvquant_vllm.quant.geometry import AttentionGeometry
from kvquant_vllm.quant.kvquant import (
    CalibrationSpec,
    KVQuantCalibration,
    KVQuantCodec,
    KVQuantOptions,
    LayerCalibration,
    kvquant_methods,
    normalize_per_vector,
    outliers_per_vector,
    refit_per_vector,
    to_fixed,
    vector_outlier_mask,
)
from calib_helpers import random_calibration
from kvquant_vllm.quant.registry import MissingCalibrationError, get_codec
from kvquant_vllm.quant.rope import Rope, apply_rope, invert_rope
from kvquant_vllm.quant.rotation import value_rotation

H, D = 2, 16
GEO = AttentionGeometry(num_layers=1, num_kv_heads=H, head_dim=D, rope_theta=10000.0, rope_type="default")


def _calibration(spec: CalibrationSpec, rng) -> KVQuantCalibration:
    return random_calibration(spec, rng, H, D)


def _reference_keys(x, cal: LayerCalibration, book: torch.Tensor, dec_book: torch.Tensor,
                    block_size: int | None = None, capacity: int = 0) -> torch.Tensor:
    """float64 reference: per-channel normalise, argmin over the codebook (one [K] or one per channel [H, D, K]),
    outliers and sink exact; with a block size, only the first ``capacity`` outliers of each block and kv head
    (token, channel order) are exact."""
    x = x.double()
    xn = (x - cal.key_offset.double()) / cal.key_scale.double()
    out = xn.abs() > 1
    out[0] = False
    if block_size:
        for start in range(0, len(x), block_size):
            for head in range(x.shape[1]):
                block = out[start:start + block_size, head]  # a view: written through
                block[block.flatten().cumsum(0).view(block.shape) > capacity] = False
    codes = (xn.clamp(-1, 1)[..., None] - book.double()).abs().argmin(-1)
    entries = dec_book.double().expand(*codes.shape, dec_book.shape[-1]).gather(-1, codes[..., None])[..., 0]
    rec = entries * cal.key_scale.double() + cal.key_offset.double()
    rec = torch.where(out, x.half().double(), rec)
    rec[0] = x[0].half().double()
    return rec


def test_keys_match_float64_reference(rng):
    spec = CalibrationSpec(3)
    cal = _calibration(spec, rng)
    codec = KVQuantCodec("kvquant3", KVQuantOptions(spec, block_size=None), cal)
    layer = cal.layers[0]
    x = torch.randn(33, H, D, generator=rng) * layer.key_scale * 1.2 + layer.key_offset
    got = codec.decode(codec.encode(x, "key", 0)).double()
    ref = _reference_keys(x, layer, layer.key_codebook, layer.key_codebook)
    assert (got - ref).abs().max() < 1e-5
    # Outliers (|xn| > 1) are kept, and there are some in this data.
    assert codec.encode(x, "key", 0).outlier_index.numel() > 0


@pytest.mark.parametrize("block_size", [4, 8, 256])
def test_keys_keep_the_first_outliers_of_each_page(block_size, rng):
    """With pages of block_size tokens, each kv head of a page lists at most 1% of its key elements, first come
    first kept."""
    spec = CalibrationSpec(3)
    cal = _calibration(spec, rng)
    layer = cal.layers[0]
    codec = KVQuantCodec("kvquant3", KVQuantOptions(spec, block_size=block_size), cal)
    x = torch.randn(33, H, D, generator=rng) * layer.key_scale * 1.2 + layer.key_offset
    capacity = -(-block_size * D // 100)
    ref = _reference_keys(x, layer, layer.key_codebook, layer.key_codebook, block_size, capacity)
    assert (codec.decode(codec.encode(x, "key", 0)).double() - ref).abs().max() < 1e-5
    listed = codec.encode(x, "key", 0).outlier_index
    assert listed.numel() < (((x - layer.key_offset) / layer.key_scale).abs()[1:] > 1).sum()  # some overflowed
    lists = listed // (block_size * H * D) * H + listed // D % H  # (page, head)
    assert torch.bincount(lists).max() == capacity


def test_qnorm_changes_only_decoding(rng):
    spec = CalibrationSpec(2)
    cal = _calibration(spec, rng)
    layer = cal.layers[0]
    codec = KVQuantCodec("kvquant2", KVQuantOptions(spec, qnorm=True, block_size=None), cal)
    x = torch.randn(20, H, D, generator=rng) * layer.key_scale * 0.8 + layer.key_offset
    dec_book = layer.key_codebook * layer.key_qnorm[0] + layer.key_qnorm[1]
    ref = _reference_keys(x, layer, layer.key_codebook, dec_book)
    assert (codec.decode(codec.encode(x, "key", 0)).double() - ref).abs().max() < 1e-5


def test_values_per_token_with_topk_outliers(rng):
    spec = CalibrationSpec(3, value_rotation=False, value_outliers=True)
    # The range fit alone (its error bound below); test_value_refit_* cover the least-squares refit.
    codec = KVQuantCodec("kvquant3", KVQuantOptions(spec, sink_tokens=0, value_refits=0), _calibration(spec, rng))
    x = torch.randn(17, H, D, generator=rng)
    x[3, 1, 5] = 40.0  # one huge outlier per vector at most (k = 1 for D=16 at 1%)
    p = codec.encode(x, "value", 0)
    assert p.scale.shape == (17, H, 1)
    assert outliers_per_vector(0.01, D) == 1 and p.outlier_index.numel() == 17 * H  # values: no page limit
    rec = codec.decode(p)
    assert rec[3, 1, 5] == pytest.approx(40.0)
    # Inliers: uniform codebook over each vector's inlier range -> error at most half a step.
    mask = vector_outlier_mask(x, 1)
    inl = torch.where(mask, torch.nan, x)
    step = (inl.nan_to_num(-1e9).amax(-1) - inl.nan_to_num(1e9).amin(-1)) / 7
    err = (rec - x).abs().masked_fill(mask, 0).amax(-1)
    assert (err <= step / 2 * 1.01 + 2e-3).all()
    # The outlier did not stretch its vector's range: the rest of that vector stays accurate.
    assert float((rec[3, 1] - x[3, 1]).abs().max()) < 0.5


def test_to_fixed_truncates_and_clamps():
    x = torch.tensor([0.75, -0.75, 2.0**-21, -(2.0**-20), 5.0, -9.0, float("nan"), float("inf")])
    assert to_fixed(x, 4.0, 2.0**20).tolist() == [786432, -786432, 0, -1, 4 << 20, -4 << 20, 4 << 20, 4 << 20]


def _inlier_sse(x, outlier, codes, book, scale, offset):
    """float64 squared error of the inliers per vector: [...]."""
    error = x.double() - (book.double()[codes.long()] * scale.double() + offset.double())
    return torch.where(outlier, 0.0, error * error).sum(-1)


def _range_fit_case(rng):
    """Value vectors [400, 2, 64] of varied scale and mean, a non-uniform asymmetric book [8], and their range fit
    with one outlier per vector: (x, book, outlier, scale, offset, codes)."""
    x = torch.randn(400, 2, 64, generator=rng) * (0.2 + 3 * torch.rand(400, 2, 1, generator=rng)) \
        + torch.randn(400, 2, 1, generator=rng)
    book = torch.tensor([-1.0, -0.62, -0.33, -0.1, 0.08, 0.3, 0.58, 1.0])
    xn, outlier, scale, offset = normalize_per_vector(x, 1)
    return x, book, outlier, scale, offset, nearest_code(xn.clamp(-1, 1), book)


def test_value_refit_is_the_least_squares_line_of_the_codes(rng):
    """One round against a float64 reference: where a vector takes the refit, its fp16 scale and offset are the
    least-squares line of its inliers through the decode book at the range fit's codes (the scale within fp16
    rounding, the offset the best one for that scale), and its codes the nearest entries under them; no vector's
    inlier error grows, and the total falls."""
    x, book, outlier, scale, offset, codes = _range_fit_case(rng)
    new_codes, new_scale, new_offset = refit_per_vector(x, outlier, scale, offset, codes, book, rounds=1)

    inlier = (~outlier).double()
    b, xd = book.double()[codes.long()], x.double()
    n = inlier.sum(-1, keepdim=True)
    mean_b, mean_x = (b * inlier).sum(-1, keepdim=True) / n, (xd * inlier).sum(-1, keepdim=True) / n
    slope = ((b - mean_b) * (xd - mean_x) * inlier).sum(-1, keepdim=True) \
        / ((b - mean_b) ** 2 * inlier).sum(-1, keepdim=True)
    line_offset = mean_x - new_scale.double() * mean_b  # the best offset for the stored scale
    taken = ((new_scale != scale) | (new_offset != offset)).squeeze(-1)
    assert taken.float().mean() > 0.5
    step = 2.0 ** -10  # fp16's relative spacing
    assert ((new_scale.double() - slope).abs() <= step * slope.abs())[taken].all()
    assert ((new_offset.double() - line_offset).abs() <= step * line_offset.abs() + 1e-5 * scale.double())[taken].all()
    recoded = (((xd - new_offset.double()) / new_scale.double())[..., None] - book.double()).abs().argmin(-1)
    assert (recoded != new_codes.long())[taken].float().mean() < 1e-3
    before = _inlier_sse(x, outlier, codes, book, scale, offset)
    after = _inlier_sse(x, outlier, new_codes, book, new_scale, new_offset)
    assert (after <= before * (1 + 1e-5)).all()
    assert after.sum() < 0.95 * before.sum()


def test_value_refit_matching_moments_keeps_the_mean_and_spread(rng):
    """One round against a float64 reference: where a vector takes the refit, its fp16 scale is the ratio of its
    inliers' standard deviation to that of the decode book at the range fit's codes (within fp16 rounding), its
    offset matches their means, and its codes are the nearest entries under them. The decoded inliers keep the
    vectors' spread, which least squares shrinks."""
    x, book, outlier, scale, offset, codes = _range_fit_case(rng)
    new_codes, new_scale, new_offset = refit_per_vector(x, outlier, scale, offset, codes, book, 1, match_moments=True)

    inlier = (~outlier).double()
    n = inlier.sum(-1, keepdim=True)

    def mean_std(y):
        mean = (y * inlier).sum(-1, keepdim=True) / n
        return mean, (((y - mean) ** 2 * inlier).sum(-1, keepdim=True) / n).sqrt()

    (mean_b, std_b), (mean_x, std_x) = mean_std(book.double()[codes.long()]), mean_std(x.double())
    taken = ((new_scale != scale) | (new_offset != offset)).squeeze(-1)
    assert taken.float().mean() > 0.9
    step = 2.0 ** -10  # fp16's relative spacing
    assert ((new_scale.double() - std_x / std_b).abs() <= step * std_x / std_b)[taken].all()
    line_offset = mean_x - new_scale.double() * mean_b
    assert ((new_offset.double() - line_offset).abs() <= step * line_offset.abs() + 1e-5 * scale.double())[taken].all()
    recoded = (((x.double() - new_offset.double()) / new_scale.double())[..., None] - book.double()).abs().argmin(-1)
    assert (recoded != new_codes.long())[taken].float().mean() < 1e-3

    def spread_ratio(c, s, o):  # decoded inliers' std over x's, per vector
        return mean_std(book.double()[c.long()] * s.double() + o.double())[1] / std_x

    fitted = spread_ratio(*refit_per_vector(x, outlier, scale, offset, codes, book, 2, match_moments=True))
    least_squares = spread_ratio(*refit_per_vector(x, outlier, scale, offset, codes, book, 2))
    assert (fitted - 1).abs().mean() < min(0.01, 0.7 * (least_squares - 1).abs().mean())


def test_value_refit_rounds_lower_the_codec_error(rng):
    """kvquant3's values with 0, 1 and 2 rounds of least squares: each round lowers the total error of the decoded
    values."""
    spec = CalibrationSpec(3)
    cal = _calibration(spec, rng)
    x = torch.randn(300, H, D, generator=rng) * 2 + 0.5
    errors = []
    for rounds in (0, 1, 2):
        options = KVQuantOptions(spec, sink_tokens=0, value_refits=rounds, value_fit="least-squares")
        codec = KVQuantCodec("kvquant3", options, cal)
        errors.append(float((codec.decode(codec.encode(x, "value", 0)) - x).double().pow(2).sum()))
    assert errors[2] < errors[1] < 0.95 * errors[0]


def test_vector_outlier_mask_picks_farthest_from_median():
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0, 100.0, -50.0, 1.5]])
    assert vector_outlier_mask(x, 2).nonzero()[:, 1].tolist() == [4, 5]
    assert not vector_outlier_mask(x, 0).any()


def test_sink_token_exact(rng):
    spec = CalibrationSpec(2)
    codec = KVQuantCodec("kvquant2", KVQuantOptions(spec), _calibration(spec, rng))
    x = torch.randn(9, H, D, generator=rng)
    rotation = value_rotation(D)
    for kind in ("key", "value"):
        rec = codec.decode(codec.encode(x, kind, 0))
        # values: 16-bit in the basis they are stored in
        exact = x[0].half().float() if kind == "key" else (x[0] @ rotation).half().float() @ rotation.T
        assert torch.equal(rec[0], exact)
        assert (rec[1] - x[1]).abs().max() > 1e-2


def test_post_rope_round_trip(rng):
    spec = CalibrationSpec(4, key_position="post-rope")
    cal = _calibration(spec, rng)
    cal.layers[0].key_codebook = uniform_codebook(4)
    codec = KVQuantCodec("kvquant3-postrope", KVQuantOptions(spec, block_size=None), cal)
    x = torch.randn(12, H, D, generator=rng) * 0.3
    rec = codec.decode(codec.encode(x, "key", 0))
    # Quantization happened in the rotated space: the error, rotated forward, respects the per-channel step.
    cos, sin = GEO.rope().cos_sin(torch.arange(12))
    err_post = (apply_rope(rec, cos, sin) - apply_rope(x, cos, sin)).abs()[1:]
    assert (err_post <= cal.layers[0].key_scale / 15 + 1e-4).all()


def test_rope_inverse_exact(rng):
    x = torch.randn(50, 3, 64, generator=rng, dtype=torch.float64).float()
    cos, sin = Rope.default(64, 100000.0).cos_sin(torch.arange(1000, 1050))
    assert (invert_rope(apply_rope(x, cos, sin), cos, sin) - x).abs().max() < 1e-5


def test_bits_per_element():
    spec = CalibrationSpec(3)
    codec = KVQuantCodec("kvquant3", KVQuantOptions(spec), _calibration(spec, torch.Generator().manual_seed(0)))
    # keys: 3 + 1% * 32; values (D=64, rotated, no outliers): 3 + 32/64; sink: 16/2048.
    expected = ((3 + 0.32) + (3 + 0.5)) / 2 + 16 / 2048
    assert codec.bits_per_element(64, 2048) == pytest.approx(expected)
    spec = CalibrationSpec(3, value_rotation=False, value_outliers=True)
    codec = KVQuantCodec("kvquant3", KVQuantOptions(spec), _calibration(spec, torch.Generator().manual_seed(0)))
    # values with one outlier per vector (fp16 value and its position): 3 + 32/64 + 32/64
    assert codec.bits_per_element(64, 2048) == pytest.approx(((3 + 0.32) + (3 + 0.5 + 0.5)) / 2 + 16 / 2048)


def test_methods_need_their_calibration(rng):
    cal3 = _calibration(CalibrationSpec(3), rng)
    assert get_codec("kvquant3", [cal3]).name == "kvquant3"
    assert get_codec("kvquant3-uniform", [cal3]).options.nonuniform is False
    with pytest.raises(MissingCalibrationError, match="--bits 4 --outliers 0.01"):
        get_codec("kvquant4", [cal3])
    with pytest.raises(MissingCalibrationError, match="--post-rope"):
        get_codec("kvquant3-postrope", [cal3])
    assert set(kvquant_methods()) >= {"kvquant2", "kvquant3", "kvquant4", "kvquant3-nooutliers"}
