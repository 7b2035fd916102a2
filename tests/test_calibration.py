import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from kvquant_vllm.calib.collect import LayerActivations, collect_activations
from kvquant_vllm.calib.file import CalibrationError, holds_calibration, read_calibration, write_calibration
from kvquant_vllm.calib.layer import allocated_thresholds, calibrate_kvquant_layer, channel_thresholds
from kvquant_vllm.calib.run import calibrate_layers
from kvquant_vllm.quant.geometry import AttentionGeometry, attention_geometry
from kvquant_vllm.quant.cq import CQSpec
from kvquant_vllm.quant.kvquant import KEY_THRESHOLD_SHARE, CalibrationSpec, KVQuantCalibration, kvquant_methods
from kvquant_vllm.quant.skvq import SKVQSpec

# KVQuant's, plus two other families to show the Ray path calibrates any method the same.
SPECS = [CalibrationSpec(3), CalibrationSpec(2, key_position="post-rope"), CQSpec("cq", channels=4, code_bits=4),
         SKVQSpec("skvq", 4, 3, group_size=16)]


@pytest.fixture(scope="module")
def windows(tiny_model):
    return torch.randint(0, tiny_model.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def activations(tiny_model, windows):
    return collect_activations(tiny_model, windows, skip_tokens=1)


@pytest.fixture(scope="module")
def positions(windows):
    return torch.arange(1, windows.shape[1]).repeat(windows.shape[0])


@pytest.fixture(scope="module")
def inline(activations, tiny_model, positions):
    return calibrate_layers(activations, SPECS, attention_geometry(tiny_model.config), positions, num_workers=0)


def test_collected_gradients_match_autograd(tiny_model, windows, activations):
    geo = attention_geometry(tiny_model.config)
    w = windows[1]
    for layer in range(geo.num_layers):
        for kind in ("key", "value"):
            proj = getattr(tiny_model.model.layers[layer].self_attn, f"{kind[0]}_proj")
            leaf = {}

            def swap(module, args, out):
                leaf["x"] = out.detach().requires_grad_(True)
                return leaf["x"]

            handle = proj.register_forward_hook(swap)
            try:
                logits = tiny_model(w[None]).logits[0, :-1]
                loss = F.cross_entropy(logits.float(), w[1:], reduction="sum")
                (grad,) = torch.autograd.grad(loss, leaf["x"])
            finally:
                handle.remove()
            act = activations[layer]
            n = w.numel() - 1
            collected = (act.key_grad if kind == "key" else act.value_grad)[n : 2 * n]
            expected = grad[0, 1:].reshape(n, geo.num_kv_heads, geo.head_dim)
            torch.testing.assert_close(collected, expected, rtol=1e-4, atol=1e-7)
            # Collected keys are the k_proj output itself: pre-RoPE.
            stored = (act.keys if kind == "key" else act.values)[n : 2 * n]
            torch.testing.assert_close(stored, leaf["x"][0, 1:].detach().reshape(n, geo.num_kv_heads, geo.head_dim))
    assert all(not p.requires_grad or p.grad is None for p in tiny_model.parameters())


def test_channel_thresholds_drop_the_requested_fraction(rng):
    x = torch.randn(10000, 2, 4, generator=rng)
    lower, upper = channel_thresholds(x, 0.01)
    outside = ((x < lower) | (x > upper)).float().mean()
    assert float(outside) == pytest.approx(0.01, abs=0.001)
    lo, hi = channel_thresholds(x, 0.0)
    assert torch.equal(lo, x.amin(0)) and torch.equal(hi, x.amax(0))


def test_allocated_thresholds_keep_each_heads_budget_and_give_it_to_heavy_tails(rng):
    # Per head: 4 Gaussian channels and 4 heavy-tailed ones (Student t, 2 degrees of freedom).
    n, fraction = 20000, 0.01
    gauss = torch.randn(n, 2, 4, generator=rng)
    uniform = torch.rand(n, 2, 4, generator=rng).clamp_min(1e-6)
    heavy = torch.randn(n, 2, 4, generator=rng) / (-uniform.log()).sqrt()  # z / sqrt(chi2(2) / 2)
    x = torch.cat([gauss, heavy], -1)
    weights = torch.ones_like(x)
    lower, upper = allocated_thresholds(x, weights, fraction)
    outside = ((x < lower) | (x > upper)).double().mean(0)  # [H, D] outlier fraction per channel
    per_head = outside.mean(-1)
    assert torch.all(per_head <= fraction * 1.02) and torch.all(per_head >= fraction * 0.7), per_head
    assert torch.all(outside[:, 4:].min(-1).values > outside[:, :4].max(-1).values)

    def rounding_error(lo, hi):  # the error the allocation minimises: inliers' weight x half range squared
        inside = (x >= lo) & (x <= hi)
        return float(((weights * inside).sum(0) * ((hi - lo) / 2).square()).sum())

    even = channel_thresholds(x, fraction)
    assert rounding_error(lower, upper) < 0.7 * rounding_error(*even)


@pytest.mark.parametrize("share", [1.0, 0.5])
def test_key_thresholds_leave_out_their_share_of_the_outlier_fraction(share, rng):
    n, h, d, fraction = 20000, 2, 16, 0.04
    keys = torch.randn(n, h, d, generator=rng) * torch.linspace(0.5, 3, d)
    act = LayerActivations(keys, torch.randn(n, h, d, generator=rng), torch.randn(n, h, d, generator=rng),
                           torch.randn(n, h, d, generator=rng))
    geometry = AttentionGeometry(num_layers=1, num_kv_heads=h, head_dim=d, rope_theta=10000.0, rope_type="default")
    spec = CalibrationSpec(3, outlier_fraction=fraction, key_threshold_share=share)
    layer = calibrate_kvquant_layer(act, spec, geometry, torch.arange(n))
    outside = ((keys - layer.key_offset).abs() > layer.key_scale).double().mean((0, 2))  # per head
    assert torch.all(outside <= fraction * share * 1.02) and torch.all(outside >= fraction * share * 0.7), outside


def test_key_threshold_share_defaults_to_the_code_widths():
    """`calibrate --bits N` (no share given) makes the spec that the kvquantN dtype serves, and names no share flag;
    another share is a flag of its own."""
    assert KEY_THRESHOLD_SHARE[2] == 1.0 and KEY_THRESHOLD_SHARE[3] < 1.0
    for bits, share in KEY_THRESHOLD_SHARE.items():
        spec = CalibrationSpec(bits)
        assert spec.key_threshold_share == share and spec == kvquant_methods()[f"kvquant{bits}"].spec
        assert "--key-threshold-share" not in spec.calibrate_flags()
    assert "--key-threshold-share 0.75" in CalibrationSpec(2, key_threshold_share=0.75).calibrate_flags()


def test_ray_with_two_workers_equals_inline(activations, tiny_model, positions, inline):
    on_ray = calibrate_layers(
        activations, SPECS, attention_geometry(tiny_model.config), positions, num_workers=2
    )
    for spec in SPECS:
        for a, b in zip(inline[spec], on_ray[spec]):
            for name in a.TENSORS:
                torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-6, atol=1e-6)


def test_calibrated_tables_are_sane(inline, activations):
    for layer, act in zip(inline[SPECS[0]], activations):
        assert layer.key_codebook.shape == (*act.keys.shape[1:], 8)  # one book per channel
        assert torch.all(layer.key_codebook.diff() >= 0) and torch.all(layer.value_codebook.diff() > 0)
        assert layer.key_codebook.abs().max() <= 1.0 + 1e-6
        inside = ((act.keys - layer.key_offset).abs() <= layer.key_scale * (1 + 1e-5)).float().mean()
        assert float(inside) > 0.97  # thresholds cut at most ~1% of each channel (fewer on 117 tokens)


@pytest.fixture
def calibration_file(tmp_path, tiny_model, inline):
    cal = KVQuantCalibration(
        SPECS[0], attention_geometry(tiny_model.config), inline[SPECS[0]], "tiny-llama", {"text": "random", "samples": 3}
    )
    return write_calibration(tmp_path / "cal.safetensors", cal), cal


def test_file_round_trip(calibration_file, tiny_model):
    path, cal = calibration_file
    back = read_calibration(path, attention_geometry(tiny_model.config))
    assert back.spec == cal.spec and back.geometry == cal.geometry and back.model_name == "tiny-llama"
    assert back.info == {"text": "random", "samples": 3}
    for a, b in zip(cal.layers, back.layers):
        for name in a.TENSORS:
            assert torch.equal(getattr(a, name), getattr(b, name))
    assert [p.name for p in path.parent.iterdir()] == ["cal.safetensors"]  # no temporary left behind


def test_file_rejects_another_model(calibration_file):
    from transformers import LlamaConfig

    path, _ = calibration_file
    other = attention_geometry(LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, hidden_size=64))
    with pytest.raises(CalibrationError, match="made for model 'tiny-llama'.*num_kv_heads=2.*num_kv_heads=4"):
        read_calibration(path, other)


def _rewrite(path, mutate_header=None, mutate_tensors=None):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    header = json.loads(meta["kvquant"])
    if mutate_header:
        mutate_header(header)
    if mutate_tensors:
        mutate_tensors(tensors)
    save_file(tensors, str(path), metadata={"kvquant": json.dumps(header)})


def test_file_rejects_wrong_version(calibration_file):
    path, _ = calibration_file
    _rewrite(path, mutate_header=lambda h: h.update(format_version=99))
    with pytest.raises(CalibrationError, match="format version 99.*reads version 1"):
        read_calibration(path)


def test_file_from_before_outlier_allocation_reads_as_even_and_is_recreated(calibration_file):
    path, cal = calibration_file
    assert holds_calibration(path, cal.spec)
    _rewrite(path, mutate_header=lambda h: h["spec"].pop("outlier_allocation"))
    back = read_calibration(path)
    assert back.spec == replace(cal.spec, outlier_allocation="even")
    assert "--even-outliers" in back.spec.calibrate_flags()
    assert not holds_calibration(path, cal.spec)  # cached_calibrations and the demo calibrate again
    assert not holds_calibration(path.with_name("missing.safetensors"), cal.spec)


def test_file_from_before_key_threshold_share_reads_as_whole_fraction_and_is_recreated(calibration_file):
    path, cal = calibration_file
    _rewrite(path, mutate_header=lambda h: h["spec"].pop("key_threshold_share"))
    back = read_calibration(path)
    assert back.spec == replace(cal.spec, key_threshold_share=1.0)
    assert "--key-threshold-share 1" in back.spec.calibrate_flags()
    assert not holds_calibration(path, cal.spec)


def test_file_rejects_truncation(calibration_file):
    path, _ = calibration_file
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CalibrationError, match="corrupted or truncated.*kvquant-vllm calibrate"):
        read_calibration(path)


def test_file_rejects_nan(calibration_file):
    path, _ = calibration_file

    def poison(t):
        t["layers.1.key_scale"][0, 3] = math.nan

    _rewrite(path, mutate_tensors=poison)
    with pytest.raises(CalibrationError, match="layers.1.key_scale holds NaN"):
        read_calibration(path)


def test_file_rejects_missing_and_foreign(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(CalibrationError, match="does not exist"):
        read_calibration(tmp_path / "none.safetensors")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CalibrationError, match="not a kvquant calibration file"):
        read_calibration(tmp_path / "other.safetensors")
