"""What the numerics need to know about a model: attention shape and RoPE parameters.

Works on any Hugging Face config object (transformers' or the one vLLM holds).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from kvquant_vllm.quant.rope import Rope

# RoPE kinds whose frequencies change with the sequence length: no one rotation per position stands for them.
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


class UnsupportedModelError(ValueError):
    """The model's attention is not one this package can quantize."""


@dataclass(frozen=True)
class AttentionGeometry:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rope_type: str
    # The rotation the model's attention applies (scaled frequencies, attention factor), where it is one fixed
    # rotation per position of the whole head, or else why it is not; both None for a geometry made without the
    # model's config (a calibration file's). The fingerprint's type and theta name the rotation.
    model_rope: Rope | None = field(default=None, compare=False, repr=False)
    rope_unsupported: str | None = field(default=None, compare=False, repr=False)

    def fingerprint(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.compare}

    def rope(self) -> Rope:
        """The RoPE that keys go through in the model, for the methods that quantize keys after it."""
        if self.model_rope is not None:
            return self.model_rope
        if self.rope_unsupported is None and self.rope_type == "default":  # without the config, theta is all it takes
            return Rope.default(self.head_dim, self.rope_theta)
        why = self.rope_unsupported or "the geometry came from a calibration file without the model's config"
        raise UnsupportedModelError(
            f"{self.rope_type} RoPE: methods that quantize keys after RoPE need the model's rotation per position, "
            f"and this geometry has none ({why}); the pre-RoPE methods work"
        )


def _rope_parameters(config) -> dict | None:
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return params
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        return None
    scaling = getattr(config, "rope_scaling", None) or {}
    return {"rope_theta": theta, "rope_type": scaling.get("rope_type", scaling.get("type", "default"))}


def _model_rope(config, rope: dict, head_dim: int) -> Rope | str:
    """The rotation that a model with ``config`` applies to its keys: transformers' frequencies for its RoPE type,
    which vLLM's rotary embeddings reproduce; or why it is not one fixed rotation of the whole head per position."""
    partial = getattr(config, "partial_rotary_factor", None) or rope.get("partial_rotary_factor", 1.0)
    kind = str(rope.get("rope_type", "default"))
    if kind in LENGTH_DEPENDENT_ROPE:
        return "it changes with the sequence length"
    if partial != 1.0:
        return f"it rotates {partial:g} of the head"
    if kind == "default":
        return Rope.default(head_dim, float(rope["rope_theta"]))
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if kind not in ROPE_INIT_FUNCTIONS:
        return "transformers does not know this kind"
    inv_freq, factor = ROPE_INIT_FUNCTIONS[kind](config)
    if 2 * inv_freq.numel() != head_dim:
        return f"it rotates {2 * inv_freq.numel()} of the head's {head_dim} channels"
    return Rope(inv_freq.float().cpu(), float(factor))


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
    model_rope = _model_rope(config, rope, head_dim)
    supported = isinstance(model_rope, Rope)
    return AttentionGeometry(
        config.num_hidden_layers, kv_heads, head_dim, float(rope["rope_theta"]), str(rope.get("rope_type", "default")),
        model_rope=model_rope if supported else None, rope_unsupported=None if supported else model_rope,
    )
