"""Pass every layer's K and V of a Hugging Face causal LM through a codec.

Keys are hooked at the output of ``k_proj`` (of ``k_norm`` where the model normalizes keys), i.e.
before the rotary embedding is applied in the attention forward, so codecs see **pre-RoPE** keys,
as the vLLM backend does after undoing the rotation.

Methods whose cache depends on the token order (a window of recent tokens kept exact, past-only
quantization) declare, per query position, which keys and values it sees exactly
(:meth:`KVCodec.full_precision_masks`). For those the harness runs the window as if decoded token
by token: the projections pass through unchanged, the quantized K/V are kept aside, and an
attention function mixes exact and quantized scores and values by the masks.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from kvquant_vllm.quant.codec import Kind, KVCodec
from kvquant_vllm.quant.geometry import AttentionGeometry, UnsupportedModelError, attention_geometry
from kvquant_vllm.quant.rope import apply_rope

MIXED_ATTENTION = "kvquant_mixed"


def kv_projections(model: torch.nn.Module) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """Per decoder layer, in order: the module whose output is the key that attention rotates (``k_norm`` where
    the model normalizes keys before RoPE, as Qwen3 and OLMo2 do; else ``k_proj``) and ``v_proj``."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise UnsupportedModelError(f"{type(model).__name__}: expected decoder layers at model.model.layers")
    projs = []
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None or not hasattr(attn, "k_proj") or not hasattr(attn, "v_proj"):
            raise UnsupportedModelError(f"layer {i} of {type(model).__name__} has no separate k_proj/v_proj")
        key = attn.k_norm if getattr(attn, "k_norm", None) is not None else attn.k_proj
        projs.append((key, attn.v_proj))
    return projs


def _fake_quant_batch(codec: KVCodec, out: torch.Tensor, kind: Kind, layer: int, geometry: AttentionGeometry):
    """out [batch, seq, num_kv_heads * head_dim] (a projection, a norm over all heads) or [batch, seq, num_kv_heads,
    head_dim] (a norm per head) -> its quantized copy; codecs work on one sequence at a time."""
    b, t = out.shape[:2]
    x = out.reshape(b, t, geometry.num_kv_heads, geometry.head_dim)
    return torch.stack([codec.fake_quant(x[i], kind, layer) for i in range(b)]).reshape(out.shape)


def _quantizing_hook(codec: KVCodec, kind: Kind, layer: int, geometry: AttentionGeometry):
    def hook(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return _fake_quant_batch(codec, out, kind, layer, geometry)

    return hook


def mixed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_q: torch.Tensor,
    value_q: torch.Tensor,
    key_exact: torch.Tensor,
    value_exact: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention where query i sees key/value j exactly where the masks say so, else quantized.

    query [B, Hq, T, D]; key, value, key_q, value_q [B, H, T, D] (keys post-RoPE); masks [T, T] bool.
    returns [B, T, Hq, D] float32.
    """
    b, hq, t, d = query.shape
    h = key.shape[1]
    q = query.float().reshape(b, h, hq // h, t, d)  # query heads grouped by their kv head
    scores_exact = torch.einsum("bhgid,bhjd->bhgij", q, key.float())
    scores_quant = torch.einsum("bhgid,bhjd->bhgij", q, key_q.float())
    scores = torch.where(key_exact, scores_exact, scores_quant) * scale
    causal = torch.ones(t, t, dtype=torch.bool, device=query.device).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    out = torch.einsum("bhgij,bhjd->bhgid", probs * value_exact, value.float())
    out = out + torch.einsum("bhgij,bhjd->bhgid", probs * ~value_exact, value_q.float())
    return out.reshape(b, hq, t, d).transpose(1, 2)


@contextmanager
def _order_aware(model: torch.nn.Module, codec: KVCodec, geometry: AttentionGeometry) -> Iterator[None]:
    from transformers import AttentionInterface

    quantized: dict[tuple[Kind, int], torch.Tensor] = {}
    rope: dict[str, torch.Tensor] = {}

    def keep_quantized(kind: Kind, layer: int):
        def hook(module, args, out):
            quantized[(kind, layer)] = _fake_quant_batch(codec, out, kind, layer, geometry)

        return hook

    def keep_rope(module, args, out):
        rope["cos"], rope["sin"] = out  # [B or 1, T, D] each

    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        b, _, t, d = key.shape
        if query.shape[2] != t:
            raise ValueError("the order-aware harness evaluates whole windows; no KV cache reuse")
        layer = module.layer_idx
        pre = quantized[("key", layer)].reshape(b, t, -1, d)
        cos, sin = (rope[n].expand(b, -1, -1) for n in ("cos", "sin"))  # batch 1 when positions are shared
        key_q = torch.stack([apply_rope(pre[i], cos[i], sin[i]) for i in range(b)]).transpose(1, 2)
        value_q = quantized[("value", layer)].reshape(b, t, -1, d).transpose(1, 2)
        key_exact, value_exact = (m.to(query.device) for m in codec.full_precision_masks(t))
        out = mixed_attention(query, key, value, key_q, value_q, key_exact, value_exact, scaling)
        return out.to(query.dtype), None

    AttentionInterface.register(MIXED_ATTENTION, attention)
    previous = model.config._attn_implementation
    handles = [model.model.rotary_emb.register_forward_hook(keep_rope)]
    try:
        for layer, (key_module, value_module) in enumerate(kv_projections(model)):
            handles.append(key_module.register_forward_hook(keep_quantized("key", layer)))
            handles.append(value_module.register_forward_hook(keep_quantized("value", layer)))
        model.set_attn_implementation(MIXED_ATTENTION)
        yield
    finally:
        model.set_attn_implementation(previous)
        for h in handles:
            h.remove()


@contextmanager
def fake_quantized(model: torch.nn.Module, codec: KVCodec) -> Iterator[None]:
    """Within the block, every layer's pre-RoPE K and V go through ``codec``."""
    geometry = attention_geometry(model.config)
    if codec.full_precision_masks(2) is not None:
        with _order_aware(model, codec, geometry):
            yield
        return
    handles = []
    try:
        for layer, (key_module, value_module) in enumerate(kv_projections(model)):
            handles.append(key_module.register_forward_hook(_quantizing_hook(codec, "key", layer, geometry)))
            handles.append(value_module.register_forward_hook(_quantizing_hook(codec, "value", layer, geometry)))
        yield
    finally:
        for h in handles:
            h.remove()
