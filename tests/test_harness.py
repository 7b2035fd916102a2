import math

import pytest
import torch
from transformers import DeepseekV3Config, GPT2Config, LlamaConfig, MistralConfig
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kvquant_vllm.calib.collect import collect_activations
from kvquant_vllm.eval.fakequant import fake_quantized, tap_kv
from kvquant_vllm.eval.perplexity import evaluate_methods, load_eval_model, make_windows, tokenize, window_nll
from kvquant_vllm.models import tiny_decoder
from kvquant_vllm.quant.codec import KVCodec, Unquantized
from kvquant_vllm.quant.geometry import UnsupportedModelError, attention_geometry
from kvquant_vllm.quant.registry import get_codec
from kvquant_vllm.quant.rope import Rope

# Scaled RoPE kinds as Llama 3.x, YaRN and linear-interpolation checkpoints configure them (small windows).
SCALED_ROPE = {
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128},
}


class Recorder(KVCodec):
    """Leaves K/V unchanged and keeps what the harness handed over."""

    name = "recorder"

    def __init__(self):
        self.seen = {}

    def encode(self, x, kind, layer):
        self.seen[(kind, layer)] = x.clone()
        return x

    def decode(self, packed):
        return packed

    def bits_per_element(self, head_dim, seq_len):
        return 16.0


def _random_windows(vocab, n=3, seq_len=24, seed=0):
    return torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["llama", "qwen3", "olmo2", "phi3"])
def test_codecs_see_the_keys_and_values_that_attention_uses(kind, tiny_model):
    """Codecs get the keys just before RoPE, after a key norm where the model has one and sliced from a fused
    projection where it has one, as the vLLM backend does once it undoes RoPE: rotated, they are the keys that
    attention caches. Calibration collects the same keys and values."""
    model = tiny_model if kind == "llama" else tiny_decoder(kind)
    ids = _random_windows(model.config.vocab_size, n=1)
    rec = Recorder()
    with torch.no_grad(), fake_quantized(model, rec):
        cache = model(ids, use_cache=True).past_key_values
    geo = attention_geometry(model.config)
    positions = torch.arange(ids.shape[1])
    for layer in range(geo.num_layers):
        cached_k, cached_v = (x[0].transpose(0, 1) for x in (cache.layers[layer].keys, cache.layers[layer].values))
        torch.testing.assert_close(geo.rope().rotate(rec.seen[("key", layer)], positions), cached_k,
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rec.seen[("value", layer)], cached_v, rtol=0, atol=0)
        assert (rec.seen[("key", layer)][1:] - cached_k[1:]).abs().max() > 1e-2  # they really are pre-RoPE
    for layer, act in enumerate(collect_activations(model, ids, skip_tokens=0)):
        torch.testing.assert_close(act.keys, rec.seen[("key", layer)], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(act.values, rec.seen[("value", layer)], rtol=1e-6, atol=1e-6)


def test_a_layer_without_key_and_value_projections_is_refused():
    model = tiny_decoder()
    del model.model.layers[1].self_attn.k_proj
    with pytest.raises(UnsupportedModelError, match="layer 1 of LlamaForCausalLM has neither k_proj and v_proj"):
        tap_kv(model, lambda kind, layer, x: None)
    assert not model.model.layers[0].self_attn.k_proj._forward_hooks  # layer 0's hook is gone again


def test_unquantized_ppl_equals_model_loss(tiny_model):
    windows = _random_windows(tiny_model.config.vocab_size)
    nll, count = window_nll(tiny_model, windows, Unquantized())
    with torch.no_grad():
        losses = [tiny_model(w[None], labels=w[None]).loss for w in windows]
    assert count == windows.numel() - windows.shape[0]
    assert math.exp(nll / count) == pytest.approx(math.exp(torch.stack(losses).mean().item()), rel=1e-5)


def test_quantization_reaches_the_model(tiny_model):
    windows = _random_windows(tiny_model.config.vocab_size)
    results = {r.method: r for r in evaluate_methods(tiny_model, windows, ["int8-token", "int2-token"])}
    assert list(results)[0] == "fp16" and results["fp16"].delta == 0
    assert abs(results["int8-token"].delta) < 1e-2 * results["fp16"].ppl
    assert abs(results["int2-token"].delta) > 10 * abs(results["int8-token"].delta)
    # Hooks are removed afterwards: the model is unquantized again.
    nll, count = window_nll(tiny_model, windows, Unquantized())
    assert math.exp(nll / count) == pytest.approx(results["fp16"].ppl, rel=1e-6)


def test_smollm2_harness_equals_model_loss(smollm2_dir):
    model, tokenizer = load_eval_model(smollm2_dir)
    ids = tokenize(tokenizer, "The quick brown fox jumps over the lazy dog. " * 40)
    windows = make_windows(ids, 128, max_windows=2)
    nll, count = window_nll(model, windows, Unquantized())
    with torch.no_grad():
        loss = torch.stack([model(w[None], labels=w[None]).loss for w in windows]).mean()
    assert math.exp(nll / count) == pytest.approx(math.exp(loss.item()), rel=1e-5)
    assert attention_geometry(model.config).num_kv_heads == 3


def test_make_windows():
    ids = torch.arange(10)
    assert make_windows(ids, 3).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert make_windows(ids, 3, max_windows=1).shape == (1, 3)
    with pytest.raises(ValueError, match="fewer than one window"):
        make_windows(ids, 11)


@pytest.mark.parametrize(
    "config, message",
    [
        (GPT2Config(), "no rotary position embedding"),
        (MistralConfig(sliding_window=4096), "sliding-window"),
        (DeepseekV3Config(), "MLA"),
    ],
)
def test_unsupported_models(config, message):
    with pytest.raises(UnsupportedModelError, match=message):
        attention_geometry(config)


@pytest.mark.parametrize("kind", ["default", *SCALED_ROPE])
def test_geometry_rotates_keys_as_the_model_does(kind, rng):
    """Methods that quantize keys after RoPE rotate them with the geometry's RoPE: it must be the model's,
    scaled frequencies and attention factor included."""
    model = tiny_decoder(rope_parameters=SCALED_ROPE.get(kind, {"rope_type": "default", "rope_theta": 10000.0}))
    geometry = attention_geometry(model.config)
    keys = torch.randn(300, 2, 16, generator=rng)  # [T, H, D], past the scaled kinds' original windows
    positions = torch.arange(300)
    cos, sin = model.model.rotary_emb(keys, positions[None])
    k_bhtd = keys.transpose(0, 1)[None]
    expected = apply_rotary_pos_emb(k_bhtd, k_bhtd, cos, sin)[0][0].transpose(0, 1)
    torch.testing.assert_close(geometry.rope().rotate(keys, positions), expected, rtol=1e-4, atol=2e-4)
    if kind != "default":  # unscaled RoPE is far off: the test tells the two apart
        assert (Rope.default(16, 10000.0).rotate(keys, positions) - expected).abs().max() > 0.1
    assert geometry.fingerprint() == {"num_layers": 2, "num_kv_heads": 2, "head_dim": 16, "rope_theta": 10000.0,
                                      "rope_type": kind}


def test_post_rope_methods_reject_length_dependent_rope():
    config = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                         rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    geometry = attention_geometry(config)  # pre-RoPE methods still work on it
    with pytest.raises(UnsupportedModelError, match="dynamic RoPE: methods that quantize keys after RoPE"):
        get_codec("kivi2", geometry=geometry)


def test_post_rope_methods_reject_a_partial_rotation():
    """A default-type RoPE over half the head (GLM, Phi-2 style) is no full-head rotation: no fallback to one."""
    config = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64)
    config.partial_rotary_factor = 0.5
    with pytest.raises(UnsupportedModelError, match=r"default RoPE: .*\(it rotates 0.5 of the head\)"):
        get_codec("fp8-e4m3", geometry=attention_geometry(config))
