"""Asymmetric uniform (min/max) quantization along one dimension, with fp16 side data."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvquant_vllm.quant.packing import pack_codes, unpack_codes

SIDE_BITS = 16  # scale and zero point are stored as fp16


@dataclass
class UniformPacked:
    """A tensor quantized along ``dim``; ``codes`` packs that dimension moved last."""

    codes: torch.Tensor  # [..., packed_numel(n, bits)] uint8, reduced dim last
    scale: torch.Tensor  # [..., 1] fp16
    zero: torch.Tensor  # [..., 1] fp16, the value of code 0
    bits: int
    n: int
    dim: int


def quantize_uniform(x: torch.Tensor, bits: int, dim: int) -> UniformPacked:
    """Quantize ``x`` with one (scale, zero) per slice along ``dim``.

    Each element is within ``scale / 2`` of its reconstruction, up to fp16 rounding of the side data.
    """
    xt = x.float().movedim(dim, -1)
    lo = xt.amin(-1, keepdim=True)
    hi = xt.amax(-1, keepdim=True)
    levels = (1 << bits) - 1
    # Round the side data to fp16 first so that encode and decode use the same numbers.
    zero = lo.to(torch.float16)
    scale = ((hi - zero.float()) / levels).clamp_min(1e-6).to(torch.float16)
    q = torch.round((xt - zero.float()) / scale.float()).clamp_(0, levels).to(torch.uint8)
    return UniformPacked(pack_codes(q, bits), scale, zero, bits, xt.shape[-1], dim)


def dequantize_uniform(p: UniformPacked) -> torch.Tensor:
    """Inverse of :func:`quantize_uniform`; float32, original layout."""
    q = unpack_codes(p.codes, p.bits, p.n).float()
    return (q * p.scale.float() + p.zero.float()).movedim(-1, p.dim)
