"""Asymmetric uniform (min/max) quantization, with its side data (scale, zero point) in fp16 or fp8."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvquant_vllm.quant.packing import pack_codes, pack_trits, packed_numel, unpack_codes, unpack_trits

SIDE_BITS = 16  # scale and zero point stored as fp16 unless a method says otherwise
SIDE_DTYPES = {16: torch.float16, 8: torch.float8_e4m3fn}


def code_bits(levels: int) -> float:
    """Storage per code of a ``levels``-level quantizer: log2 for powers of two, 1.6 for trits."""
    if levels == 3:
        return 8 / 5
    if levels < 2 or levels & (levels - 1) or levels > 256:
        raise ValueError(f"uniform quantization supports 3 or 2**b (b = 1..8) levels, got {levels}")
    return math.log2(levels)


def packed_code_bytes(n: int, levels: int) -> int:
    """Bytes that ``n`` codes of a ``levels``-level quantizer occupy once packed (trits five to a byte)."""
    if levels == 3:
        return math.ceil(n / 5)
    return packed_numel(n, int(code_bits(levels)))


def pack_levels(q: torch.Tensor, levels: int) -> torch.Tensor:
    """Codes [..., n] (values < levels) -> [..., packed_code_bytes(n, levels)] uint8."""
    return pack_trits(q) if levels == 3 else pack_codes(q, int(code_bits(levels)))


def unpack_levels(codes: torch.Tensor, levels: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_levels`: [..., n] uint8."""
    return unpack_trits(codes, n) if levels == 3 else unpack_codes(codes, int(code_bits(levels)), n)


def round_side(t: torch.Tensor, side_bits: int) -> torch.Tensor:
    """``t`` in the side data's storage type (fp16, or fp8 e4m3 saturating at its largest finite value)."""
    if side_bits not in SIDE_DTYPES:
        raise ValueError(f"side data is stored in {sorted(SIDE_DTYPES)} bits, not {side_bits}")
    dtype = SIDE_DTYPES[side_bits]
    big = torch.finfo(dtype).max
    return t.float().clamp(-big, big).to(dtype)


def uniform_side(lo: torch.Tensor, hi: torch.Tensor, levels: int, side_bits: int = SIDE_BITS):
    """(scale, zero) in the side data's type for slices spanning [lo, hi]; zero is the value of code 0.

    The zero point is rounded first so that the scale reaches ``hi`` from the zero point that is stored.
    """
    zero = round_side(lo, side_bits)
    info = torch.finfo(SIDE_DTYPES[side_bits])
    smallest = info.tiny * info.eps  # the smallest positive subnormal: a constant slice still has a scale
    scale = round_side(((hi - zero.float()) / (levels - 1)).clamp_min(smallest), side_bits)
    return scale, zero


def uniform_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, levels: int) -> torch.Tensor:
    """Codes uint8 of ``x`` with ``scale`` / ``zero`` broadcast to its shape; outside the range saturates."""
    return torch.round((x.float() - zero.float()) / scale.float()).clamp_(0, levels - 1).to(torch.uint8)


@dataclass
class UniformPacked:
    """A tensor quantized along ``dim``; ``codes`` packs that dimension moved last."""

    codes: torch.Tensor  # [..., packed length of n codes] uint8, reduced dim last
    scale: torch.Tensor  # [..., 1] fp16
    zero: torch.Tensor  # [..., 1] fp16, the value of code 0
    levels: int
    n: int
    dim: int


def quantize_uniform(x: torch.Tensor, levels: int, dim: int) -> UniformPacked:
    """Quantize ``x`` to ``levels`` evenly spaced levels, one (scale, zero) per slice along ``dim``.

    Each element is within ``scale / 2`` of its reconstruction, up to fp16 rounding of the side data.
    """
    code_bits(levels)
    xt = x.float().movedim(dim, -1)
    scale, zero = uniform_side(xt.amin(-1, keepdim=True), xt.amax(-1, keepdim=True), levels)
    codes = pack_levels(uniform_codes(xt, scale, zero, levels), levels)
    return UniformPacked(codes, scale, zero, levels, xt.shape[-1], dim)


def dequantize_uniform(p: UniformPacked) -> torch.Tensor:
    """Inverse of :func:`quantize_uniform`; float32, original layout."""
    q = unpack_levels(p.codes, p.levels, p.n)
    return (q.float() * p.scale.float() + p.zero.float()).movedim(-1, p.dim)
