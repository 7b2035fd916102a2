"""Pass every layer's K and V of a Hugging Face causal LM through a codec.

Keys are tapped where attention takes them before the rotary embedding (:func:`tap_kv`: the output
of ``k_proj``, of ``k_norm`` where the model normalizes keys, or a fused ``qkv_proj``'s slice), so
codecs see **pre-RoPE** keys, as the vLLM backend does after undoing the rotation.

Methods whose cache depends on the token order (a window of recent tokens kept exact, past-only
quantization) declare, per query position, which keys and values it sees exactly
(:meth:`KVCodec.full_precision_masks`). For those the harness runs the window as if decoded token
by token: the projections pass through unchanged, the quantized K/V are kept aside, and an
attention function mixes exact and quantized scores and values by the masks.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch.utils.hooks import RemovableHandle

from kvquant_vllm.quant.codec import Kind, KVCodec
from kvquant_vllm.quant.geometry import UnsupportedModelError, attention_geometry
from kvquant_vllm.quant.rope import apply_rope

MIXED_ATTENTION = "kvquant_mixed"


KVTap = Callable[[Kind, int, torch.Tensor], torch.Tensor | None]


def tap_kv(model: torch.nn.Module, fn: KVTap) -> list[RemovableHandle]:
    """Forward hooks that hand ``fn(kind, layer, x)`` every layer's pre-RoPE keys and values, x [batch, seq,
    num_kv_heads, head_dim], where attention takes them: the output of ``k_norm`` (models that normalize keys
    before RoPE, as Qwen3 and OLMo2 do) or else of ``k_proj``, and of ``v_proj``; or their slices of a fused
    ``qkv_proj`` (Phi-3). A tensor that ``fn`` returns replaces x in the model, so gradients flow through it.
    Returns the hooks' handles (remove them to stop)."""
    geometry = attention_geometry(model.config)
    heads, dim = geometry.num_kv_heads, geometry.head_dim
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise UnsupportedModelError(f"{type(model).__name__}: expected decoder layers at model.model.layers")

    def separate(kind: Kind, layer: int):
        def hook(module, args, out):
            x = fn(kind, layer, out.reshape(*out.shape[:2], heads, dim))
            return None if x is None else x.reshape(out.shape)

        return hook

    def fused(layer: int):
        query = model.config.num_attention_heads * dim

        def hook(module, args, out):
            parts = list(out.split([query, heads * dim, heads * dim], dim=-1))
            replaced = False
            for i, kind in ((1, "key"), (2, "value")):
                x = fn(kind, layer, parts[i].reshape(*out.shape[:2], heads, dim))
                if x is not None:
                    parts[i], replaced = x.reshape(parts[i].shape), True
            return torch.cat(parts, dim=-1) if replaced else None  # no copy for taps that only read

        return hook

    handles = []
    try:
        for i, layer in enumerate(layers):
            attn = getattr(layer, "self_attn", None)
            key_norm = getattr(attn, "k_norm", None)
            if hasattr(attn, "k_proj") and hasattr(attn, "v_proj"):
                key = key_norm if key_norm is not None else attn.k_proj
                handles += [key.register_forward_hook(separate("key", i)),
                            attn.v_proj.register_forward_hook(separate("value", i))]
            elif hasattr(attn, "qkv_proj") and key_norm is None:
                handles.append(attn.qkv_proj.register_forward_hook(fused(i)))
            else:
                raise UnsupportedModelError(f"layer {i} of {type(model).__name__} has neither k_proj and v_proj nor "
                                            "a fused qkv_proj without a key norm")
    except UnsupportedModelError:
        for h in handles:
            h.remove()
        raise
    return handles


def _fake_quant_batch(codec: KVCodec, x: torch.Tensor, kind: Kind, layer: int) -> torch.Tensor:
    """x [batch, seq, num_kv_heads, head_dim] -> its quantized copy; codecs work on one sequence at a time."""
    return torch.stack([codec.fake_quant(x[i], kind, layer) for i in range(x.shape[0])])


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
def _order_aware(model: torch.nn.Module, codec: KVCodec) -> Iterator[None]:
    from transformers import AttentionInterface

    quantized: dict[tuple[Kind, int], torch.Tensor] = {}
    rope: dict[str, torch.Tensor] = {}

    def keep_quantized(kind: Kind, layer: int, x: torch.Tensor) -> None:
        quantized[(kind, layer)] = _fake_quant_batch(codec, x, kind, layer)

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
    handles = [model.model.rotary_emb.register_forward_hook(keep_rope), *tap_kv(model, keep_quantized)]
    try:
        model.set_attn_implementation(MIXED_ATTENTION)
        yield
    finally:
        model.set_attn_implementation(previous)
        for h in handles:
            h.remove()


@contextmanager
def fake_quantized(model: torch.nn.Module, codec: KVCodec) -> Iterator[None]:
    """Within the block, every layer's pre-RoPE K and V go through ``codec``."""
    if codec.full_precision_masks(2) is not None:
        with _order_aware(model, codec):
            yield
        return
    handles = tap_kv(model, lambda kind, layer, x: _fake_quant_batch(codec, x, kind, layer))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
