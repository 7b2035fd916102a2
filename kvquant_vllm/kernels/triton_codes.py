"""Triton device functions over packed codes and page sections, shared by the store and decode kernels.

Codes follow :mod:`kvquant_vllm.quant.packing`: 8 codes of BITS bits fill BITS bytes, little-endian, so
channel c of a vector lies at bit (c % 8) * BITS of the word made of bytes (c // 8) * BITS ...
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvquant_vllm.quant.paged import PageLayout

SUPPORTED_BITS = (2, 3, 4)


def section_offsets(layout: PageLayout) -> dict[str, int]:
    """Byte offset of every section of a page, as the kernels' constexpr keyword arguments (``KEY_CODES=...``)."""
    return {name.upper(): offset for name, (offset, _, _) in layout.sections().items()}


def page_view(cache: torch.Tensor, layout: PageLayout) -> torch.Tensor:
    """``cache`` [num_blocks, ...] uint8 as [num_blocks, page bytes]; each page contiguous, 4-byte aligned
    (the fp16 and int32 sections are read in place)."""
    if cache.dtype != torch.uint8:
        raise TypeError(f"the kvquant cache must be uint8, got {cache.dtype}")
    pages = cache.view(cache.shape[0], -1)
    if pages.shape[1] < layout.page_size_bytes:
        raise ValueError(f"cache pages hold {pages.shape[1]} bytes, the layout needs {layout.page_size_bytes}")
    if pages.data_ptr() % 4 or pages.stride(0) % 4:
        raise ValueError("cache pages must start at 4-byte aligned addresses")
    if layout.bits not in SUPPORTED_BITS:
        raise ValueError(f"the Triton kernels take {SUPPORTED_BITS}-bit codes, not {layout.bits}")
    if layout.head_dim % 32 or layout.head_dim & (layout.head_dim - 1):
        raise ValueError(f"the Triton kernels need a power-of-two head dim >= 32, not {layout.head_dim}")
    return pages


@triton.jit
def unpack_tile(rows, FIRST_GROUP: tl.constexpr, GROUPS: tl.constexpr, BITS: tl.constexpr, ROWS: tl.constexpr, mask):
    """Codes of channels FIRST_GROUP * 8 .. (FIRST_GROUP + GROUPS) * 8 - 1 of ROWS packed vectors.

    rows: [ROWS] uint8 pointers to each vector's first byte; mask: [ROWS] (masked rows give code 0).
    Returns [ROWS, GROUPS * 8] int32.
    """
    group = FIRST_GROUP + tl.arange(0, GROUPS)
    word = tl.zeros([ROWS, GROUPS], tl.int32)
    for b in tl.static_range(BITS):
        byte = tl.load(rows[:, None] + group[None, :] * BITS + b, mask=mask[:, None], other=0)
        word = word | (byte.to(tl.int32) << (8 * b))
    shift = tl.arange(0, 8) * BITS
    codes = (word[:, :, None] >> shift[None, None, :]) & ((1 << BITS) - 1)
    return tl.reshape(codes, (ROWS, GROUPS * 8))


@triton.jit
def code_at(rows, channel, BITS: tl.constexpr, mask):
    """Code of one channel per vector: rows [N] uint8 pointers, channel [N] int32 -> [N] int32 (0 where masked)."""
    bit = (channel % 8) * BITS
    byte = rows + (channel // 8) * BITS + bit // 8
    lo = tl.load(byte, mask=mask, other=0).to(tl.int32)
    # A 3-bit code may straddle two bytes of its group.
    hi = tl.load(byte + 1, mask=mask & (bit % 8 + BITS > 8), other=0).to(tl.int32)
    return ((lo | (hi << 8)) >> (bit % 8)) & ((1 << BITS) - 1)


@triton.jit
def pack_store(rows, codes, mask, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BITS: tl.constexpr):
    """Pack codes [ROWS, HEAD_DIM] int32 (each < 2**BITS) and write them to rows [ROWS] uint8 pointers
    (HEAD_DIM * BITS / 8 bytes each) where mask [ROWS]."""
    GROUPS: tl.constexpr = HEAD_DIM // 8
    shift = tl.arange(0, 8) * BITS
    # The codes' bit fields do not overlap: their sum is their bitwise or.
    word = tl.sum(tl.reshape(codes.to(tl.uint32), (ROWS, GROUPS, 8)) << shift[None, None, :].to(tl.uint32), 2)
    group = tl.arange(0, GROUPS)
    for b in tl.static_range(BITS):
        tl.store(rows[:, None] + group[None, :] * BITS + b, ((word >> (8 * b)) & 0xFF).to(tl.uint8),
                 mask=mask[:, None])


@triton.jit
def nearest_code(x, book_ptr, NUM_CODES: tl.constexpr):
    """Index of the nearest entry of a sorted fp32 codebook [NUM_CODES] for every element of x (fp32): the
    number of midpoints (b[i] + b[i + 1]) / 2 below x, exactly as torch.bucketize on the midpoints counts."""
    code = tl.zeros(x.shape, tl.int32)
    below = tl.load(book_ptr)
    for i in tl.static_range(1, NUM_CODES):
        above = tl.load(book_ptr + i)
        code += (x > (above + below) * 0.5).to(tl.int32)
        below = above
    return code
