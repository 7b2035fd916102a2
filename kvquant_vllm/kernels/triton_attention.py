"""Triton paged attention straight from kvquant pages (decode and prefill chunks), and an fp16 paged decode
baseline of the same structure.

One kernel serves both. A program takes one kv head of a block of query tokens of one request (decode: the
request's one token; prefill: ``BLOCK_Q`` tokens of its chunk) with all the query heads of that kv head (GQA)
as the rows of its tile products, padded to 16 for the tensor cores, and walks the request's pages from the
first token to the block's last query position (causal) in tiles of TILE tokens, with an online softmax in
the exp2 domain. Decode splits the context over programs (split-K) so that one sequence fills the GPU; a
second kernel merges the splits.

Per tile, everything comes from the head's own segment of the page (layout version 2): codes unpacked from bit
planes and looked up in the codebooks, keys scaled per channel (calibrated), values per token (fp16 in the
page), the head's key outliers patched in from its token-ordered list (each entry read once), the value
outliers and the sink (position 0) in place. RoPE is computed from the model's inverse frequencies: keys are
rotated by the offset within their tile (a table made once per program), the queries back by the tile's first
position (cos and sin of one angle per channel and tile), and q . R(t0 + i) k = (R(t0)^T q) . (R(i) k).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kvquant_vllm.kernels.triton_codes import (
    _dot,
    key_tile,
    page_view,
    rope_cos_sin,
    rotate_back,
    section_offsets,
    value_tile,
)
from kvquant_vllm.quant.pagestore import PagedKVQuant
from kvquant_vllm.quant.rope import Rope

LOG2E = 1.4426950408889634
OUTLIER_CHUNK = 32  # key outlier entries patched into a tile per step
REDUCE_CHUNK = 16  # splits merged per step
# Tokens per tile and warps per program: a dequantized tile, its RoPE tables and the GQA rows' accumulators fit
# the registers without spills (ptxas, sm_90, head dim 128: `python -m kvquant_vllm.kernels.compile_check`).
DECODE_TILE = 16
PREFILL_TILE = 16
NUM_WARPS = 8
PREFILL_ROWS = 64  # query rows (tokens x query heads of a kv head) per prefill program


@triton.jit
def _softmax_step(s, v, m_i, l_i, acc, DTYPE: tl.constexpr):
    """Online softmax over one tile: s [ROWS, TILE] logits (log2 units, -inf where masked; every row has a
    finite logit in the program's first tile), v [TILE, D] fp32; running max m_i [ROWS], sum l_i [ROWS] and
    unnormalised output acc [ROWS, D]."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None] + _dot(p, v, DTYPE)


@triton.jit
def _write_result(out_ptr, acc_ptr, max_ptr, sum_ptr, out_rows, part_rows, row_mask, m_i, l_i, acc,
                  HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr):
    """The output rows out_rows [ROWS] (NUM_SPLITS == 1) or this split's partial results at part_rows [ROWS]."""
    d = tl.arange(0, HEAD_DIM)
    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + out_rows[:, None] * HEAD_DIM + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=row_mask[:, None])
    else:
        tl.store(acc_ptr + part_rows[:, None] * HEAD_DIM + d[None, :], acc, mask=row_mask[:, None])
        tl.store(max_ptr + part_rows, m_i, mask=row_mask)
        tl.store(sum_ptr + part_rows, l_i, mask=row_mask)


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
def _kvquant_attention_kernel(
    out_ptr, acc_ptr, max_ptr, sum_ptr, query_ptr, q_stride_token, q_stride_head, cache_ptr, page_stride,
    block_table_ptr, block_table_stride, seq_lens_ptr, query_start_ptr, work_ptr, key_scale_ptr, key_offset_ptr,
    key_book_ptr, value_book_ptr, inv_freq_ptr, qk_scale, pages_per_split,
    KEY_CODES: tl.constexpr, VALUE_CODES: tl.constexpr, VALUE_SCALE: tl.constexpr, VALUE_OFFSET: tl.constexpr,
    VALUE_OUT_VAL: tl.constexpr, VALUE_OUT_IDX: tl.constexpr, KEY_OUT_VAL: tl.constexpr, KEY_OUT_POS: tl.constexpr,
    KEY_OUT_COUNT: tl.constexpr, SINK: tl.constexpr, HEAD_STRIDE: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BITS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr, GQA: tl.constexpr, BLOCK_Q: tl.constexpr, ROWS: tl.constexpr, NUM_SPLITS: tl.constexpr,
    KEY_CAP: tl.constexpr, VALUE_OUTLIERS: tl.constexpr, HAS_SINK: tl.constexpr, OUTLIER_CHUNK: tl.constexpr,
):
    HALF: tl.constexpr = HEAD_DIM // 2
    NUM_Q_HEADS: tl.constexpr = NUM_KV_HEADS * GQA
    DTYPE = query_ptr.dtype.element_ty
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    if BLOCK_Q == 1:  # decode: request i's one query token is token i
        seq = tl.program_id(0)
        first_token = seq
        block_start = 0
        q_count = 1
        q_len = 1
    else:  # prefill: work item -> (request, first token of the block within the request's chunk)
        seq = tl.load(work_ptr + 2 * tl.program_id(0))
        block_start = tl.load(work_ptr + 2 * tl.program_id(0) + 1)
        chunk_start = tl.load(query_start_ptr + seq)
        q_len = tl.load(query_start_ptr + seq + 1) - chunk_start
        first_token = chunk_start + block_start
        q_count = tl.minimum(q_len - block_start, BLOCK_Q)
    seq_len = tl.load(seq_lens_ptr + seq)
    # Row r: query token r // GQA of the block, query head kvh * GQA + r % GQA, at position pos [ROWS].
    r = tl.arange(0, ROWS)
    row_mask = (r < BLOCK_Q * GQA) & (r // GQA < q_count)
    token = first_token + tl.minimum(r // GQA, q_count - 1)
    head = kvh * GQA + r % GQA
    pos = seq_len - q_len + block_start + r // GQA
    kv_end = seq_len - q_len + block_start + q_count  # keys 0 .. kv_end - 1: up to the block's last query
    first_page = split * pages_per_split
    last_page = tl.minimum(first_page + pages_per_split, tl.cdiv(kv_end, BLOCK_SIZE))

    dh = tl.arange(0, HALF)
    d = tl.arange(0, HEAD_DIM)
    q_rows = query_ptr + token.to(tl.int64) * q_stride_token + head * q_stride_head
    q_lo = tl.load(q_rows[:, None] + dh[None, :], mask=row_mask[:, None], other=0.0).to(tl.float32)
    q_hi = tl.load(q_rows[:, None] + HALF + dh[None, :], mask=row_mask[:, None], other=0.0).to(tl.float32)
    head_tables = kvh * HEAD_DIM
    scale_lo = tl.load(key_scale_ptr + head_tables + dh)
    scale_hi = tl.load(key_scale_ptr + head_tables + HALF + dh)
    offset_lo = tl.load(key_offset_ptr + head_tables + dh)
    offset_hi = tl.load(key_offset_ptr + head_tables + HALF + dh)
    inv_freq = tl.load(inv_freq_ptr + dh)
    i = tl.arange(0, TILE)
    cos_i, sin_i = rope_cos_sin(i[:, None], inv_freq[None, :])  # [TILE, HALF]: rotation by the offset in a tile

    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    for page_idx in range(first_page, last_page):
        block = tl.load(block_table_ptr + seq * block_table_stride + page_idx).to(tl.int64)
        seg = cache_ptr + block * page_stride + kvh * HEAD_STRIDE
        count = tl.minimum(tl.maximum(tl.load((seg + KEY_OUT_COUNT).to(tl.pointer_type(tl.int32))), 0), KEY_CAP)
        entry = tl.zeros([], tl.int32)
        page_tokens = tl.minimum(kv_end - page_idx * BLOCK_SIZE, BLOCK_SIZE)
        for tile in range(0, tl.cdiv(page_tokens, TILE)):
            t = tile * TILE + i
            valid = t < page_tokens
            k_lo, k_hi, entry = key_tile(
                seg, t, valid, entry, count, scale_lo, offset_lo, scale_hi, offset_hi,
                key_book_ptr + head_tables * (1 << BITS),
                key_scale_ptr + head_tables, key_offset_ptr + head_tables, KEY_CODES, KEY_OUT_VAL, KEY_OUT_POS,
                HEAD_DIM, BITS, KEY_CAP, OUTLIER_CHUNK, DTYPE)
            v = value_tile(seg, t, valid, value_book_ptr, VALUE_CODES, VALUE_SCALE, VALUE_OFFSET, VALUE_OUT_VAL,
                           VALUE_OUT_IDX, HEAD_DIM, BITS, VALUE_OUTLIERS)
            t0 = page_idx * BLOCK_SIZE + tile * TILE
            if HAS_SINK:
                # Position 0 is the first page's sink (loaded, by the mask, in that tile only).
                first = ((t0 + i) == 0)[:, None]
                sink = (seg + SINK).to(tl.pointer_type(tl.float16))
                in_first = dh + t0 * HEAD_DIM < HALF  # all channels where t0 == 0, none elsewhere
                k_lo = tl.where(first, tl.load(sink + dh, mask=in_first, other=0.0)[None, :], k_lo)
                k_hi = tl.where(first, tl.load(sink + HALF + dh, mask=in_first, other=0.0)[None, :], k_hi)
                v = tl.where(first, tl.load(sink + HEAD_DIM + d, mask=d + t0 * HEAD_DIM < HEAD_DIM,
                                            other=0.0).to(tl.float32)[None, :], v)
            cos_0, sin_0 = rope_cos_sin(t0, inv_freq)
            qr_lo, qr_hi = rotate_back(q_lo, q_hi, cos_0, sin_0)
            kr_lo = k_lo * cos_i - k_hi * sin_i
            kr_hi = k_hi * cos_i + k_lo * sin_i
            s = (_dot(qr_lo, tl.trans(kr_lo), DTYPE) + _dot(qr_hi, tl.trans(kr_hi), DTYPE)) * qk_scale
            s = tl.where((t0 + i)[None, :] <= pos[:, None], s, float("-inf"))
            m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc, DTYPE)
    out_rows = token * NUM_Q_HEADS + head
    part_rows = (seq * NUM_Q_HEADS + head) * NUM_SPLITS + split
    _write_result(out_ptr, acc_ptr, max_ptr, sum_ptr, out_rows, part_rows, row_mask, m_i, l_i, acc, HEAD_DIM,
                  NUM_SPLITS)


@triton.jit
def _fp16_decode_kernel(
    out_ptr, acc_ptr, max_ptr, sum_ptr, query_ptr, q_stride_seq, q_stride_head, key_ptr, value_ptr,
    kv_stride_block, kv_stride_token, kv_stride_head, block_table_ptr, block_table_stride, seq_lens_ptr,
    qk_scale, pages_per_split,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,
    GQA: tl.constexpr, ROWS: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    first_page = split * pages_per_split
    last_page = tl.minimum(first_page + pages_per_split, tl.cdiv(seq_len, BLOCK_SIZE))
    NUM_Q_HEADS: tl.constexpr = NUM_KV_HEADS * GQA
    DTYPE = query_ptr.dtype.element_ty
    g = tl.arange(0, ROWS)
    gmask = g < GQA
    head = kvh * GQA + g
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(query_ptr + seq * q_stride_seq + head[:, None] * q_stride_head + d[None, :], mask=gmask[:, None],
                other=0.0)
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    for page_idx in range(first_page, last_page):
        block = tl.load(block_table_ptr + seq * block_table_stride + page_idx).to(tl.int64)
        page_tokens = tl.minimum(seq_len - page_idx * BLOCK_SIZE, BLOCK_SIZE)
        for tile in range(0, tl.cdiv(page_tokens, TILE)):
            t = tile * TILE + tl.arange(0, TILE)
            valid = t < page_tokens
            rows = (block * kv_stride_block + t * kv_stride_token + kvh * kv_stride_head)[:, None] + d[None, :]
            k = tl.load(key_ptr + rows, mask=valid[:, None], other=0.0)
            v = tl.load(value_ptr + rows, mask=valid[:, None], other=0.0).to(tl.float32)
            s = _dot(q, tl.trans(k), DTYPE) * qk_scale
            m_i, l_i, acc = _softmax_step(tl.where(valid[None, :], s, float("-inf")), v, m_i, l_i, acc, DTYPE)
    _write_result(out_ptr, acc_ptr, max_ptr, sum_ptr, seq * NUM_Q_HEADS + head,
                  (seq * NUM_Q_HEADS + head) * NUM_SPLITS + split, gmask, m_i, l_i, acc, HEAD_DIM, NUM_SPLITS)


def _tile(block_size: int, largest: int) -> int:
    """Tokens per tile: the largest power of two that divides the block size, at most ``largest``."""
    if block_size % 16:
        raise ValueError(f"block size must be a multiple of 16, got {block_size}")
    return min(block_size & -block_size, largest)


def _num_splits(num_seqs: int, num_kv_heads: int, max_pages: int, requested: int | None, device: torch.device) -> int:
    """Splits of each sequence's pages: ``requested``, or enough programs for two per SM on a GPU (one
    split elsewhere), never more than there are pages."""
    if requested is None:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0
        requested = math.ceil(2 * sms / max(num_seqs * num_kv_heads, 1))
    return max(1, min(requested, max_pages))


class _DecodeLaunch:
    """Output, split plan and partial-result buffers of a decode launch (one query token per sequence)."""

    def __init__(self, query: torch.Tensor, num_kv_heads: int, block_table: torch.Tensor, num_splits: int | None):
        num_seqs, num_q_heads, head_dim = query.shape
        if num_q_heads % num_kv_heads:
            raise ValueError(f"{num_q_heads} query heads are not a multiple of {num_kv_heads} kv heads")
        self.gqa = num_q_heads // num_kv_heads
        self.rows = max(16, triton.next_power_of_2(self.gqa))  # tl.dot needs 16 rows
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


def _kvquant_arguments(store: PagedKVQuant, rope: Rope, scale: float) -> tuple[list, dict]:
    """The kernel's table arguments (after the query, page and schedule arguments) and its layout constexprs."""
    lay = store.layout
    tables = [store.key_scale.float().contiguous(), store.key_offset.float().contiguous(),
              store.key_books[1].float().contiguous(), store.value_books[1].float().contiguous(),
              rope.inv_freq.float().contiguous(), scale * LOG2E * rope.scaling]
    constexprs = dict(
        **section_offsets(lay), NUM_KV_HEADS=lay.num_kv_heads, HEAD_DIM=lay.head_dim, BITS=lay.bits,
        BLOCK_SIZE=lay.block_size, KEY_CAP=lay.key_outlier_capacity, VALUE_OUTLIERS=lay.value_outliers_per_vector,
        HAS_SINK=store.sink, OUTLIER_CHUNK=OUTLIER_CHUNK)
    return tables, constexprs


def _check_query(query: torch.Tensor, store: PagedKVQuant, rope: Rope) -> torch.Tensor:
    if query.dim() != 3 or query.shape[2] != store.layout.head_dim:
        raise ValueError(f"query must be [tokens, heads, {store.layout.head_dim}], got {list(query.shape)}")
    if rope.head_dim != store.layout.head_dim:
        raise ValueError(f"the RoPE rotates {rope.head_dim} channels, the pages hold {store.layout.head_dim}")
    return query if query.stride(-1) == 1 else query.contiguous()


def paged_decode_attention(
    query: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
    store: PagedKVQuant, rope: Rope, scale: float, num_splits: int | None = None, num_stages: int = 1,
    tile: int = DECODE_TILE, num_warps: int = NUM_WARPS,
) -> torch.Tensor:
    """Decode attention of one token per sequence over its kvquant pages (the contract of
    :func:`kvquant_vllm.kernels.reference.paged_decode_reference`).

    query: [num_seqs, num_q_heads, D] fp16/bf16/fp32, post-RoPE; cache: [num_blocks, ...] uint8 pages of
    ``store``'s layout (tables on the query's device); block_table: [num_seqs, max_blocks] int32/int64;
    seq_lens: [num_seqs] int32/int64 (tokens attended, the current one included); rope: the model's RoPE;
    num_splits: splits of the context (None: a heuristic); num_stages: Triton's software pipelining depth (its
    default, 3, takes ~8x the shared memory of 1 and fits one program per SM); tile: tokens per tile;
    num_warps: warps per program.
    Returns [num_seqs, num_q_heads, D] of the query's dtype.
    """
    lay = store.layout
    pages = page_view(cache, lay)
    query = _check_query(query, store, rope)
    run = _DecodeLaunch(query, lay.num_kv_heads, block_table, num_splits)
    tables, constexprs = _kvquant_arguments(store, rope, scale)
    _kvquant_attention_kernel[run.grid](
        run.out, run.acc, run.max, run.sum, query, query.stride(0), query.stride(1), pages, pages.stride(0),
        block_table, block_table.stride(0), seq_lens, seq_lens, seq_lens, *tables, run.pages_per_split,
        **constexprs, TILE=_tile(lay.block_size, tile), GQA=run.gqa, BLOCK_Q=1, ROWS=run.rows,
        NUM_SPLITS=run.splits, num_stages=num_stages, num_warps=num_warps,
    )
    return run.finish()


def prefill_work(query_start_loc: torch.Tensor, block_q: int) -> torch.Tensor:
    """[num_blocks, 2] int32 on the device of ``query_start_loc`` [num_reqs + 1]: (request, first token of the
    block within the request's chunk) for every block of ``block_q`` query tokens. Build it from a CPU copy of
    query_start_loc to spare the device a sync (vLLM keeps one)."""
    starts = query_start_loc.cpu().long()
    blocks = (starts[1:] - starts[:-1] + block_q - 1) // block_q
    request = torch.repeat_interleave(torch.arange(len(blocks)), blocks)
    first = torch.arange(len(request)) - torch.repeat_interleave(blocks.cumsum(0) - blocks, blocks)
    return torch.stack([request, first * block_q], 1).to(torch.int32).to(query_start_loc.device)


def prefill_block(num_q_heads: int, num_kv_heads: int) -> int:
    """Query tokens per prefill program: PREFILL_ROWS query rows (at least one token)."""
    return max(1, PREFILL_ROWS // (num_q_heads // num_kv_heads))


def paged_prefill_attention(
    query: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor, store: PagedKVQuant, rope: Rope, scale: float, work: torch.Tensor | None = None,
    num_stages: int = 1, tile: int = PREFILL_TILE, num_warps: int = NUM_WARPS,
) -> torch.Tensor:
    """Causal attention of chunks of query tokens over their requests' kvquant pages (the chunks already stored;
    the contract of :func:`kvquant_vllm.kernels.reference.paged_attention_reference`).

    query: [num_tokens, num_q_heads, D], the chunks of the requests one after the other, post-RoPE;
    query_start_loc: [num_reqs + 1] int32/int64, where each request's chunk starts in ``query``; seq_lens:
    [num_reqs], context plus chunk (the chunk's last token is at position seq_len - 1); block_table:
    [num_reqs, max_blocks]; work: :func:`prefill_work` of query_start_loc for :func:`prefill_block`'s block
    (built here when None); num_stages, tile, num_warps: as :func:`paged_decode_attention`.
    Returns [num_tokens, num_q_heads, D] of the query's dtype.
    """
    lay = store.layout
    pages = page_view(cache, lay)
    query = _check_query(query, store, rope)
    num_tokens, num_q_heads, _ = query.shape
    if num_q_heads % lay.num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads are not a multiple of {lay.num_kv_heads} kv heads")
    gqa = num_q_heads // lay.num_kv_heads
    block_q = prefill_block(num_q_heads, lay.num_kv_heads)
    if work is None:
        work = prefill_work(query_start_loc, block_q)
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if work.shape[0] == 0:
        return out
    tables, constexprs = _kvquant_arguments(store, rope, scale)
    _kvquant_attention_kernel[(work.shape[0], lay.num_kv_heads, 1)](
        out, out, out, out, query, query.stride(0), query.stride(1), pages, pages.stride(0),
        block_table, block_table.stride(0), seq_lens, query_start_loc, work, *tables, block_table.shape[1],
        **constexprs, TILE=_tile(lay.block_size, tile), GQA=gqa, BLOCK_Q=block_q,
        ROWS=max(16, triton.next_power_of_2(block_q * gqa)), NUM_SPLITS=1, num_stages=num_stages,
        num_warps=num_warps,
    )
    return out


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
    run = _DecodeLaunch(query, num_kv_heads, block_table, num_splits)
    _fp16_decode_kernel[run.grid](
        run.out, run.acc, run.max, run.sum, query, query.stride(0), query.stride(1), key_cache, value_cache,
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), block_table, block_table.stride(0), seq_lens,
        scale * LOG2E, run.pages_per_split, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        TILE=_tile(block_size, 64), GQA=run.gqa, ROWS=run.rows, NUM_SPLITS=run.splits,
    )
    return run.finish()
