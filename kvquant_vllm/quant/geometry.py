"""What the numerics need to know about a model: attention shape and RoPE parameters.

Works on any Hugging Face config object (transformers' or the one vLLM holds).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


class UnsupportedModelError(ValueError):
    """The model's attention is not one this package can quantize."""


@dataclass(frozen=True)
class AttentionGeometry:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rope_type: str

    def fingerprint(self) -> dict:
        return asdict(self)


def _rope_parameters(config) -> dict | None:
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return params
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        return None
    scaling = getattr(config, "rope_scaling", None) or {}
    return {"rope_theta": theta, "rope_type": scaling.get("rope_type", scaling.get("type", "default"))}


def attention_geometry(config) -> AttentionGeometry:
    """Layers, kv heads, head dim and RoPE of a decoder with RoPE; UnsupportedModelError otherwise."""
    model_type = getattr(config, "model_type", type(config).__name__)
    if getattr(config, "kv_lora_rank", None) or getattr(config, "q_lora_rank", None):
        raise UnsupportedModelError(f"{model_type}: MLA (latent) attention is not supported")
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        raise UnsupportedModelError(f"{model_type}: sliding-window attention layers are not supported")
    rope = _rope_parameters(config)
    if rope is None or getattr(config, "position_embedding_type", "rope") != "rope":
        raise UnsupportedModelError(
            f"{model_type}: no rotary position embedding; KVQuant's pre-RoPE keys need a RoPE model"
        )
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return AttentionGeometry(
        config.num_hidden_layers, kv_heads, head_dim, float(rope["rope_theta"]), str(rope.get("rope_type", "default"))
    )
