"""Triton device functions over kvquant pages (layout version 2, :mod:`kvquant_vllm.quant.paged`), shared by the
store and the attention kernels: packed codes, one kv head's tile of dequantized keys and values, its key
outliers, and RoPE from inverse frequencies.

Codes are in bit planes (:func:`~kvquant_vllm.quant.packing.pack_code_planes`): channel c of a vector is bits
of word c % W of each plane, shifted by (c // W) * width, so a tile unpacks with one load of aligned 32-bit
words (the same word for the channels that share it), one shift and one mask per plane.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kvquant_vllm.quant.paged import PageLayout

SUPPORTED_BITS = (2, 3, 4)
TWO_PI = tl.constexpr(2 * math.pi)


def section_offsets(layout: PageLayout) -> dict[str, int]:
    """Byte offset of every section within a head's segment, and the segments' stride, as the kernels'
    constexpr keyword arguments (``KEY_CODES=...``, ``HEAD_STRIDE=...``)."""
    offsets = {name.upper(): offset for name, (offset, _, _) in layout.sections().items()}
    return offsets | {"HEAD_STRIDE": layout.head_stride}


def page_view(cache: torch.Tensor, layout: PageLayout) -> torch.Tensor:
    """``cache`` [num_blocks, ...] uint8 as [num_blocks, page bytes]; each page contiguous and 16-byte aligned
    (sections are read in place with aligned vector loads)."""
    if cache.dtype != torch.uint8:
        raise TypeError(f"the kvquant cache must be uint8, got {cache.dtype}")
    pages = cache.view(cache.shape[0], -1)
    if pages.shape[1] < layout.page_size_bytes:
        raise ValueError(f"cache pages hold {pages.shape[1]} bytes, the layout needs {layout.page_size_bytes}")
    if pages.data_ptr() % 16 or pages.stride(0) % 16:
        raise ValueError("cache pages must start at 16-byte aligned addresses")
    if layout.bits not in SUPPORTED_BITS:
        raise ValueError(f"the Triton kernels take {SUPPORTED_BITS}-bit codes, not {layout.bits}")
    if layout.head_dim & (layout.head_dim - 1):
        raise ValueError(f"the Triton kernels need a power-of-two head dim, not {layout.head_dim}")
    return pages


# ------------------------------------------------------------------------------------------------ codes
@triton.jit
def unpack_codes(rows, channel, mask, HEAD_DIM: tl.constexpr, BITS: tl.constexpr):
    """Codes of channels ``channel`` [C] int32 of the packed vectors at ``rows`` [R] (uint8 pointers, 4-byte
    aligned); mask [R] (masked rows give code 0). Returns [R, C] int32."""
    WIDTH: tl.constexpr = BITS - BITS % 2  # the low plane: 2 bits (2- and 3-bit codes) or 4
    WORDS: tl.constexpr = HEAD_DIM * WIDTH // 32
    words = rows.to(tl.pointer_type(tl.int32))[:, None]
    word = tl.load(words + (channel % WORDS)[None, :], mask=mask[:, None], other=0)
    code = (word >> ((channel // WORDS) * WIDTH)[None, :]) & ((1 << WIDTH) - 1)
    if BITS == 3:  # the third bit from the 1-bit plane
        HIGH: tl.constexpr = HEAD_DIM // 32
        word = tl.load(words + WORDS + (channel % HIGH)[None, :], mask=mask[:, None], other=0)
        code = code | (((word >> (channel // HIGH)[None, :]) & 1) << 2)
    return code


@triton.jit
def code_at(rows, channel, mask, HEAD_DIM: tl.constexpr, BITS: tl.constexpr):
    """Code of one channel per vector: rows [N] uint8 pointers, channel [N] int32 -> [N] int32 (0 where masked)."""
    WIDTH: tl.constexpr = BITS - BITS % 2  # the low plane: 2 bits (2- and 3-bit codes) or 4
    WORDS: tl.constexpr = HEAD_DIM * WIDTH // 32
    words = rows.to(tl.pointer_type(tl.int32))
    word = tl.load(words + channel % WORDS, mask=mask, other=0)
    code = (word >> ((channel // WORDS) * WIDTH)) & ((1 << WIDTH) - 1)
    if BITS == 3:
        HIGH: tl.constexpr = HEAD_DIM // 32
        word = tl.load(words + WORDS + channel % HIGH, mask=mask, other=0)
        code = code | (((word >> (channel // HIGH)) & 1) << 2)
    return code


@triton.jit
def pack_store(rows, codes, mask, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BITS: tl.constexpr):
    """Pack codes [ROWS, HEAD_DIM] int32 (each < 2**BITS) in bit planes and write them to rows [ROWS] uint8
    pointers (4-byte aligned, HEAD_DIM * BITS / 8 bytes each) where mask [ROWS]."""
    WIDTH: tl.constexpr = BITS - BITS % 2  # the low plane: 2 bits (2- and 3-bit codes) or 4
    WORDS: tl.constexpr = HEAD_DIM * WIDTH // 32
    words = rows.to(tl.pointer_type(tl.int32))[:, None]
    # Channel c = k * WORDS + w goes to word w at bit k * WIDTH: a [ROWS, 32 / WIDTH, WORDS] view of the codes.
    # The fields do not overlap: their sum is their bitwise or.
    field = tl.reshape(codes & ((1 << WIDTH) - 1), (ROWS, 32 // WIDTH, WORDS))
    shift = (tl.arange(0, 32 // WIDTH) * WIDTH)[None, :, None]
    word = tl.sum(field.to(tl.uint32) << shift.to(tl.uint32), 1)
    tl.store(words + tl.arange(0, WORDS)[None, :], word.to(tl.int32, bitcast=True), mask=mask[:, None])
    if BITS == 3:
        HIGH: tl.constexpr = HEAD_DIM // 32
        field = tl.reshape((codes >> 2) & 1, (ROWS, 32, HIGH))
        word = tl.sum(field.to(tl.uint32) << tl.arange(0, 32)[None, :, None].to(tl.uint32), 1)
        tl.store(words + WORDS + tl.arange(0, HIGH)[None, :], word.to(tl.int32, bitcast=True), mask=mask[:, None])


@triton.jit
def nearest_code(x, book_ptr, NUM_CODES: tl.constexpr):
    """Index of the nearest entry of a sorted fp32 codebook [NUM_CODES] for every element of x (fp32): the
    number of midpoints (b[i] + b[i + 1]) / 2 below x, exactly as torch.bucketize on the midpoints counts.
    book_ptr: one book for all, or a tensor of pointers shaped as x, each element's own book."""
    code = tl.zeros(x.shape, tl.int32)
    below = tl.load(book_ptr)
    for i in tl.static_range(1, NUM_CODES):
        above = tl.load(book_ptr + i)
        code += (x > (above + below) * 0.5).to(tl.int32)
        below = above
    return code


# ------------------------------------------------------------------------------------------------- RoPE
@triton.jit
def rope_cos_sin(position, inv_freq):
    """cos and sin of the angles position * inv_freq (position: int tensor, inv_freq: fp32, broadcastable),
    fp32. The product is exact in float64 and reduced modulo 2 pi there, so the angle is as exact at position
    100,000 as at 1; cos and sin then run in fp32 on [-pi, pi]."""
    angle = position.to(tl.float64) * inv_freq.to(tl.float64)
    two_pi = tl.full([], TWO_PI, tl.float64)
    turns = tl.floor(angle / two_pi + 0.5)
    reduced = (angle - turns * two_pi).to(tl.float32)
    return tl.cos(reduced), tl.sin(reduced)


@triton.jit
def rotate_back(x_lo, x_hi, cos, sin):
    """R^T x for rows x = (x_lo, x_hi) [R, D/2] rotated by the angles of cos, sin [D/2]: what a query must be to
    score against keys rotated by R as the unrotated query scores against them."""
    return x_lo * cos[None, :] + x_hi * sin[None, :], x_hi * cos[None, :] - x_lo * sin[None, :]


# ----------------------------------------------------------------------------------------------- tiles
@triton.jit
def _dot(a, b, DTYPE: tl.constexpr):
    """a @ b accumulated in fp32: exact fp32 products for fp32 activations, tensor-core inputs of the
    activations' 16-bit dtype otherwise."""
    if DTYPE == tl.float32:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        r = tl.dot(a.to(DTYPE), b.to(DTYPE))
    return r


@triton.jit
def key_tile(
    seg, t, valid, first_entry, count, scale_lo, offset_lo, scale_hi, offset_hi, book_ptr, key_scale_ptr,
    key_offset_ptr,
    KEY_CODES: tl.constexpr, KEY_OUT_VAL: tl.constexpr, KEY_OUT_POS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BITS: tl.constexpr, KEY_CAP: tl.constexpr, OUTLIER_CHUNK: tl.constexpr, DTYPE: tl.constexpr,
):
    """Pre-RoPE keys of tokens t [TILE] (int32 offsets within the page, ascending and contiguous) of the kv head
    whose page segment starts at ``seg``, in halves k_lo, k_hi [TILE, D/2] fp32 (rows where not valid: any
    finite value), with the head's listed key outliers in place. book_ptr: the head's codebooks [D, 2**BITS].

    The outlier list is in (t, d) order: the tile's entries start at ``first_entry`` (the first entry at or after
    t[0]); ``count`` is the list's length. Each entry replaces its dense value: the tile gets the exact-minus-dense
    differences through a one-hot product (no scatter in registers), so an entry costs TILE + D / 2 compares.
    Returns k_lo, k_hi and the first entry after the tile.
    """
    HALF: tl.constexpr = HEAD_DIM // 2
    PACKED: tl.constexpr = HEAD_DIM * BITS // 8
    CODES: tl.constexpr = 1 << BITS
    dh = tl.arange(0, HALF)
    rows = seg + KEY_CODES + t * PACKED
    book_lo = book_ptr + dh[None, :] * CODES
    book_hi = book_ptr + (dh[None, :] + HALF) * CODES
    k_lo = tl.load(book_lo + unpack_codes(rows, dh, valid, HEAD_DIM, BITS)) * scale_lo[None, :] + offset_lo[None, :]
    k_hi = (tl.load(book_hi + unpack_codes(rows, dh + HALF, valid, HEAD_DIM, BITS)) * scale_hi[None, :]
            + offset_hi[None, :])
    entry = first_entry
    if KEY_CAP > 0:
        end_t = tl.max(t, 0) + 1
        more = entry < count
        while more:
            e = entry + tl.arange(0, OUTLIER_CHUNK)
            pos = tl.load((seg + KEY_OUT_POS).to(tl.pointer_type(tl.uint16)) + e, mask=e < count, other=0).to(tl.int32)
            t_e = pos // HEAD_DIM
            c_e = pos % HEAD_DIM
            live = (e < count) & (t_e < end_t)
            exact = tl.load((seg + KEY_OUT_VAL).to(tl.pointer_type(tl.float16)) + e, mask=live, other=0.0)
            code = code_at(seg + KEY_CODES + t_e * PACKED, c_e, live, HEAD_DIM, BITS)
            dense = (tl.load(book_ptr + c_e * CODES + code)
                     * tl.load(key_scale_ptr + c_e, mask=live, other=0.0)
                     + tl.load(key_offset_ptr + c_e, mask=live, other=0.0))
            delta = tl.where(live, exact.to(tl.float32) - dense, 0.0)  # [CHUNK]
            hit = ((t[:, None] == t_e[None, :]) & live[None, :]).to(tl.float32)  # [TILE, CHUNK]
            k_lo += _dot(hit, tl.where(c_e[:, None] == dh[None, :], delta[:, None], 0.0), DTYPE)
            k_hi += _dot(hit, tl.where(c_e[:, None] == dh[None, :] + HALF, delta[:, None], 0.0), DTYPE)
            taken = tl.sum(live.to(tl.int32), 0)
            entry += taken
            more = (taken == OUTLIER_CHUNK) & (entry < count)
    return k_lo, k_hi, entry


@triton.jit
def value_tile(seg, t, valid, book_ptr, VALUE_CODES: tl.constexpr, VALUE_SCALE: tl.constexpr,
               VALUE_OFFSET: tl.constexpr, VALUE_OUT_VAL: tl.constexpr, VALUE_OUT_IDX: tl.constexpr,
               HEAD_DIM: tl.constexpr, BITS: tl.constexpr, VALUE_OUTLIERS: tl.constexpr):
    """Values of tokens t [TILE] of the kv head at ``seg``: [TILE, D] fp32, 0 in rows that are not valid (masked
    loads: a page's unwritten slots may hold NaN, and 0 * NaN is not 0)."""
    PACKED: tl.constexpr = HEAD_DIM * BITS // 8
    d = tl.arange(0, HEAD_DIM)
    v = tl.load(book_ptr + unpack_codes(seg + VALUE_CODES + t * PACKED, d, valid, HEAD_DIM, BITS))
    v_scale = tl.load((seg + VALUE_SCALE).to(tl.pointer_type(tl.float16)) + t, mask=valid, other=0.0)
    v_offset = tl.load((seg + VALUE_OFFSET).to(tl.pointer_type(tl.float16)) + t, mask=valid, other=0.0)
    v = v * v_scale.to(tl.float32)[:, None] + v_offset.to(tl.float32)[:, None]
    for j in tl.static_range(VALUE_OUTLIERS):
        idx = tl.load(seg + VALUE_OUT_IDX + t * VALUE_OUTLIERS + j, mask=valid, other=0).to(tl.int32)
        exact = tl.load((seg + VALUE_OUT_VAL).to(tl.pointer_type(tl.float16)) + t * VALUE_OUTLIERS + j, mask=valid,
                        other=0.0)
        v = tl.where(d[None, :] == idx[:, None], exact.to(tl.float32)[:, None], v)
    return v
