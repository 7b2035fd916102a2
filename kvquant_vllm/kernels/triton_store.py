"""The kvquant store path as Triton kernels: post-RoPE keys and values of new tokens -> their page slots.

``_store_kernel``, one program per token (all its kv heads): undo RoPE (cos and sin of the token's position
given), normalise the keys per channel (calibrated) and the values per token after taking out their top-k
outliers (distance from the vector's median), find the nearest codebook entries, refit the values' scales and
offsets (least squares or moment matching; fixed-point sums, exact in any order), pack the codes and write each
head's segment of the page, the sink too at position 0. It also counts the token's key outliers per head and,
for each head's list, the entries of earlier tokens that stay (those a previous occupant left at this offset or
later go).

A head's key outliers are listed first come, first kept (quant.paged), so where a token's entries go is a prefix
sum over the tokens before it in its page: computed on the device between the two kernels, without a host sync.
``_key_outlier_kernel``, one program per token, then writes the token's entries of every head in channel order
while the head's list has room, and the last token of each page run writes the lists' counts.

The arithmetic is that of :meth:`PagedKVQuant.store` operation for operation, and the kernels are launched
without floating-point contraction, so they write the same bytes. (Where two value elements tie for the last
outlier place, the kernel takes the lower channel; torch.topk leaves that order open.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvquant_vllm.kernels.triton_codes import nearest_code, pack_store, page_view, section_offsets
from kvquant_vllm.quant import kvquant
from kvquant_vllm.quant.kvquant import run_starts
from kvquant_vllm.quant.pagestore import PagedKVQuant

LIST_CHUNK = 64  # key outlier list entries scanned per step
# The value refit's fixed-point numbers (quant.kvquant.to_fixed).
FIT_LIMIT, FIT_ONE = tl.constexpr(kvquant.FIT_LIMIT), tl.constexpr(kvquant.FIT_ONE)
ERROR_LIMIT, ERROR_ONE = tl.constexpr(kvquant.ERROR_LIMIT), tl.constexpr(kvquant.ERROR_ONE)


@triton.jit
def _key_outliers(kn, live, position, HAS_SINK: tl.constexpr):
    """Which normalised keys kn [HEADS_PAD, HEAD_DIM] are listed outliers: outside [-1, 1], on a live head,
    and not at position 0 when the sink holds that token."""
    outlier = (tl.abs(kn) > 1.0) & live[:, None]
    if HAS_SINK:
        outlier = outlier & (position != 0)
    return outlier


@triton.jit
def _to_fixed(x, LIMIT: tl.constexpr, ONE: tl.constexpr):
    """quant.kvquant.to_fixed: x fp32 clamped to [-LIMIT, LIMIT] (NaN to LIMIT), times ONE, truncated: int64."""
    x = tl.where(x < LIMIT, x, LIMIT)
    return (tl.where(x > -LIMIT, x, -LIMIT) * ONE).to(tl.int64)


@triton.jit
def _inlier_error(value, outlier, codes, book_ptr, scale, offset, unit):
    """quant.kvquant.inlier_error of rows value [ROWS, WIDTH] decoded with scale, offset [ROWS] fp32, in units
    of unit [ROWS] squared: [ROWS] int64."""
    error = tl.div_rn(value - (tl.load(book_ptr + codes) * scale[:, None] + offset[:, None]), unit[:, None])
    square = error * error
    square = tl.where(square < ERROR_LIMIT, square, ERROR_LIMIT)  # NaN too
    return tl.sum(tl.where(outlier, 0, (square * ERROR_ONE).to(tl.int64)), 1)


@triton.jit
def _refit_values(value, outlier, vn, codes, v_scale, v_offset, book_ptr, NUM_CODES: tl.constexpr,
                  ROUNDS: tl.constexpr, MATCH_MOMENTS: tl.constexpr):
    """quant.kvquant.refit_per_vector of value rows [ROWS, WIDTH] fp32 with their outlier flags, normalised by
    the range fit (vn), codes [ROWS, WIDTH] int32 and the range fit's fp16 v_scale, v_offset [ROWS]; book_ptr: the
    decode book. Returns (codes, v_scale, v_offset): of the lowest inlier squared error (least squares), or of
    the last round that fits (MATCH_MOMENTS)."""
    inlier = ~outlier
    s0, o0 = v_scale.to(tl.float32), v_offset.to(tl.float32)
    fixed_x = tl.where(inlier, _to_fixed(vn, FIT_LIMIT, FIT_ONE), 0)
    count = tl.sum(inlier.to(tl.int64), 1)
    sum_x = tl.sum(fixed_x, 1)
    if MATCH_MOMENTS:
        spread_x = count * tl.sum(fixed_x * fixed_x, 1) - sum_x * sum_x
    else:
        best = _inlier_error(value, outlier, codes, book_ptr, s0, o0, s0)
    current = codes
    scale, offset = v_scale, v_offset
    for _ in tl.static_range(ROUNDS):
        fixed_b = tl.where(inlier, _to_fixed(tl.load(book_ptr + current), FIT_LIMIT, FIT_ONE), 0)
        sum_b = tl.sum(fixed_b, 1)
        variance = count * tl.sum(fixed_b * fixed_b, 1) - sum_b * sum_b
        # Rows past the heads have no variance: divided by 1, their slope is a number (the others' is as torch's).
        divisor = tl.where(variance > 0, variance, 1).to(tl.float32)
        if MATCH_MOMENTS:
            slope = tl.sqrt_rn(tl.div_rn(spread_x.to(tl.float32), divisor))
        else:
            covariance = count * tl.sum(fixed_b * fixed_x, 1) - sum_b * sum_x
            slope = tl.div_rn(covariance.to(tl.float32), divisor)
        fit_scale = (s0 * slope).to(tl.float16)
        s = fit_scale.to(tl.float32)
        mean = tl.div_rn(sum_x.to(tl.float32) - tl.div_rn(s, s0) * sum_b.to(tl.float32), count.to(tl.float32) * FIT_ONE)
        fit_offset = (o0 + s0 * mean).to(tl.float16)
        o = fit_offset.to(tl.float32)
        fits = (variance > 0) & (s > 0) & (s < float("inf")) & (tl.abs(o) < float("inf"))
        fit_scale, fit_offset = tl.where(fits, fit_scale, v_scale), tl.where(fits, fit_offset, v_offset)
        s, o = fit_scale.to(tl.float32), fit_offset.to(tl.float32)
        current = nearest_code(tl.div_rn(value - o[:, None], s[:, None]), book_ptr, NUM_CODES)
        if MATCH_MOMENTS:
            take = fits
        else:
            error = _inlier_error(value, outlier, current, book_ptr, s, o, s0)
            take = error < best
            best = tl.where(take, error, best)
        codes = tl.where(take[:, None], current, codes)
        scale, offset = tl.where(take, fit_scale, scale), tl.where(take, fit_offset, offset)
    return codes, scale, offset


@triton.jit
def _store_kernel(
    cache_ptr, page_stride, key_ptr, key_stride_token, key_stride_head, value_ptr, value_stride_token,
    value_stride_head, slots_ptr, positions_ptr, cos_ptr, sin_ptr, rope_stride, inverse_gain, key_scale_ptr,
    key_offset_ptr, key_book_ptr, value_book_ptr, value_decode_book_ptr, key_pre_ptr, num_outliers_ptr, kept_ptr,
    KEY_CODES: tl.constexpr, VALUE_CODES: tl.constexpr, VALUE_SCALE: tl.constexpr, VALUE_OFFSET: tl.constexpr,
    VALUE_OUT_VAL: tl.constexpr, VALUE_OUT_IDX: tl.constexpr, KEY_OUT_VAL: tl.constexpr, KEY_OUT_POS: tl.constexpr,
    KEY_OUT_COUNT: tl.constexpr, SINK: tl.constexpr, HEAD_STRIDE: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BITS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, VALUE_OUTLIERS: tl.constexpr, VALUE_REFITS: tl.constexpr, MATCH_MOMENTS: tl.constexpr,
    HAS_SINK: tl.constexpr, KEY_CAP: tl.constexpr, LIST_CHUNK: tl.constexpr,
):
    token = tl.program_id(0)
    HALF: tl.constexpr = HEAD_DIM // 2
    PACKED: tl.constexpr = HEAD_DIM * BITS // 8
    NUM_CODES: tl.constexpr = 1 << BITS
    slot = tl.load(slots_ptr + token).to(tl.int64)
    if slot >= 0:  # negative slots are padding
        offset = slot % BLOCK_SIZE
        position = tl.load(positions_ptr + token)
        h = tl.arange(0, HEADS_PAD)
        d = tl.arange(0, HEAD_DIM)
        live = h < NUM_KV_HEADS
        hd = h[:, None] * HEAD_DIM + d[None, :]
        seg = cache_ptr + (slot // BLOCK_SIZE) * page_stride + h * HEAD_STRIDE  # [HEADS_PAD] segment starts

        # Keys: inverse RoPE, (x * cos - rotate_half(x) * sin) * inverse_gain, as quant.rope.Rope.unrotate.
        key_rows = key_ptr + token.to(tl.int64) * key_stride_token + h[:, None] * key_stride_head
        x = tl.load(key_rows + d[None, :], mask=live[:, None], other=0.0).to(tl.float32)
        partner = tl.load(key_rows + ((d + HALF) % HEAD_DIM)[None, :], mask=live[:, None], other=0.0).to(tl.float32)
        cos = tl.load(cos_ptr + token.to(tl.int64) * rope_stride + d)
        sin = tl.load(sin_ptr + token.to(tl.int64) * rope_stride + d)
        rotated_half = tl.where(d[None, :] < HALF, -partner, partner)
        key = (x * cos[None, :] - rotated_half * sin[None, :]) * inverse_gain
        tl.store(key_pre_ptr + token.to(tl.int64) * (NUM_KV_HEADS * HEAD_DIM) + hd, key, mask=live[:, None])
        key_scale = tl.load(key_scale_ptr + hd, mask=live[:, None], other=1.0)
        key_offset = tl.load(key_offset_ptr + hd, mask=live[:, None], other=0.0)
        kn = tl.div_rn(key - key_offset, key_scale)
        # Each channel's own book; rows past the heads read head 0's (their codes are not stored).
        key_books = key_book_ptr + tl.where(live[:, None], hd, 0) * NUM_CODES
        codes = nearest_code(tl.minimum(tl.maximum(kn, -1.0), 1.0), key_books, NUM_CODES)
        pack_store(seg + KEY_CODES + offset * PACKED, codes, live, HEADS_PAD, HEAD_DIM, BITS)
        if KEY_CAP > 0:
            outlier = _key_outliers(kn, live, position, HAS_SINK)
            tl.store(num_outliers_ptr + token * NUM_KV_HEADS + h, tl.sum(outlier.to(tl.int32), 1), mask=live)
            # Entries of earlier offsets stay; a list is in offset order, so they are its head.
            count = tl.load((seg + KEY_OUT_COUNT).to(tl.pointer_type(tl.int32)), mask=live, other=0)
            count = tl.minimum(tl.maximum(count, 0), KEY_CAP)
            kept = tl.zeros([HEADS_PAD], tl.int32)
            for e0 in range(0, tl.max(count, 0), LIST_CHUNK):
                e = e0 + tl.arange(0, LIST_CHUNK)
                listed = e[None, :] < count[:, None]
                pos = tl.load((seg + KEY_OUT_POS).to(tl.pointer_type(tl.uint16))[:, None] + e[None, :], mask=listed,
                              other=0).to(tl.int32)
                kept += tl.sum((listed & (pos // HEAD_DIM < offset)).to(tl.int32), 1)
            tl.store(kept_ptr + token * NUM_KV_HEADS + h, kept, mask=live)

        # Values: the VALUE_OUTLIERS elements farthest from the (lower) median are outliers; the inliers'
        # range gives the fp16 scale and offset.
        value_rows = value_ptr + token.to(tl.int64) * value_stride_token + h[:, None] * value_stride_head
        value = tl.load(value_rows + d[None, :], mask=live[:, None], other=0.0).to(tl.float32)
        median = tl.sum(tl.where(d[None, :] == (HEAD_DIM - 1) // 2, tl.sort(value, 1), 0.0), 1)  # torch.median's
        deviation = tl.abs(value - median[:, None])
        outlier = hd < 0  # [HEADS_PAD, HEAD_DIM], all False
        for _ in tl.static_range(VALUE_OUTLIERS):
            top = tl.argmax(tl.where(outlier, -1.0, deviation), 1)
            outlier = outlier | (d[None, :] == top[:, None])
        hi = tl.max(tl.where(outlier, float("-inf"), value), 1)
        lo = tl.min(tl.where(outlier, float("inf"), value), 1)
        v_offset = ((hi + lo) * 0.5).to(tl.float16)
        v_scale = tl.maximum((hi - lo) * 0.5, 1e-4).to(tl.float16)
        vn = tl.div_rn(value - v_offset.to(tl.float32)[:, None], v_scale.to(tl.float32)[:, None])
        codes = nearest_code(tl.minimum(tl.maximum(vn, -1.0), 1.0), value_book_ptr, NUM_CODES)
        if VALUE_REFITS > 0:
            codes, v_scale, v_offset = _refit_values(value, outlier, vn, codes, v_scale, v_offset,
                                                     value_decode_book_ptr, NUM_CODES, VALUE_REFITS, MATCH_MOMENTS)
        pack_store(seg + VALUE_CODES + offset * PACKED, codes, live, HEADS_PAD, HEAD_DIM, BITS)
        tl.store((seg + VALUE_SCALE).to(tl.pointer_type(tl.float16)) + offset, v_scale, mask=live)
        tl.store((seg + VALUE_OFFSET).to(tl.pointer_type(tl.float16)) + offset, v_offset, mask=live)
        # Outliers in ascending channel order, as the torch store lists them.
        for j in tl.static_range(VALUE_OUTLIERS):
            channel = tl.min(tl.where(outlier, d[None, :], HEAD_DIM), 1)
            picked = d[None, :] == channel[:, None]
            outlier = outlier & ~picked
            exact = tl.sum(tl.where(picked, value, 0.0), 1)
            tl.store(seg + VALUE_OUT_IDX + offset * VALUE_OUTLIERS + j, channel.to(tl.uint8), mask=live)
            tl.store((seg + VALUE_OUT_VAL).to(tl.pointer_type(tl.float16)) + offset * VALUE_OUTLIERS + j,
                     exact.to(tl.float16), mask=live)

        if HAS_SINK:
            if position == 0:
                sink = (seg + SINK).to(tl.pointer_type(tl.float16))[:, None] + d[None, :]
                tl.store(sink, key.to(tl.float16), mask=live[:, None])
                tl.store(sink + HEAD_DIM, value.to(tl.float16), mask=live[:, None])


@triton.jit
def _key_outlier_kernel(
    cache_ptr, page_stride, key_pre_ptr, slots_ptr, positions_ptr, key_scale_ptr, key_offset_ptr, first_ptr,
    last_ptr, KEY_OUT_VAL: tl.constexpr, KEY_OUT_POS: tl.constexpr, KEY_OUT_COUNT: tl.constexpr,
    HEAD_STRIDE: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, KEY_CAP: tl.constexpr, HAS_SINK: tl.constexpr,
):
    """Write token's key outliers of head h at entries first[token, h] onwards of h's list, while they fit."""
    token = tl.program_id(0)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    if slot >= 0:
        offset = slot % BLOCK_SIZE
        position = tl.load(positions_ptr + token)
        h = tl.arange(0, HEADS_PAD)
        d = tl.arange(0, HEAD_DIM)
        live = h < NUM_KV_HEADS
        hd = h[:, None] * HEAD_DIM + d[None, :]
        seg = cache_ptr + (slot // BLOCK_SIZE) * page_stride + h * HEAD_STRIDE
        key = tl.load(key_pre_ptr + token.to(tl.int64) * (NUM_KV_HEADS * HEAD_DIM) + hd, mask=live[:, None], other=0.0)
        key_scale = tl.load(key_scale_ptr + hd, mask=live[:, None], other=1.0)
        key_offset = tl.load(key_offset_ptr + hd, mask=live[:, None], other=0.0)
        outlier = _key_outliers(tl.div_rn(key - key_offset, key_scale), live, position, HAS_SINK).to(tl.int32)
        first = tl.load(first_ptr + token * NUM_KV_HEADS + h, mask=live, other=0)
        entry = first[:, None] + tl.cumsum(outlier, 1) - outlier  # channel order within each head
        write = (outlier > 0) & (entry < KEY_CAP)
        tl.store((seg + KEY_OUT_POS).to(tl.pointer_type(tl.uint16))[:, None] + entry,
                 (offset * HEAD_DIM + d[None, :]).to(tl.uint16), mask=write)
        tl.store((seg + KEY_OUT_VAL).to(tl.pointer_type(tl.float16))[:, None] + entry, key.to(tl.float16), mask=write)
        if tl.load(last_ptr + token) != 0:  # the page run's last token: the lists' new lengths
            end = first + tl.sum(outlier, 1)
            tl.store((seg + KEY_OUT_COUNT).to(tl.pointer_type(tl.int32)), tl.minimum(end, KEY_CAP), mask=live)


def store_tokens(
    cache: torch.Tensor, key_post_rope: torch.Tensor, value: torch.Tensor, slots: torch.Tensor,
    positions: torch.Tensor, store: PagedKVQuant, cos: torch.Tensor, sin: torch.Tensor, inverse_gain: float = 1.0,
) -> None:
    """Quantize new tokens into their page slots: what ``store.store(cache, rope.unrotate(key), value, slots,
    positions)`` writes, byte for byte.

    cache: [num_blocks, ...] uint8 pages of ``store``'s layout (tables on the same device);
    key_post_rope, value: [T, H, D] fp16/bf16/fp32 (last dim contiguous); slots: [T] int32/int64
    (block * block_size + offset, negative = padding); positions: [T] int32/int64; cos, sin: [T, D] float32,
    ``rope.cos_sin(positions)``; inverse_gain: ``rope.inverse_gain``.
    Tokens of one page must arrive in position order (as vLLM writes them).
    """
    lay = store.layout
    pages = page_view(cache, lay)
    num_tokens = slots.shape[0]
    if num_tokens == 0:
        return
    if key_post_rope.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError("keys and values must have a contiguous last dim")
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    device = cache.device
    h = lay.num_kv_heads
    key_pre = torch.empty(num_tokens, h, lay.head_dim, dtype=torch.float32, device=device)
    num_outliers = torch.zeros(num_tokens, h, dtype=torch.int32, device=device)
    kept = torch.zeros(num_tokens, h, dtype=torch.int32, device=device)
    key_scale, key_offset = store.key_scale.float().contiguous(), store.key_offset.float().contiguous()
    cap = lay.key_outlier_capacity
    sections = section_offsets(lay)
    shape = dict(NUM_KV_HEADS=h, HEADS_PAD=triton.next_power_of_2(h), HEAD_DIM=lay.head_dim,
                 BLOCK_SIZE=lay.block_size, HAS_SINK=store.sink, KEY_CAP=cap)
    _store_kernel[(num_tokens,)](
        pages, pages.stride(0), key_post_rope, key_post_rope.stride(0), key_post_rope.stride(1), value,
        value.stride(0), value.stride(1), slots, positions, cos, sin, cos.stride(0), inverse_gain,
        key_scale, key_offset, store.key_books[0].float().contiguous(), store.value_books[0].float().contiguous(),
        store.value_books[1].float().contiguous(), key_pre, num_outliers, kept, **sections, **shape, BITS=lay.bits,
        VALUE_OUTLIERS=lay.value_outliers_per_vector, VALUE_REFITS=store.value_refits,
        MATCH_MOMENTS=store.match_moments, LIST_CHUNK=LIST_CHUNK,
        enable_fp_fusion=False,  # a fused multiply-add rounds differently from the torch store
    )
    if cap == 0:
        return
    # Runs of tokens that share a page (padding slots form runs of their own, and write nothing).
    page = torch.where(slots >= 0, slots.long() // lay.block_size, -1)
    start = run_starts(page)
    before = num_outliers.long().cumsum(0) - num_outliers  # [T, H]: outliers of the batch's earlier tokens
    first = (kept.long()[start] + before - before[start]).to(torch.int32)
    last = torch.ones(num_tokens, dtype=torch.int32, device=device)
    last[:-1] = (page[1:] != page[:-1]).to(torch.int32)
    _key_outlier_kernel[(num_tokens,)](
        pages, pages.stride(0), key_pre, slots, positions, key_scale, key_offset, first, last,
        KEY_OUT_VAL=sections["KEY_OUT_VAL"], KEY_OUT_POS=sections["KEY_OUT_POS"],
        KEY_OUT_COUNT=sections["KEY_OUT_COUNT"], HEAD_STRIDE=sections["HEAD_STRIDE"], **shape, enable_fp_fusion=False,
    )
