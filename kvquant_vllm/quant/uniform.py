"""Asymmetric uniform (min/max) quantization along one dimension, with fp16 side data."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvquant_vllm.quant.packing import pack_codes, pack_trits, unpack_codes, unpack_trits

SIDE_BITS = 16  # scale and zero point are stored as fp16


def code_bits(levels: int) -> float:
    """Storage per code of a ``levels``-level quantizer: log2 for powers of two, 1.6 for trits."""
    if levels == 3:
        return 8 / 5
    if levels < 2 or levels & (levels - 1) or levels > 256:
        raise ValueError(f"uniform quantization supports 3 or 2**b (b = 1..8) levels, got {levels}")
    return math.log2(levels)


@dataclass
class UniformPacked:
    """A tensor quantized along ``dim``; ``codes`` packs that dimension moved last."""

    codes: torch.Tensor  # [..., packed length of n codes] uint8, reduced dim last
    scale: torch.Tensor  # [..., 1] fp16
    zero: torch.Tensor  # [..., 1] fp16, the value of code 0
    levels: int
    n: int
    dim: int


def quantize_uniform(x: torch.Tensor, levels: int, dim: int, clip: float = 1.0) -> UniformPacked:
    """Quantize ``x`` to ``levels`` evenly spaced levels, one (scale, zero) per slice along ``dim``.

    ``clip`` < 1 shrinks each slice's [min, max] around its midpoint first (elements outside
    saturate). Without clipping each element is within ``scale / 2`` of its reconstruction, up to
    fp16 rounding of the side data.
    """
    bits = code_bits(levels)
    xt = x.float().movedim(dim, -1)
    lo = xt.amin(-1, keepdim=True)
    hi = xt.amax(-1, keepdim=True)
    if clip != 1.0:
        mid, half = (hi + lo) / 2, (hi - lo) / 2 * clip
        lo, hi = mid - half, mid + half
    # Round the side data to fp16 first so that encode and decode use the same numbers.
    zero = lo.to(torch.float16)
    scale = ((hi - zero.float()) / (levels - 1)).clamp_min(1e-6).to(torch.float16)
    q = torch.round((xt - zero.float()) / scale.float()).clamp_(0, levels - 1).to(torch.uint8)
    codes = pack_trits(q) if levels == 3 else pack_codes(q, int(bits))
    return UniformPacked(codes, scale, zero, levels, xt.shape[-1], dim)


def dequantize_uniform(p: UniformPacked) -> torch.Tensor:
    """Inverse of :func:`quantize_uniform`; float32, original layout."""
    if p.levels == 3:
        q = unpack_trits(p.codes, p.n)
    else:
        q = unpack_codes(p.codes, int(code_bits(p.levels)), p.n)
    return (q.float() * p.scale.float() + p.zero.float()).movedim(-1, p.dim)
