"""Pass every layer's K and V of a Hugging Face causal LM through a codec.

Keys are hooked at the output of ``k_proj``, i.e. before the rotary embedding is applied in
the attention forward, so codecs see **pre-RoPE** keys, as the vLLM backend will after undoing
the rotation.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from kvquant_vllm.quant.codec import Kind, KVCodec
from kvquant_vllm.quant.geometry import AttentionGeometry, UnsupportedModelError, attention_geometry


def kv_projections(model: torch.nn.Module) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """``(k_proj, v_proj)`` of every decoder layer, in order."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise UnsupportedModelError(f"{type(model).__name__}: expected decoder layers at model.model.layers")
    projs = []
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None or not hasattr(attn, "k_proj") or not hasattr(attn, "v_proj"):
            raise UnsupportedModelError(f"layer {i} of {type(model).__name__} has no separate k_proj/v_proj")
        projs.append((attn.k_proj, attn.v_proj))
    return projs


def _quantizing_hook(codec: KVCodec, kind: Kind, layer: int, geometry: AttentionGeometry):
    def hook(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        # out: [batch, seq, num_kv_heads * head_dim]; codecs work on one sequence at a time.
        b, t, _ = out.shape
        x = out.reshape(b, t, geometry.num_kv_heads, geometry.head_dim)
        q = torch.stack([codec.fake_quant(x[i], kind, layer) for i in range(b)])
        return q.reshape(b, t, -1)

    return hook


@contextmanager
def fake_quantized(model: torch.nn.Module, codec: KVCodec) -> Iterator[None]:
    """Within the block, every layer's pre-RoPE K and V go through ``codec``."""
    geometry = attention_geometry(model.config)
    handles = []
    try:
        for layer, (k_proj, v_proj) in enumerate(kv_projections(model)):
            handles.append(k_proj.register_forward_hook(_quantizing_hook(codec, "key", layer, geometry)))
            handles.append(v_proj.register_forward_hook(_quantizing_hook(codec, "value", layer, geometry)))
        yield
    finally:
        for h in handles:
            h.remove()
