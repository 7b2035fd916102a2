"""vLLM's own 8-bit float KV caches (``--kv-cache-dtype fp8_e4m3`` / ``fp8_e5m2``; vLLM's ``fp8`` is e4m3).

Every key and value element is cast to fp8 after RoPE, with a per-tensor scale of 1.0: vLLM's scale when the
checkpoint brings none and ``calculate_kv_scales`` is off. The cast rounds to nearest and saturates at the
format's largest finite value, as vLLM's CUDA conversion does (torch's own cast turns out-of-range e5m2
elements into infinities; vLLM 0.32's CPU store truncates instead of rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvquant_vllm.quant.codec import Kind, KVCodec
from kvquant_vllm.quant.geometry import AttentionGeometry

FP8_FORMATS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def to_fp8(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` cast to the fp8 ``dtype``, rounded to nearest and saturated at its largest finite magnitude."""
    limit = torch.finfo(dtype).max
    return x.float().clamp(-limit, limit).to(dtype)


@dataclass
class FP8Packed:
    kind: Kind
    data: torch.Tensor  # [num_tokens, num_kv_heads, head_dim] fp8, keys after RoPE


class FP8Codec(KVCodec):
    """Per-element fp8, keys after RoPE (as vLLM's cache holds them)."""

    def __init__(self, fmt: str, geometry: AttentionGeometry) -> None:
        if fmt not in FP8_FORMATS:
            raise ValueError(f"unknown fp8 format {fmt!r}; known: {', '.join(FP8_FORMATS)}")
        self.name = f"fp8-{fmt}"
        self.dtype, self.rope = FP8_FORMATS[fmt], geometry.rope()

    def encode(self, x: torch.Tensor, kind: Kind, layer: int) -> FP8Packed:
        """x: [T, H, D] (keys pre-RoPE, the sequence starting at position 0)."""
        x = x.float()
        if kind == "key":
            x = self.rope.rotate(x, torch.arange(x.shape[0]))
        return FP8Packed(kind, to_fp8(x, self.dtype))

    def decode(self, p: FP8Packed) -> torch.Tensor:
        x = p.data.float()
        return self.rope.unrotate(x, torch.arange(x.shape[0])) if p.kind == "key" else x

    def bits_per_element(self, head_dim: int, seq_len: int) -> float:
        return 8.0
