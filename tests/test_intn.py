import pytest
import torch

from kvquant_vllm.quant import get_codec, method_names
from kvquant_vllm.quant.intn import IntChannelCodec, IntTokenCodec
from kvquant_vllm.quant.uniform import dequantize_uniform, quantize_uniform, uniform_codes, uniform_side


def _activations(rng, tokens=37, heads=3, head_dim=64):
    # Channels with very different magnitudes, as real pre-RoPE keys have.
    x = torch.randn(tokens, heads, head_dim, generator=rng, dtype=torch.float64)
    channel_scale = torch.logspace(-1, 1, head_dim, dtype=torch.float64)
    return (x * channel_scale + torch.randn(head_dim, generator=rng, dtype=torch.float64)).float()


def _assert_within_bound(x, packed):
    """|x - x_hat| <= scale/2, plus fp16 rounding of zero point and scale (clamping at the ends)."""
    xt = x.double().movedim(packed.dim, -1)
    err = (dequantize_uniform(packed).double().movedim(packed.dim, -1) - xt).abs()
    levels = packed.levels - 1
    fp16_slack = 2.0**-10 * (xt.abs().amax(-1, keepdim=True) + levels * packed.scale.double())
    bound = packed.scale.double() / 2 + fp16_slack + 1e-7
    assert (err <= bound).all(), float((err - bound).max())
    return err


@pytest.mark.parametrize("levels", [3, 4, 8, 16, 256])
@pytest.mark.parametrize("dim", [0, 2])
def test_uniform_error_bound(levels, dim, rng):
    x = _activations(rng)
    packed = quantize_uniform(x, levels, dim)
    err = _assert_within_bound(x, packed)
    # The bound is met tightly: some element has an error close to half a step.
    assert float((err / packed.scale.double()).max()) > 0.4


def test_fp8_side_data_bound(rng):
    """Scale and zero point in fp8 e4m3 (3 mantissa bits): half a step, plus what rounding the zero point
    and the scale moves the range's ends (at most 2**-4 of |min| and |max|)."""
    x = _activations(rng)
    lo, hi = x.amin(2, keepdim=True), x.amax(2, keepdim=True)
    scale, zero = uniform_side(lo, hi, 4, side_bits=8)
    assert scale.dtype == zero.dtype == torch.float8_e4m3fn
    y = uniform_codes(x, scale, zero, 4).float() * scale.float() + zero.float()
    err = (y - x).abs()
    assert (err <= scale.float() / 2 + 2**-4 * 1.1 * (lo.abs() + hi.abs())).all()
    fp16_scale, fp16_zero = uniform_side(lo, hi, 4)
    fp16_err = (uniform_codes(x, fp16_scale, fp16_zero, 4).float() * fp16_scale.float() + fp16_zero.float() - x).abs()
    assert float(fp16_err.mean()) < float(err.mean())  # fp8 really rounds coarser


def test_uniform_constant_slice_is_exact():
    x = torch.full((4, 1, 8), 3.25)
    assert torch.equal(dequantize_uniform(quantize_uniform(x, 8, 2)), x)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_token_codec(bits, rng):
    codec = IntTokenCodec(bits)
    x = _activations(rng)
    for kind in ("key", "value"):
        packed = codec.encode(x, kind, layer=0)
        assert packed.scale.shape == (37, 3, 1)  # one scale per token and head
        _assert_within_bound(x, packed)
        assert codec.fake_quant(x, kind, 0).shape == x.shape


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_channel_codec_keys_per_channel(bits, rng):
    codec = IntChannelCodec(bits)
    x = _activations(rng)
    keys = codec.encode(x, "key", 0)
    assert keys.scale.shape == (3, 64, 1)  # one scale per head and channel, shared over tokens
    _assert_within_bound(x, keys)
    values = codec.encode(x, "value", 0)
    assert values.scale.shape == (37, 3, 1)
    # Per-channel keys isolate a huge channel; per-token keys let it swamp the others.
    x_out = x.clone()
    x_out[:, :, 5] *= 100
    err_channel = (codec.fake_quant(x_out, "key", 0) - x_out)[:, :, 6:].abs().mean()
    err_token = (IntTokenCodec(bits).fake_quant(x_out, "key", 0) - x_out)[:, :, 6:].abs().mean()
    assert err_channel < err_token / 5


def test_more_bits_less_error(rng):
    x = _activations(rng)
    errs = [float((get_codec(f"int{b}-token").fake_quant(x, "value", 0) - x).abs().mean()) for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True)
    assert errs[-1] < errs[0] / 30


def test_bits_per_element():
    assert get_codec("int4-token").bits_per_element(64, 2048) == pytest.approx(4.5)
    assert get_codec("int3-token").bits_per_element(128, 2048) == pytest.approx(3.25)
    # keys: 3 + 32/2048, values: 3 + 32/64
    assert get_codec("int3-channel").bits_per_element(64, 2048) == pytest.approx((3 + 32 / 2048 + 3.5) / 2)
    assert get_codec("fp16").bits_per_element(64, 2048) == 16


def test_registry():
    names = method_names()
    for name in ["fp16", "int2-token", "int3-token", "int4-token", "int8-token", "int4-channel"]:
        assert name in names
        assert get_codec(name).name == name
    with pytest.raises(ValueError, match="unknown KV cache method 'int5-token'.*int4-token"):
        get_codec("int5-token")
