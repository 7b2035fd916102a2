"""The kvquant store path as Triton kernels: post-RoPE keys and values of new tokens -> their page slots.

``_store_kernel``, one program per token (all its kv heads): undo RoPE at the token's position, normalise
the keys per channel (calibrated) and the values per token after taking out their top-k outliers
(distance from the vector's median), find the nearest codebook entries, pack the codes and write the
page, the sink too at position 0. It also counts the token's key outliers and, for the page's list,
the entries of earlier tokens that stay (those a previous occupant left at this offset or later go).

A page's key outliers are listed first come, first kept (quant.paged), so where a token's entries go is
a prefix sum over the tokens before it in its page: computed on the device between the two kernels,
without a host sync. ``_key_outlier_kernel``, one program per token, then writes the token's entries
in (head, channel) order while the list has room, and the last token of each page run writes its count.

The arithmetic is that of :meth:`PagedKVQuant.store` operation for operation, and the kernels are
launched without floating-point contraction, so they write the same bytes. (Where two value elements
tie for the last outlier place, the kernel takes the lower channel; torch.topk leaves that order open.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvquant_vllm.kernels.triton_codes import nearest_code, pack_store, page_view, section_offsets
from kvquant_vllm.quant.kvquant import run_starts
from kvquant_vllm.quant.pagestore import PagedKVQuant

LIST_CHUNK = 64  # key outlier list entries scanned per step


@triton.jit
def _lower_median(x, rows, live, ROWS: tl.constexpr, N: tl.constexpr):
    """Per row of x [ROWS, N] fp32 (also at rows [ROWS, 1] pointers, read again chunk by chunk): the element
    of rank (N - 1) // 2, torch.median's value. Ranks count smaller elements, equal ones by index."""
    CHUNK: tl.constexpr = 16
    i = tl.arange(0, N)
    rank = tl.zeros([ROWS, N], tl.int32)
    for j0 in tl.static_range(0, N, CHUNK):
        j = j0 + tl.arange(0, CHUNK)
        other = tl.load(rows + j[None, :], mask=live[:, None], other=0.0).to(tl.float32)[:, None, :]
        before = (other < x[:, :, None]) | ((other == x[:, :, None]) & (j[None, None, :] < i[None, :, None]))
        rank += tl.sum(before.to(tl.int32), 2)
    return tl.sum(tl.where(rank == (N - 1) // 2, x, 0.0), 1)


@triton.jit
def _key_outliers(kn, live, position, HAS_SINK: tl.constexpr):
    """Which normalised keys kn [HEADS_PAD, HEAD_DIM] are listed outliers: outside [-1, 1], on a live head,
    and not at position 0 when the sink holds that token."""
    outlier = (tl.abs(kn) > 1.0) & live[:, None]
    if HAS_SINK:
        outlier = outlier & (position != 0)
    return outlier


@triton.jit
def _list_positions(positions_ptr, e, mask, POSITION_BYTES: tl.constexpr):
    """Entries e of a key outlier position list (16-bit entries read unsigned) -> int32."""
    if POSITION_BYTES == 2:
        pos = tl.load(positions_ptr.to(tl.pointer_type(tl.uint16)) + e, mask=mask, other=0).to(tl.int32)
    else:
        pos = tl.load(positions_ptr.to(tl.pointer_type(tl.int32)) + e, mask=mask, other=0)
    return pos


@triton.jit
def _store_kernel(
    cache_ptr, page_stride, key_ptr, key_stride_token, key_stride_head, value_ptr, value_stride_token,
    value_stride_head, slots_ptr, positions_ptr, cos_sin_ptr, cos_sin_stride, key_scale_ptr, key_offset_ptr,
    key_book_ptr, value_book_ptr, key_pre_ptr, num_outliers_ptr, kept_ptr,
    KEY_CODES: tl.constexpr, VALUE_CODES: tl.constexpr, VALUE_SCALE: tl.constexpr, VALUE_OFFSET: tl.constexpr,
    VALUE_OUT_VAL: tl.constexpr, VALUE_OUT_IDX: tl.constexpr, KEY_OUT_VAL: tl.constexpr, KEY_OUT_POS: tl.constexpr,
    KEY_OUT_COUNT: tl.constexpr, SINK: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BITS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, VALUE_OUTLIERS: tl.constexpr, HAS_SINK: tl.constexpr, KEY_CAP: tl.constexpr,
    POSITION_BYTES: tl.constexpr, LIST_CHUNK: tl.constexpr,
):
    token = tl.program_id(0)
    HALF: tl.constexpr = HEAD_DIM // 2
    PACKED: tl.constexpr = HEAD_DIM * BITS // 8
    NUM_CODES: tl.constexpr = 1 << BITS
    slot = tl.load(slots_ptr + token).to(tl.int64)
    if slot >= 0:  # negative slots are padding
        page = cache_ptr + (slot // BLOCK_SIZE) * page_stride
        offset = slot % BLOCK_SIZE
        position = tl.load(positions_ptr + token).to(tl.int64)
        h = tl.arange(0, HEADS_PAD)
        d = tl.arange(0, HEAD_DIM)
        live = h < NUM_KV_HEADS
        hd = h[:, None] * HEAD_DIM + d[None, :]
        vec = offset * NUM_KV_HEADS + h  # (token, head) vector within the page's sections

        # Keys: inverse RoPE, x * cos - rotate_half(x) * sin, as quant.rope.invert_rope computes it.
        key_rows = key_ptr + token.to(tl.int64) * key_stride_token + h[:, None] * key_stride_head
        x = tl.load(key_rows + d[None, :], mask=live[:, None], other=0.0).to(tl.float32)
        partner = tl.load(key_rows + ((d + HALF) % HEAD_DIM)[None, :], mask=live[:, None], other=0.0).to(tl.float32)
        rope = cos_sin_ptr + position * cos_sin_stride + d % HALF
        cos = tl.load(rope).to(tl.float32)
        sin = tl.load(rope + HALF).to(tl.float32)
        rotated_half = tl.where(d[None, :] < HALF, -partner, partner)
        key = x * cos[None, :] - rotated_half * sin[None, :]
        tl.store(key_pre_ptr + token.to(tl.int64) * (NUM_KV_HEADS * HEAD_DIM) + hd, key, mask=live[:, None])
        key_scale = tl.load(key_scale_ptr + hd, mask=live[:, None], other=1.0)
        key_offset = tl.load(key_offset_ptr + hd, mask=live[:, None], other=0.0)
        kn = tl.div_rn(key - key_offset, key_scale)
        codes = nearest_code(tl.minimum(tl.maximum(kn, -1.0), 1.0), key_book_ptr, NUM_CODES)
        pack_store(page + KEY_CODES + vec * PACKED, codes, live, HEADS_PAD, HEAD_DIM, BITS)
        if KEY_CAP > 0:
            outlier = _key_outliers(kn, live, position, HAS_SINK)
            tl.store(num_outliers_ptr + token, tl.sum(tl.sum(outlier.to(tl.int32), 1), 0))
            # Entries of earlier offsets stay; the list is in offset order, so they are its head.
            count = tl.minimum(tl.maximum(tl.load((page + KEY_OUT_COUNT).to(tl.pointer_type(tl.int32))), 0), KEY_CAP)
            kept = tl.full([], 0, tl.int32)
            for e0 in range(0, count, LIST_CHUNK):
                e = e0 + tl.arange(0, LIST_CHUNK)
                listed = _list_positions(page + KEY_OUT_POS, e, e < count, POSITION_BYTES)
                stays = (e < count) & (listed >= 0) & (listed // (NUM_KV_HEADS * HEAD_DIM) < offset)
                kept += tl.sum(stays.to(tl.int32), 0)
            tl.store(kept_ptr + token, kept)

        # Values: the VALUE_OUTLIERS elements farthest from the (lower) median are outliers; the inliers'
        # range gives the fp16 scale and offset.
        value_rows = value_ptr + token.to(tl.int64) * value_stride_token + h[:, None] * value_stride_head
        value = tl.load(value_rows + d[None, :], mask=live[:, None], other=0.0).to(tl.float32)
        median = _lower_median(value, value_rows, live, HEADS_PAD, HEAD_DIM)
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
        pack_store(page + VALUE_CODES + vec * PACKED, codes, live, HEADS_PAD, HEAD_DIM, BITS)
        tl.store((page + VALUE_SCALE).to(tl.pointer_type(tl.float16)) + vec, v_scale, mask=live)
        tl.store((page + VALUE_OFFSET).to(tl.pointer_type(tl.float16)) + vec, v_offset, mask=live)
        # Outliers in ascending channel order, as the torch store lists them.
        for j in tl.static_range(VALUE_OUTLIERS):
            channel = tl.min(tl.where(outlier, d[None, :], HEAD_DIM), 1)
            picked = d[None, :] == channel[:, None]
            outlier = outlier & ~picked
            exact = tl.sum(tl.where(picked, value, 0.0), 1)
            tl.store(page + VALUE_OUT_IDX + vec * VALUE_OUTLIERS + j, channel.to(tl.uint8), mask=live)
            tl.store((page + VALUE_OUT_VAL).to(tl.pointer_type(tl.float16)) + vec * VALUE_OUTLIERS + j,
                     exact.to(tl.float16), mask=live)

        if HAS_SINK:
            if position == 0:
                sink = (page + SINK).to(tl.pointer_type(tl.float16)) + hd
                tl.store(sink, key.to(tl.float16), mask=live[:, None])
                tl.store(sink + NUM_KV_HEADS * HEAD_DIM, value.to(tl.float16), mask=live[:, None])


@triton.jit
def _key_outlier_kernel(
    cache_ptr, page_stride, key_pre_ptr, slots_ptr, positions_ptr, key_scale_ptr, key_offset_ptr, first_ptr,
    last_ptr, KEY_OUT_VAL: tl.constexpr, KEY_OUT_POS: tl.constexpr, KEY_OUT_COUNT: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    KEY_CAP: tl.constexpr, POSITION_BYTES: tl.constexpr, HAS_SINK: tl.constexpr,
):
    """Write token's key outliers at list entries first[token] onwards, while they fit."""
    token = tl.program_id(0)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    if slot >= 0:
        page = cache_ptr + (slot // BLOCK_SIZE) * page_stride
        offset = slot % BLOCK_SIZE
        position = tl.load(positions_ptr + token)
        h = tl.arange(0, HEADS_PAD)
        d = tl.arange(0, HEAD_DIM)
        live = h < NUM_KV_HEADS
        hd = h[:, None] * HEAD_DIM + d[None, :]
        key = tl.load(key_pre_ptr + token.to(tl.int64) * (NUM_KV_HEADS * HEAD_DIM) + hd, mask=live[:, None], other=0.0)
        key_scale = tl.load(key_scale_ptr + hd, mask=live[:, None], other=1.0)
        key_offset = tl.load(key_offset_ptr + hd, mask=live[:, None], other=0.0)
        outlier = _key_outliers(tl.div_rn(key - key_offset, key_scale), live, position, HAS_SINK)
        flat = tl.reshape(outlier.to(tl.int32), (HEADS_PAD * HEAD_DIM,))
        entry = tl.load(first_ptr + token) + tl.cumsum(flat, 0) - flat  # (head, channel) order
        write = (flat > 0) & (entry < KEY_CAP)
        within = offset * (NUM_KV_HEADS * HEAD_DIM) + tl.reshape(hd, (HEADS_PAD * HEAD_DIM,))
        if POSITION_BYTES == 2:
            tl.store((page + KEY_OUT_POS).to(tl.pointer_type(tl.uint16)) + entry, within.to(tl.uint16), mask=write)
        else:
            tl.store((page + KEY_OUT_POS).to(tl.pointer_type(tl.int32)) + entry, within.to(tl.int32), mask=write)
        tl.store((page + KEY_OUT_VAL).to(tl.pointer_type(tl.float16)) + entry,
                 tl.reshape(key, (HEADS_PAD * HEAD_DIM,)).to(tl.float16), mask=write)
        if tl.load(last_ptr + token) != 0:  # the page run's last token: the list's new length
            end = tl.load(first_ptr + token) + tl.sum(flat, 0)
            tl.store((page + KEY_OUT_COUNT).to(tl.pointer_type(tl.int32)), tl.minimum(end, KEY_CAP))


def store_tokens(
    cache: torch.Tensor, key_post_rope: torch.Tensor, value: torch.Tensor, slots: torch.Tensor,
    positions: torch.Tensor, store: PagedKVQuant, cos_sin_cache: torch.Tensor,
) -> None:
    """Quantize new tokens into their page slots: what ``store.store(cache, invert_rope(key), value, slots,
    positions)`` writes, byte for byte.

    cache: [num_blocks, ...] uint8 pages of ``store``'s layout (tables on the same device);
    key_post_rope, value: [T, H, D] fp16/bf16/fp32 (last dim contiguous); slots: [T] int32/int64
    (block * block_size + offset, negative = padding); positions: [T] int32/int64;
    cos_sin_cache: [max_position, D] (cos half | sin half).
    Tokens of one page must arrive in position order (as vLLM writes them).
    """
    lay = store.layout
    pages = page_view(cache, lay)
    num_tokens = slots.shape[0]
    if num_tokens == 0:
        return
    if key_post_rope.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError("keys and values must have a contiguous last dim")
    cos_sin_cache = cos_sin_cache.contiguous()
    device = cache.device
    key_pre = torch.empty(num_tokens, lay.num_kv_heads, lay.head_dim, dtype=torch.float32, device=device)
    num_outliers = torch.zeros(num_tokens, dtype=torch.int32, device=device)
    kept = torch.zeros(num_tokens, dtype=torch.int32, device=device)
    key_scale, key_offset = store.key_scale.float().contiguous(), store.key_offset.float().contiguous()
    cap = lay.key_outlier_capacity
    sections = section_offsets(lay)
    shape = dict(NUM_KV_HEADS=lay.num_kv_heads, HEADS_PAD=triton.next_power_of_2(lay.num_kv_heads),
                 HEAD_DIM=lay.head_dim, BLOCK_SIZE=lay.block_size, HAS_SINK=store.sink, KEY_CAP=cap,
                 POSITION_BYTES=lay.position_dtype.itemsize)
    _store_kernel[(num_tokens,)](
        pages, pages.stride(0), key_post_rope, key_post_rope.stride(0), key_post_rope.stride(1), value,
        value.stride(0), value.stride(1), slots, positions, cos_sin_cache, cos_sin_cache.stride(0),
        key_scale, key_offset, store.key_books[0].float().contiguous(), store.value_books[0].float().contiguous(),
        key_pre, num_outliers, kept, **sections, **shape, BITS=lay.bits,
        VALUE_OUTLIERS=lay.value_outliers_per_vector, LIST_CHUNK=LIST_CHUNK,
        enable_fp_fusion=False,  # a fused multiply-add rounds differently from the torch store
    )
    if cap == 0:
        return
    # Runs of tokens that share a page (padding slots form runs of their own, and write nothing).
    page = torch.where(slots >= 0, slots.long() // lay.block_size, -1)
    start = run_starts(page)
    before = num_outliers.long().cumsum(0) - num_outliers  # outliers of the batch's earlier tokens
    first = (kept.long()[start] + before - before[start]).to(torch.int32)
    last = torch.ones(num_tokens, dtype=torch.int32, device=device)
    last[:-1] = (page[1:] != page[:-1]).to(torch.int32)
    _key_outlier_kernel[(num_tokens,)](
        pages, pages.stride(0), key_pre, slots, positions, key_scale, key_offset, first, last,
        KEY_OUT_VAL=sections["KEY_OUT_VAL"], KEY_OUT_POS=sections["KEY_OUT_POS"],
        KEY_OUT_COUNT=sections["KEY_OUT_COUNT"], **shape, enable_fp_fusion=False,
    )
