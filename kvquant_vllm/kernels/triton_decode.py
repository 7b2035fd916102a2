"""Triton paged decode attention straight from kvquant pages, and an fp16 paged baseline of the same structure.

Grid: (sequence, kv head, split). A program handles every query head of its kv head (GQA; the rows are
padded to 16 for tl.dot) over a contiguous range of the sequence's pages (split-K: with more than one
split, a second kernel merges the partial results), in tiles of TILE tokens with an online softmax in
the exp2 domain.

Per tile of a kvquant page: unpack the key and value codes, look them up in the decode codebooks, scale
per channel (keys, calibrated) or per token (values, fp16 in the page), put the value outliers and the
sink (position 0) in place, rotate the keys at their positions (rotate-half RoPE) and attend.

The key outliers are a per-page list in no particular order, so rather than patching the key tile they
enter as logit corrections: an outlier at (token t, channel c) with exact value x where the dense part
decodes y changes q . R_t k by (R_t^T q)[c] * (x - y). Before a page's tiles, a program adds the
corrections of its kv head's outliers into a small fp32 scratch [GQA, block_size] of its own (with
atomics: several outliers may share a token); the tiles read them back and clear them.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kvquant_vllm.kernels.triton_codes import code_at, page_view, section_offsets, unpack_tile
from kvquant_vllm.quant.pagestore import PagedKVQuant

LOG2E = 1.4426950408889634
OUTLIER_CHUNK = 64  # key outlier entries handled per step
REDUCE_CHUNK = 16  # splits merged per step
TILE_ELEMENTS = 4096  # tokens x head dim of one tile: bounds the registers that a dequantized tile takes


@triton.jit
def _dot(a, b, DTYPE: tl.constexpr):
    """a @ b accumulated in fp32: exact fp32 products for fp32 queries, tensor-core inputs of the query's
    16-bit dtype otherwise."""
    if DTYPE == tl.float32:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        r = tl.dot(a.to(DTYPE), b.to(DTYPE))
    return r


@triton.jit
def _program(seq_lens_ptr, pages_per_split, BLOCK_SIZE: tl.constexpr, GQA: tl.constexpr, GQA_PAD: tl.constexpr):
    """This program's sequence, kv head and split; the sequence's length; the split's pages
    [first_page, last_page); the query heads it serves: rows g [GQA_PAD], their mask, their head ids hq."""
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    first_page = split * pages_per_split
    last_page = tl.minimum(first_page + pages_per_split, tl.cdiv(seq_len, BLOCK_SIZE))
    g = tl.arange(0, GQA_PAD)
    return seq, kvh, split, seq_len, first_page, last_page, g, g < GQA, kvh * GQA + g


@triton.jit
def _softmax_step(s, v, valid, m_i, l_i, acc, DTYPE: tl.constexpr):
    """Online softmax over one tile: s [G, TILE] logits (log2 units), v [TILE, D] fp32, valid [TILE];
    running max m_i [G], sum l_i [G] and unnormalised output acc [G, D]. Invalid rows of v must be finite
    (the callers' masked loads make them 0): a page's unwritten slots may hold NaN, and 0 * NaN is not 0."""
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None] + _dot(p, v, DTYPE)


@triton.jit
def _write_result(out_ptr, acc_ptr, max_ptr, sum_ptr, seq, split, hq, gmask, m_i, l_i, acc,
                  NUM_Q_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr):
    """The output rows of query heads hq [G] (NUM_SPLITS == 1) or this split's partial results."""
    d = tl.arange(0, HEAD_DIM)
    if NUM_SPLITS == 1:
        row = seq * NUM_Q_HEADS + hq
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + row[:, None] * HEAD_DIM + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=gmask[:, None])
    else:
        row = (seq * NUM_Q_HEADS + hq) * NUM_SPLITS + split
        tl.store(acc_ptr + row[:, None] * HEAD_DIM + d[None, :], acc, mask=gmask[:, None])
        tl.store(max_ptr + row, m_i, mask=gmask)
        tl.store(sum_ptr + row, l_i, mask=gmask)


@triton.jit
def _reduce_splits_kernel(out_ptr, acc_ptr, max_ptr, sum_ptr, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
                          CHUNK: tl.constexpr):
    """Grid (num_seqs * num_q_heads,): merge the splits of one output row."""
    row = tl.program_id(0)
    s = tl.arange(0, CHUNK)
    d = tl.arange(0, HEAD_DIM)
    m_run = tl.full([CHUNK], float("-inf"), tl.float32)
    for s0 in range(0, NUM_SPLITS, CHUNK):
        m_run = tl.maximum(m_run, tl.load(max_ptr + row * NUM_SPLITS + s0 + s, mask=s0 + s < NUM_SPLITS,
                                          other=float("-inf")))
    m = tl.max(m_run, 0)
    total = tl.zeros([CHUNK], tl.float32)
    acc = tl.zeros([CHUNK, HEAD_DIM], tl.float32)
    for s0 in range(0, NUM_SPLITS, CHUNK):
        live = s0 + s < NUM_SPLITS
        m_s = tl.load(max_ptr + row * NUM_SPLITS + s0 + s, mask=live, other=float("-inf"))
        w = tl.where(m_s > float("-inf"), tl.exp2(m_s - m), 0.0)  # empty splits weigh nothing
        total += w * tl.load(sum_ptr + row * NUM_SPLITS + s0 + s, mask=live, other=0.0)
        rows = (row * NUM_SPLITS + s0 + s)[:, None] * HEAD_DIM + d[None, :]
        acc += w[:, None] * tl.load(acc_ptr + rows, mask=live[:, None], other=0.0)
    total_sum = tl.sum(total, 0)
    out = tl.sum(acc, 0) / tl.where(total_sum > 0, total_sum, 1.0)
    tl.store(out_ptr + row * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty))


@triton.jit
def _add_key_outlier_logits(
    scratch, page, page_idx, seq_len, kvh, q_rows, g, gmask, key_scale_ptr, key_offset_ptr, key_book_ptr,
    cos_sin_ptr, cos_sin_stride, qk_scale,
    KEY_CODES: tl.constexpr, KEY_OUT_VAL: tl.constexpr, KEY_OUT_POS: tl.constexpr, KEY_OUT_COUNT: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BITS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    KEY_CAP: tl.constexpr, POSITION_BYTES: tl.constexpr, HAS_SINK: tl.constexpr, CHUNK: tl.constexpr,
):
    """Add the logit corrections of the page's key outliers of kv head kvh to scratch [G, BLOCK_SIZE] fp32."""
    HALF: tl.constexpr = HEAD_DIM // 2
    count = tl.load((page + KEY_OUT_COUNT).to(tl.pointer_type(tl.int32)))
    count = tl.minimum(tl.maximum(count, 0), KEY_CAP)
    tl.debug_barrier()  # the previous page's tiles have read and cleared the scratch
    for e0 in range(0, count, CHUNK):
        e = e0 + tl.arange(0, CHUNK)
        live = e < count
        if POSITION_BYTES == 2:
            pos = tl.load((page + KEY_OUT_POS).to(tl.pointer_type(tl.uint16)) + e, mask=live, other=0).to(tl.int32)
        else:
            pos = tl.load((page + KEY_OUT_POS).to(tl.pointer_type(tl.int32)) + e, mask=live, other=0)
        exact = tl.load((page + KEY_OUT_VAL).to(tl.pointer_type(tl.float16)) + e, mask=live, other=0.0)
        t = pos // (NUM_KV_HEADS * HEAD_DIM)
        c = pos % HEAD_DIM
        token = page_idx * BLOCK_SIZE + t
        live = live & (pos >= 0) & (t < BLOCK_SIZE) & ((pos // HEAD_DIM) % NUM_KV_HEADS == kvh) & (token < seq_len)
        if HAS_SINK:
            live = live & (token != 0)  # position 0 is the sink's, outliers and all
        code = code_at(page + KEY_CODES + (t * NUM_KV_HEADS + kvh) * (HEAD_DIM * BITS // 8), c, BITS, live)
        dense = (tl.load(key_book_ptr + code) * tl.load(key_scale_ptr + kvh * HEAD_DIM + c, mask=live, other=0.0)
                 + tl.load(key_offset_ptr + kvh * HEAD_DIM + c, mask=live, other=0.0))
        rope = cos_sin_ptr + token * cos_sin_stride + c % HALF
        cos = tl.load(rope, mask=live, other=0.0).to(tl.float32)
        sin = tl.load(rope + HALF, mask=live, other=0.0).to(tl.float32)
        # (R_t^T q)[c] = q[c] cos + q[c + D/2] sin for c < D/2, q[c] cos - q[c - D/2] sin for c >= D/2.
        sin = tl.where(c < HALF, sin, -sin)
        both = gmask[:, None] & live[None, :]
        q_c = tl.load(q_rows[:, None] + c[None, :], mask=both, other=0.0).to(tl.float32)
        q_partner = tl.load(q_rows[:, None] + ((c + HALF) % HEAD_DIM)[None, :], mask=both, other=0.0).to(tl.float32)
        delta = tl.where(live, exact.to(tl.float32) - dense, 0.0) * qk_scale
        tl.atomic_add(scratch + g[:, None] * BLOCK_SIZE + t[None, :],
                      (q_c * cos[None, :] + q_partner * sin[None, :]) * delta[None, :], mask=both, sem="relaxed")
    tl.debug_barrier()  # every correction of the page is in place before its tiles read them


@triton.jit
def _kvquant_decode_kernel(
    out_ptr, acc_ptr, max_ptr, sum_ptr, query_ptr, q_stride_seq, q_stride_head, cache_ptr, page_stride,
    block_table_ptr, block_table_stride, seq_lens_ptr, key_scale_ptr, key_offset_ptr, key_book_ptr, value_book_ptr,
    cos_sin_ptr, cos_sin_stride, scratch_ptr, qk_scale, pages_per_split,
    KEY_CODES: tl.constexpr, VALUE_CODES: tl.constexpr, VALUE_SCALE: tl.constexpr, VALUE_OFFSET: tl.constexpr,
    VALUE_OUT_VAL: tl.constexpr, VALUE_OUT_IDX: tl.constexpr, KEY_OUT_VAL: tl.constexpr, KEY_OUT_POS: tl.constexpr,
    KEY_OUT_COUNT: tl.constexpr, SINK: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BITS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr, GQA: tl.constexpr, GQA_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr, KEY_CAP: tl.constexpr,
    VALUE_OUTLIERS: tl.constexpr, POSITION_BYTES: tl.constexpr, HAS_SINK: tl.constexpr, OUTLIER_CHUNK: tl.constexpr,
):
    seq, kvh, split, seq_len, first_page, last_page, g, gmask, hq = _program(seq_lens_ptr, pages_per_split,
                                                                            BLOCK_SIZE, GQA, GQA_PAD)
    HALF: tl.constexpr = HEAD_DIM // 2
    HALF_GROUPS: tl.constexpr = HEAD_DIM // 16  # groups of 8 codes in half a vector
    PACKED: tl.constexpr = HEAD_DIM * BITS // 8
    NUM_Q_HEADS: tl.constexpr = NUM_KV_HEADS * GQA
    DTYPE = query_ptr.dtype.element_ty
    q_rows = query_ptr + seq * q_stride_seq + hq * q_stride_head  # [G] pointers
    dh = tl.arange(0, HALF)
    d = tl.arange(0, HEAD_DIM)
    # Queries in two halves: RoPE pairs channel c with c + D/2.
    q_lo = tl.load(q_rows[:, None] + dh[None, :], mask=gmask[:, None], other=0.0)
    q_hi = tl.load(q_rows[:, None] + HALF + dh[None, :], mask=gmask[:, None], other=0.0)
    scale_lo = tl.load(key_scale_ptr + kvh * HEAD_DIM + dh)
    scale_hi = tl.load(key_scale_ptr + kvh * HEAD_DIM + HALF + dh)
    offset_lo = tl.load(key_offset_ptr + kvh * HEAD_DIM + dh)
    offset_hi = tl.load(key_offset_ptr + kvh * HEAD_DIM + HALF + dh)
    scratch = scratch_ptr + ((seq * NUM_KV_HEADS + kvh) * NUM_SPLITS + split).to(tl.int64) * (GQA * BLOCK_SIZE)

    m_i = tl.full([GQA_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GQA_PAD], tl.float32)
    acc = tl.zeros([GQA_PAD, HEAD_DIM], tl.float32)
    for page_idx in range(first_page, last_page):
        block = tl.load(block_table_ptr + seq * block_table_stride + page_idx).to(tl.int64)
        page = cache_ptr + block * page_stride
        if KEY_CAP > 0:
            _add_key_outlier_logits(
                scratch, page, page_idx, seq_len, kvh, q_rows, g, gmask, key_scale_ptr, key_offset_ptr,
                key_book_ptr, cos_sin_ptr, cos_sin_stride, qk_scale, KEY_CODES, KEY_OUT_VAL, KEY_OUT_POS,
                KEY_OUT_COUNT, NUM_KV_HEADS, HEAD_DIM, BITS, BLOCK_SIZE, KEY_CAP, POSITION_BYTES, HAS_SINK,
                OUTLIER_CHUNK)
        page_tokens = tl.minimum(seq_len - page_idx * BLOCK_SIZE, BLOCK_SIZE)
        for tile in range(0, tl.cdiv(page_tokens, TILE)):
            t = tile * TILE + tl.arange(0, TILE)
            token = page_idx * BLOCK_SIZE + t
            valid = token < seq_len
            vec = t * NUM_KV_HEADS + kvh  # (token, head) vector within the page's sections
            key_rows = page + KEY_CODES + vec * PACKED
            k_lo = (tl.load(key_book_ptr + unpack_tile(key_rows, 0, HALF_GROUPS, BITS, TILE, valid))
                    * scale_lo[None, :] + offset_lo[None, :])
            k_hi = (tl.load(key_book_ptr + unpack_tile(key_rows, HALF_GROUPS, HALF_GROUPS, BITS, TILE, valid))
                    * scale_hi[None, :] + offset_hi[None, :])
            v = tl.load(value_book_ptr + unpack_tile(page + VALUE_CODES + vec * PACKED, 0, 2 * HALF_GROUPS, BITS, TILE,
                                                     valid))
            v_scale = tl.load((page + VALUE_SCALE).to(tl.pointer_type(tl.float16)) + vec, mask=valid, other=0.0)
            v_offset = tl.load((page + VALUE_OFFSET).to(tl.pointer_type(tl.float16)) + vec, mask=valid, other=0.0)
            v = v * v_scale.to(tl.float32)[:, None] + v_offset.to(tl.float32)[:, None]
            for j in tl.static_range(VALUE_OUTLIERS):
                idx = tl.load(page + VALUE_OUT_IDX + vec * VALUE_OUTLIERS + j, mask=valid, other=0).to(tl.int32)
                exact = tl.load((page + VALUE_OUT_VAL).to(tl.pointer_type(tl.float16)) + vec * VALUE_OUTLIERS + j,
                                mask=valid, other=0.0)
                v = tl.where(d[None, :] == idx[:, None], exact.to(tl.float32)[:, None], v)
            if HAS_SINK:
                # Position 0 is the first page's sink: loaded (the mask) in that tile only.
                first = (token == 0)[:, None]
                has_first = page_idx * BLOCK_SIZE + tile * TILE == 0
                sink = (page + SINK).to(tl.pointer_type(tl.float16)) + kvh * HEAD_DIM
                sink_lo = tl.load(sink + dh, mask=(dh < HALF) & has_first, other=0.0).to(tl.float32)
                sink_hi = tl.load(sink + HALF + dh, mask=(dh < HALF) & has_first, other=0.0).to(tl.float32)
                sink_v = tl.load(sink + NUM_KV_HEADS * HEAD_DIM + d, mask=(d < HEAD_DIM) & has_first, other=0.0)
                k_lo = tl.where(first, sink_lo[None, :], k_lo)
                k_hi = tl.where(first, sink_hi[None, :], k_hi)
                v = tl.where(first, sink_v.to(tl.float32)[None, :], v)
            rope = cos_sin_ptr + token[:, None] * cos_sin_stride + dh[None, :]
            cos = tl.load(rope, mask=valid[:, None], other=1.0).to(tl.float32)
            sin = tl.load(rope + HALF, mask=valid[:, None], other=0.0).to(tl.float32)
            s = (_dot(q_lo, tl.trans(k_lo * cos - k_hi * sin), DTYPE)
                 + _dot(q_hi, tl.trans(k_hi * cos + k_lo * sin), DTYPE)) * qk_scale
            if KEY_CAP > 0:
                corrections = scratch + g[:, None] * BLOCK_SIZE + t[None, :]
                # .cg: read where the atomics landed (L2), never a stale L1 line.
                s += tl.load(corrections, mask=gmask[:, None], other=0.0, cache_modifier=".cg")
                tl.store(corrections, tl.zeros([GQA_PAD, TILE], tl.float32), mask=gmask[:, None])
            m_i, l_i, acc = _softmax_step(s, v, valid, m_i, l_i, acc, DTYPE)
    _write_result(out_ptr, acc_ptr, max_ptr, sum_ptr, seq, split, hq, gmask, m_i, l_i, acc, NUM_Q_HEADS, HEAD_DIM,
                  NUM_SPLITS)


@triton.jit
def _fp16_decode_kernel(
    out_ptr, acc_ptr, max_ptr, sum_ptr, query_ptr, q_stride_seq, q_stride_head, key_ptr, value_ptr,
    kv_stride_block, kv_stride_token, kv_stride_head, block_table_ptr, block_table_stride, seq_lens_ptr,
    qk_scale, pages_per_split,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,
    GQA: tl.constexpr, GQA_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    seq, kvh, split, seq_len, first_page, last_page, g, gmask, hq = _program(seq_lens_ptr, pages_per_split,
                                                                            BLOCK_SIZE, GQA, GQA_PAD)
    NUM_Q_HEADS: tl.constexpr = NUM_KV_HEADS * GQA
    DTYPE = query_ptr.dtype.element_ty
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(query_ptr + seq * q_stride_seq + hq[:, None] * q_stride_head + d[None, :], mask=gmask[:, None],
                other=0.0)
    m_i = tl.full([GQA_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GQA_PAD], tl.float32)
    acc = tl.zeros([GQA_PAD, HEAD_DIM], tl.float32)
    for page_idx in range(first_page, last_page):
        block = tl.load(block_table_ptr + seq * block_table_stride + page_idx).to(tl.int64)
        page_tokens = tl.minimum(seq_len - page_idx * BLOCK_SIZE, BLOCK_SIZE)
        for tile in range(0, tl.cdiv(page_tokens, TILE)):
            t = tile * TILE + tl.arange(0, TILE)
            valid = page_idx * BLOCK_SIZE + t < seq_len
            rows = (block * kv_stride_block + t * kv_stride_token + kvh * kv_stride_head)[:, None] + d[None, :]
            k = tl.load(key_ptr + rows, mask=valid[:, None], other=0.0)
            v = tl.load(value_ptr + rows, mask=valid[:, None], other=0.0).to(tl.float32)
            s = _dot(q, tl.trans(k), DTYPE) * qk_scale
            m_i, l_i, acc = _softmax_step(s, v, valid, m_i, l_i, acc, DTYPE)
    _write_result(out_ptr, acc_ptr, max_ptr, sum_ptr, seq, split, hq, gmask, m_i, l_i, acc, NUM_Q_HEADS, HEAD_DIM,
                  NUM_SPLITS)


def _tile(block_size: int, head_dim: int) -> int:
    """Tokens per tile: the largest power of two that divides the block size, within TILE_ELEMENTS."""
    if block_size % 16:
        raise ValueError(f"block size must be a multiple of 16, got {block_size}")
    return min(block_size & -block_size, max(16, TILE_ELEMENTS // head_dim))


def _num_splits(num_seqs: int, num_kv_heads: int, max_pages: int, requested: int | None, device: torch.device) -> int:
    """Splits of each sequence's pages: ``requested``, or enough programs for two per SM on a GPU (one
    split elsewhere), never more than there are pages."""
    if requested is None:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0
        requested = math.ceil(2 * sms / max(num_seqs * num_kv_heads, 1))
    return max(1, min(requested, max_pages))


class _Launch:
    """Output, split plan and partial-result buffers shared by both decode kernels."""

    def __init__(self, query: torch.Tensor, num_kv_heads: int, block_table: torch.Tensor, num_splits: int | None):
        num_seqs, num_q_heads, head_dim = query.shape
        if num_q_heads % num_kv_heads:
            raise ValueError(f"{num_q_heads} query heads are not a multiple of {num_kv_heads} kv heads")
        self.gqa = num_q_heads // num_kv_heads
        self.gqa_pad = max(16, triton.next_power_of_2(self.gqa))  # tl.dot needs 16 rows
        max_pages = block_table.shape[1]
        self.splits = _num_splits(num_seqs, num_kv_heads, max_pages, num_splits, query.device)
        self.pages_per_split = math.ceil(max_pages / self.splits)
        self.grid = (num_seqs, num_kv_heads, self.splits)
        self.out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        parts = num_seqs * num_q_heads * self.splits if self.splits > 1 else 1
        self.acc = torch.empty(parts, head_dim, dtype=torch.float32, device=query.device)
        self.max = torch.empty(parts, dtype=torch.float32, device=query.device)
        self.sum = torch.empty(parts, dtype=torch.float32, device=query.device)

    def finish(self) -> torch.Tensor:
        """The output [num_seqs, num_q_heads, D], once the decode kernel has run (merging its splits)."""
        if self.splits > 1:
            num_seqs, num_q_heads, head_dim = self.out.shape
            _reduce_splits_kernel[(num_seqs * num_q_heads,)](
                self.out, self.acc, self.max, self.sum, HEAD_DIM=head_dim, NUM_SPLITS=self.splits, CHUNK=REDUCE_CHUNK)
        return self.out


def paged_decode_attention(
    query: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
    store: PagedKVQuant, cos_sin_cache: torch.Tensor, scale: float, num_splits: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Decode attention of one token per sequence over its kvquant pages (the contract of
    :func:`kvquant_vllm.kernels.reference.paged_decode_reference`).

    query: [num_seqs, num_q_heads, D] fp16/bf16/fp32, post-RoPE; cache: [num_blocks, ...] uint8 pages of
    ``store``'s layout (tables on the query's device); block_table: [num_seqs, max_blocks] int32/int64;
    seq_lens: [num_seqs] int32/int64 (tokens attended, the current one included); cos_sin_cache:
    [max_position, D] (cos half | sin half); num_splits: splits of the context (None: a heuristic);
    num_stages: Triton's software pipelining depth (None: Triton's default, 3, which takes ~115 KB of shared
    memory per program at head dim 128 against ~13 KB with 1; benchmarks/kernels.py times both).
    Returns [num_seqs, num_q_heads, D] of the query's dtype.
    """
    lay = store.layout
    pages = page_view(cache, lay)
    if query.stride(-1) != 1:
        query = query.contiguous()
    cos_sin_cache = cos_sin_cache.contiguous()
    run = _Launch(query, lay.num_kv_heads, block_table, num_splits)
    cap = lay.key_outlier_capacity
    # Per program: the key outlier corrections of one page (left cleared by the kernel).
    scratch = torch.zeros(math.prod(run.grid) * run.gqa * lay.block_size if cap else 1, dtype=torch.float32,
                          device=query.device)
    _kvquant_decode_kernel[run.grid](
        run.out, run.acc, run.max, run.sum, query, query.stride(0), query.stride(1), pages, pages.stride(0),
        block_table, block_table.stride(0), seq_lens, store.key_scale.float().contiguous(),
        store.key_offset.float().contiguous(), store.key_books[1].float().contiguous(),
        store.value_books[1].float().contiguous(), cos_sin_cache, cos_sin_cache.stride(0), scratch,
        scale * LOG2E, run.pages_per_split, **section_offsets(lay),
        NUM_KV_HEADS=lay.num_kv_heads, HEAD_DIM=lay.head_dim, BITS=lay.bits, BLOCK_SIZE=lay.block_size,
        TILE=_tile(lay.block_size, lay.head_dim), GQA=run.gqa, GQA_PAD=run.gqa_pad, NUM_SPLITS=run.splits,
        KEY_CAP=cap, VALUE_OUTLIERS=lay.value_outliers_per_vector,
        POSITION_BYTES=lay.position_dtype.itemsize, HAS_SINK=store.sink, OUTLIER_CHUNK=OUTLIER_CHUNK,
        **({} if num_stages is None else {"num_stages": num_stages}),
    )
    return run.finish()


def paged_decode_fp16(
    query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_table: torch.Tensor,
    seq_lens: torch.Tensor, scale: float, num_splits: int | None = None,
) -> torch.Tensor:
    """The baseline: decode attention over plain pages key_cache, value_cache [num_blocks, block_size, H, D]
    fp16/bf16 (keys post-RoPE, last dim contiguous); other arguments as :func:`paged_decode_attention`."""
    _, block_size, num_kv_heads, head_dim = key_cache.shape
    if key_cache.stride() != value_cache.stride() or key_cache.stride(-1) != 1:
        raise ValueError("key and value caches must share strides, last dim contiguous")
    if query.stride(-1) != 1:
        query = query.contiguous()
    run = _Launch(query, num_kv_heads, block_table, num_splits)
    _fp16_decode_kernel[run.grid](
        run.out, run.acc, run.max, run.sum, query, query.stride(0), query.stride(1), key_cache, value_cache,
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), block_table, block_table.stride(0), seq_lens,
        scale * LOG2E, run.pages_per_split, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        TILE=_tile(block_size, head_dim), GQA=run.gqa, GQA_PAD=run.gqa_pad, NUM_SPLITS=run.splits,
    )
    return run.finish()
