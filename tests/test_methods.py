"""The other published methods (CQ, SKVQ, WKVQuant, KIVI) and the order-aware harness."""

import math

import pytest
import torch
from transformers import LlamaConfig

from kvquant_vllm.calib.collect import LayerActivations, collect_activations
from kvquant_vllm.calib.file import read_calibration, write_calibration
from kvquant_vllm.calib.methods import (
    calibrate_cq_layer,
    calibrate_skvq_layer,
    cluster_labels,
    search_clip,
    weighted_kmeans,
)
from kvquant_vllm.calib.run import calibrate_layers
from kvquant_vllm.eval.fakequant import fake_quantized
from kvquant_vllm.quant.codec import KVCodec, Unquantized
from kvquant_vllm.quant.cq import CQCodec, CQOptions, CQSpec, nearest_centroid
from kvquant_vllm.quant.fp8 import FP8_FORMATS, FP8Codec
from kvquant_vllm.quant.geometry import AttentionGeometry, attention_geometry
from kvquant_vllm.quant.intn import IntTokenCodec
from kvquant_vllm.quant.kivi import KIVICodec
from kvquant_vllm.quant.kvquant import KVQuantCalibration
from kvquant_vllm.quant.registry import MissingCalibrationError, calibration_spec, get_codec, method_names
from kvquant_vllm.quant.skvq import SKVQCodec, SKVQSpec, SKVQTables, dequantize_groups, quantize_groups
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
    return GEO.rope().rotate(x, torch.arange(x.shape[0]))


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


def _fp8_nearest(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 reference: each element of ``x`` rounded to the nearest finite value of the fp8 ``dtype``."""
    grid = torch.arange(256, dtype=torch.uint8).view(dtype).double()
    grid = grid[grid.isfinite()].unique()
    x = x.double().clamp(grid[0], grid[-1])
    return grid[(x[..., None] - grid).abs().argmin(-1)]


# YaRN: scaled frequencies and an attention factor of 1.14 on cos and sin (a llama3-scaled head would do too).
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16}
YARN_GEO = attention_geometry(LlamaConfig(num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                          hidden_size=64, rope_parameters=YARN))


@pytest.mark.parametrize("geometry", [GEO, YARN_GEO], ids=["default-rope", "yarn"])
@pytest.mark.parametrize("fmt", list(FP8_FORMATS))
def test_fp8_rounds_post_rope_keys_and_values_to_the_nearest_fp8(fmt, geometry, rng):
    codec = FP8Codec(fmt, geometry)
    x = _keys_values(rng, t=37) * 30  # magnitudes from subnormals to ~200
    x[5, 0, 3] = 1e5  # beyond both formats: saturates (torch's own e5m2 cast gives inf)
    rope, positions = geometry.rope(), torch.arange(37)
    rotated = rope.rotate(x.double(), positions)
    # Keys are cast after the model's RoPE, as vLLM's cache holds them; decode rotates them back.
    keys = rope.rotate(codec.fake_quant(x, "key", 0), positions).double()
    torch.testing.assert_close(keys, _fp8_nearest(rotated, FP8_FORMATS[fmt]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(codec.fake_quant(x, "value", 0).double(), _fp8_nearest(x, FP8_FORMATS[fmt]),
                               rtol=0, atol=0)
    assert codec.bits_per_element(GEO.head_dim, 37) == 8.0


def test_post_rope_calibration_keys_and_gradients_follow_the_models_rope(rng):
    """Calibration of post-RoPE keys sees them as the model does (k_post = s R k) and their gradients by the chain
    rule (R g / s), so each token's k . g, the first-order loss change of scaling that key, is unchanged."""
    x, g = torch.randn(2, 37, 2, 16, generator=rng)
    act = LayerActivations(keys=x, key_grad=g, values=x, value_grad=g)
    positions = torch.arange(37)
    keys, grads = act.post_rope_keys(YARN_GEO, positions)
    torch.testing.assert_close(keys, YARN_GEO.rope().rotate(x, positions))
    assert YARN_GEO.rope().scaling > 1.1  # so a missing 1 / s**2 on the gradients shows
    torch.testing.assert_close((keys * grads).sum(-1), (x * g).sum(-1), rtol=1e-4, atol=1e-4)


def test_fp8_names_its_formats_and_needs_the_geometry(tiny_model):
    with pytest.raises(ValueError, match="unknown fp8 format 'e3m4'; known: e4m3, e5m2"):
        FP8Codec("e3m4", GEO)
    with pytest.raises(ValueError, match="fp8-e4m3 quantizes keys after RoPE"):
        get_codec("fp8-e4m3")
    assert get_codec("fp8-e5m2", geometry=attention_geometry(tiny_model.config)).name == "fp8-e5m2"


def _skvq_codec(spec, groups, clip=1.0, layers=1):
    tables = SKVQTables(key_groups=groups.float(), key_clip=torch.tensor([clip]),
                        value_groups=groups.float(), value_clip=torch.tensor([clip]))
    return SKVQCodec(spec, KVQuantCalibration(spec, GEO, [tables] * layers))


def test_skvq_calibrated_groups_and_clips(tiny_calibrations):
    cal = tiny_calibrations["skvq"]
    for tables in cal.layers:
        for kind in ("key", "value"):
            groups = tables.groups(kind)
            assert groups.shape == (GEO.num_kv_heads * GEO.head_dim,)
            assert set(groups.tolist()) == set(range(int(groups.max()) + 1))  # every group used
            assert 0 < tables.clip(kind) <= 1


def test_skvq_round_trip_within_half_a_step_of_each_group(rng):
    spec = SKVQSpec("skvq", 16, 16, group_size=8, side_bits=16)
    groups = torch.randint(0, 4, (32,), generator=rng)
    groups[:4] = torch.arange(4)  # every group used, of unequal sizes
    codec = _skvq_codec(spec, groups)
    x = _keys_values(rng)
    flat = x.reshape(x.shape[0], -1)
    err = (codec.fake_quant(x, "key", 0) - x).reshape(flat.shape).abs()
    for g in range(4):
        members = flat[:, groups == g]
        step = (members.amax(-1, keepdim=True) - members.amin(-1, keepdim=True)) / 15
        assert (err[:, groups == g] <= step / 2 * 1.01 + 1e-3).all()
    # Keys are quantized before RoPE: a token codes the same whatever its position.
    torch.testing.assert_close(codec.fake_quant(x, "key", 0)[7], codec.fake_quant(x[7:8], "key", 0)[0])
    # Three levels (the 1.5-bit values): each group of a token decodes to at most 3 distinct values.
    ternary = _skvq_codec(SKVQSpec("skvq", 4, 3, group_size=8), groups).fake_quant(x, "value", 0).reshape(flat.shape)
    assert all(len(torch.unique(row[groups == g])) <= 3 for row in ternary for g in range(4))


def test_skvq_clip_multiplies_min_and_max():
    """The reference's clipping: a group's min and max times the ratio, values beyond saturate."""
    x = torch.tensor([[-2.0, 0.0, 1.0, 4.0]])
    q, scale, zero = quantize_groups(x, torch.zeros(4, dtype=torch.long), 3, 0.5, 16)
    assert dequantize_groups(q, torch.zeros(4, dtype=torch.long), scale, zero).tolist() == [[-1.0, 0.5, 0.5, 2.0]]
    # fp8 side data, as the default spec stores it.
    _, scale, zero = quantize_groups(x, torch.zeros(4, dtype=torch.long), 4, 1.0, SKVQSpec("s", 4, 3).side_bits)
    assert scale.dtype == zero.dtype == torch.float8_e4m3fn


def test_skvq_two_outlier_channels_get_a_group_of_their_own():
    """k-means of the channels' (min, max), as the reference calibrates, not equal chunks of a sorted order."""
    g = torch.Generator().manual_seed(0)
    n, channels = 3000, GEO.num_kv_heads * GEO.head_dim
    spread = torch.ones(channels)
    spread[[5, 21]] = 40.0  # two outlier channels, in different kv heads
    spread[8:14] = 6.0
    spread[24:28] = 15.0
    x = (torch.randn(n, channels, generator=g) * spread).reshape(n, GEO.num_kv_heads, GEO.head_dim)
    act = LayerActivations(keys=x, key_grad=torch.ones_like(x), values=x, value_grad=torch.ones_like(x))
    tables = calibrate_skvq_layer(act, SKVQSpec("skvq", 4, 3, group_size=8), GEO, torch.arange(n))
    for kind in ("key", "value"):
        groups = tables.groups(kind)
        assert int(groups.max()) + 1 == 4  # 32 channels / group size 8
        assert set((groups == groups[5]).nonzero().flatten().tolist()) == {5, 21}
        assert set((groups == groups[8]).nonzero().flatten().tolist()) == set(range(8, 14))


def test_cluster_labels_are_numbered_and_complete():
    points = torch.tensor([[0.0, 0.0], [10.0, 10.0], [0.1, 0.0], [10.0, 10.1], [5.0, 5.0]])
    labels = cluster_labels(points, 3)
    assert labels.tolist() == [0, 2, 0, 2, 1]  # numbered by centroid
    assert cluster_labels(points[:2], 3).tolist() == [0, 1]  # fewer points than clusters: no empty group


def test_clip_search_goes_past_any_grid_edge():
    assert search_clip(lambda r: (r - 0.37) ** 2) == pytest.approx(0.37)
    assert search_clip(lambda r: -r) == 1.0
    assert search_clip(lambda r: r) == pytest.approx(0.01)  # down to the smallest ratio


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


def test_cq_codes_the_nearest_centroid_and_keeps_the_sink(rng, tiny_calibrations):
    cal = tiny_calibrations["cq"]
    codec = CQCodec("cq2", CQOptions(cal.spec), cal)
    x = _keys_values(rng)
    y = codec.fake_quant(x, "key", 0)
    # Token 0, the attention sink that calibration never sees, decodes exactly (fp16).
    assert torch.equal(y[0], x[0].half().float())
    centroids = cal.layers[0].key_centroids.reshape(-1, 64, 4)  # [H * D / 4, K, 4]
    groups, decoded = x[1:].reshape(x.shape[0] - 1, -1, 4), y[1:].reshape(x.shape[0] - 1, -1, 4)
    best = torch.cdist(groups.transpose(0, 1), centroids).amin(-1).transpose(0, 1)  # brute force
    torch.testing.assert_close((decoded - groups).norm(dim=-1), best, rtol=1e-4, atol=1e-5)
    # Centroids themselves decode exactly.
    exact = torch.cat([x[:1], centroids[:, :5].transpose(0, 1).reshape(5, GEO.num_kv_heads, GEO.head_dim)])
    torch.testing.assert_close(codec.fake_quant(exact, "key", 0)[1:], exact[1:])
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
        cal = KVQuantCalibration(spec, geo, [calibrate_cq_layer(act, spec, geo, positions)])
        codec = CQCodec(spec.method, CQOptions(spec, sink_tokens=0), cal)
        assert codec.bits_per_element(2, n) == 1.0
        errors[spec.method] = float((codec.fake_quant(x, "key", 0) - x).square().mean())
    assert errors["joint"] < 0.5 * errors["independent"], errors


def test_cq_first_position_is_exact_in_the_model_and_w32_keeps_a_window(tiny_model, ids, tiny_calibrations):
    cal = tiny_calibrations["cq"]
    exact = _logits(tiny_model, ids, Unquantized())
    quant = _logits(tiny_model, ids, CQCodec("cq2", CQOptions(cal.spec), cal))
    # Position 0 attends to the sink only, which is kept in fp16: off by fp16 rounding alone.
    assert (quant[:, 0] - exact[:, 0]).abs().amax() < 2e-4 < (quant[:, 1:] - exact[:, 1:]).abs().amax() / 10
    windowed = CQCodec("cq2-w8", CQOptions(cal.spec, window=8), cal)
    assert (_logits(tiny_model, ids, windowed)[:, :8] - exact[:, :8]).abs().amax() < 2e-4
    key_exact, value_exact = windowed.full_precision_masks(12)
    assert key_exact[11].tolist() == [True] + [False] * 3 + [True] * 8 and torch.equal(key_exact, value_exact)


def test_cq_calibration_uses_every_token():
    """One centroid is the Fisher-weighted mean of all 20000 tokens (no subsample)."""
    g = torch.Generator().manual_seed(0)
    n = 20000
    x = torch.randn(n, 1, 2, generator=g) + torch.linspace(0, 3, n)[:, None, None]
    grad = torch.rand(n, 1, 2, generator=g)
    act = LayerActivations(keys=x, key_grad=grad, values=x, value_grad=grad)
    spec = CQSpec("one", channels=2, code_bits=0)
    geo = AttentionGeometry(1, 1, 2, 10000.0, "default")
    centroid = calibrate_cq_layer(act, spec, geo, torch.arange(n)).key_centroids.reshape(2)
    w = grad.square().sum(-1).double()  # a group's Fisher weight
    torch.testing.assert_close(centroid.double(), (w * x[:, 0].double()).sum(0) / w.sum(), rtol=1e-5, atol=1e-6)


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
    for m in ("cq1", "cq2", "cq1-w32", "cq2-w32", "skvq-k2v1.5", "skvq-k4v4", "wkvquant-k4v4", "kivi2", "kivi4"):
        assert m in names
    # The window is a run-time choice: cq2-w32 runs on cq2's calibration.
    assert calibration_spec("cq2-w32") == calibration_spec("cq2")
    cq2 = KVQuantCalibration(calibration_spec("cq2"), GEO, [])
    assert get_codec("cq2-w32", [cq2]).name == "cq2-w32" and get_codec("cq2", [cq2]).name == "cq2"
    with pytest.raises(MissingCalibrationError, match="--method cq2"):
        get_codec("cq2", [])
    with pytest.raises(ValueError, match="geometry"):
        get_codec("kivi2")
    assert get_codec("kivi4", geometry=attention_geometry(tiny_model.config)).name == "kivi4"


def test_bits_per_element_count_side_data_and_windows():
    geo = AttentionGeometry(30, 3, 64, 100000.0, "default")
    assert KIVICodec(2, geo).bits_per_element(64, 2048) == pytest.approx((1 - 128 / 2048) * 3 + 128 / 2048 * 16)
    # SKVQ: 192 channels in 6 groups of any sizes; codes packed over the vector (2-bit keys: 48 bytes;
    # trits: ceil(192 / 5) = 39 bytes) plus an fp8 scale and zero point per group; 128 + 5 tokens in fp16.
    skvq = SKVQSpec("skvq-k2v1.5", key_levels=4, value_levels=3)
    groups = torch.cat([torch.full((2,), 0), torch.full((40,), 1), torch.arange(2, 6).repeat_interleave(38)[:150]])
    tables = SKVQTables(groups.float(), torch.ones(1), groups.float(), torch.ones(1))
    codec = SKVQCodec(skvq, KVQuantCalibration(skvq, geo, [tables] * 30))
    quantized = ((48 * 8 + 6 * 16) + (39 * 8 + 6 * 16)) / 2 / 192
    assert codec.quantized_bits() == pytest.approx(quantized)
    exact = (128 + 5) / 2048
    assert codec.bits_per_element(64, 2048) == pytest.approx((1 - exact) * quantized + exact * 16)
    wk = WKVQuantSpec("wkvquant-k4v4")
    assert WKVQuantCodec(wk, KVQuantCalibration(wk, geo, [])).bits_per_element(64, 2048) == 4.5
    # CQ: the sink token in fp16, and for -w32 the 32 most recent tokens too.
    cq = CQSpec("cq1", channels=8)
    cal = KVQuantCalibration(cq, geo, [])
    assert CQCodec("cq1", CQOptions(cq), cal).bits_per_element(64, 2048) == pytest.approx(
        (1 - 1 / 2048) * 1 + 1 / 2048 * 16)
    assert CQCodec("cq1-w32", CQOptions(cq, window=32), cal).bits_per_element(64, 2048) == pytest.approx(
        (1 - 33 / 2048) * 1 + 33 / 2048 * 16)
