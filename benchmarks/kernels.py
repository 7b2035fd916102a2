"""Paged attention kernels over kvquant pages: correctness against the PyTorch references, then speed against
16-bit baselines (GPU; torch + triton, nvcc for the CUDA kernel; no vLLM).

    python benchmarks/kernels.py                                # full run on a CUDA GPU (one call, a few minutes)
    TRITON_INTERPRET=1 python benchmarks/kernels.py --smoke     # tiny correctness-only pass (CPU is fine)
    TRITON_INTERPRET=1 python benchmarks/kernels.py --dry-run   # every timed call once at tiny shapes, on CPU

Correctness: for kvquant2/3/4, the Triton store against PagedKVQuant.store (bytes, and the attention over both
caches), the Triton decode kernel (fp32 and fp16 queries, with and without split-K), the Triton prefill kernel
(chunks after a context, fp32 and fp16) and the CUDA decode kernel (when it builds here) against
kernels.reference, with a plain and a YaRN-scaled RoPE; the fp16 baseline against its reference.

Speed (8 kv heads, 32 query heads, head dim 128, fp16 activations; CUDA-event timing, L2 flushed before every
call; bandwidth = bytes of K/V the call must read / time, against a device-to-device copy):
- decode, one token per sequence, at every context x batch: kvquant3/kvquant4 pages of 256 tokens (Triton, and
  the CUDA kernel) against an fp16 paged Triton kernel of the same structure (pages of 16 tokens) and torch SDPA
  (flash) over contiguous fp16 K/V with the GQA group folded into the query length;
- a few launch settings of the Triton decode kernel (tile, warps) at one shape, to tune the defaults;
- prefill: one chunk of --chunk tokens at the end of each --prefill-contexts context, over kvquant3 pages (Triton)
  against SDPA over fp16 K/V (bottom-right causal);
- store: --store-tokens new tokens into kvquant3 pages (Triton) against an fp16 paged copy.
Writes results/kernels-<gpu>.{json,md} (not with --smoke).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from kvquant_vllm.fsutil import atomic_write_text
from kvquant_vllm.quant.kvquant import kvquant_methods
from kvquant_vllm.quant.pagestore import PagedKVQuant
from kvquant_vllm.quant.rope import Rope, default_inv_freq
from kvquant_vllm.quant.synthetic import synthetic_calibration, synthetic_tokens

RESULTS = Path(__file__).parent / "results"
ROPE_THETA = 10000.0
OUTLIER_RATE = 0.01  # keys outside the calibrated range, as the 1% calibration thresholds leave them
TEMPLATE_PAGES = 64  # distinct pages written by the store, tiled over the timed caches
L2_FLUSH_BYTES = 256 << 20
VARIANTS = [dict(tile=16, num_warps=4), dict(tile=16, num_warps=8), dict(tile=32, num_warps=8),
            dict(tile=64, num_warps=8), dict(tile=16, num_warps=8, num_stages=2)]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny correctness-only pass, no timing, no files")
    p.add_argument("--dry-run", action="store_true",
                   help="on CPU: the smoke pass, then every timed call once at tiny shapes (no times, no files)")
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768, 131072])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--dtypes", nargs="+", default=["kvquant3", "kvquant4"])
    p.add_argument("--prefill-contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--chunk", type=int, default=2048, help="query tokens of the timed prefill chunk")
    p.add_argument("--store-tokens", type=int, default=2048)
    p.add_argument("--variant-shape", type=int, nargs=2, default=[32768, 8], metavar=("CONTEXT", "BATCH"),
                   help="where the Triton decode kernel's launch settings are swept")
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=256, help="tokens per kvquant page")
    p.add_argument("--fp16-block-size", type=int, default=16, help="tokens per fp16 page")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--no-cuda-kernel", action="store_true", help="skip building and running the CUDA C++ kernel")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args()


# --------------------------------------------------------------------------------------------- set-up
def make_store(dtype: str, kv_heads: int, head_dim: int, block_size: int, device: torch.device,
               seed: int = 0) -> PagedKVQuant:
    """The kvquant store of one layer with a random calibration (speed does not depend on its values)."""
    cal = synthetic_calibration(kvquant_methods()[dtype].spec, torch.Generator().manual_seed(seed), kv_heads, head_dim)
    return PagedKVQuant(dtype, cal, 0, block_size).to(device)


def write_sequences(store: PagedKVQuant, cache: torch.Tensor, block_table: torch.Tensor, lens: list[int],
                    rope: Rope, rng: torch.Generator, triton_store: bool) -> None:
    """Write random tokens 0 .. len - 1 of every sequence through its block table row, with the Triton
    store or PagedKVQuant.store (same tokens for the same rng state)."""
    from kvquant_vllm.kernels.triton_store import store_tokens

    bs = store.layout.block_size
    for row, n in zip(block_table.long(), lens):
        key, value = synthetic_tokens(store.key_scale, store.key_offset, n, OUTLIER_RATE, rng)
        pos = torch.arange(n, device=cache.device)
        slots = row[pos // bs] * bs + pos % bs
        if triton_store:
            store_tokens(cache, rope.rotate(key, pos), value, slots, pos, store, *rope.cos_sin(pos), rope.inverse_gain)
        else:
            store.store(cache, key, value, slots, pos)


def fresh_pages(store: PagedKVQuant, num_blocks: int, device: torch.device) -> torch.Tensor:
    cache = torch.randint(0, 256, (num_blocks, store.layout.page_size_bytes), dtype=torch.uint8, device=device)
    store.layout.view(cache, "key_out_count").zero_()
    return cache


# ------------------------------------------------------------------------------------------ correctness
def check_correctness(device: torch.device, cuda_kernel: bool, smoke: bool) -> list[dict]:
    """Every kernel against its reference on a few ragged sequences; one record per check."""
    from kvquant_vllm.kernels.reference import (
        paged_attention_reference,
        paged_decode_fp16_reference,
        paged_decode_reference,
    )
    from kvquant_vllm.kernels.triton_attention import paged_decode_attention, paged_decode_fp16, paged_prefill_attention

    kv_heads, q_heads, head_dim, bs = (2, 4, 64, 16) if smoke else (8, 32, 128, 256)
    lens = [1, 37, 16] if smoke else [1, 300, 1000, 2 * bs + 17]
    chunks = [1, 20, 3] if smoke else [1, 300, 129, 17]  # prefill: the last tokens of each sequence
    ropes = {"plain": Rope.default(head_dim, ROPE_THETA),
             "yarn": Rope(default_inv_freq(head_dim, ROPE_THETA) / torch.linspace(1, 4, head_dim // 2), 1.14)}
    scale = head_dim**-0.5
    pages_per_seq = -(-max(lens) // bs)
    num_blocks = len(lens) * pages_per_seq + 2
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    query_start_loc = torch.tensor([0, *torch.tensor(chunks).cumsum(0).tolist()], dtype=torch.int32, device=device)
    records = []

    def record(kernel: str, dtype: str, err: float, tol: float, **extra) -> None:
        records.append({"kernel": kernel, "dtype": dtype, "max_abs_err": err, "tolerance": tol, "ok": err <= tol,
                        **extra})

    for dtype in ("kvquant2", "kvquant3", "kvquant4"):
        for rope_name, rope in ropes.items():
            if rope_name != "plain" and dtype != "kvquant3":
                continue
            rope = rope.to(device)
            store = make_store(dtype, kv_heads, head_dim, bs, device)
            gen = torch.Generator().manual_seed(1)
            block_table = torch.randperm(num_blocks, generator=gen)[: len(lens) * pages_per_seq]
            block_table = block_table.view(len(lens), -1).to(device, torch.int32)
            torch_cache = fresh_pages(store, num_blocks, device)
            triton_cache = torch_cache.clone()
            write_sequences(store, torch_cache, block_table, lens, rope, torch.Generator().manual_seed(2), False)
            write_sequences(store, triton_cache, block_table, lens, rope, torch.Generator().manual_seed(2), True)
            query = torch.randn(len(lens), q_heads, head_dim, generator=gen).to(device)
            expected = paged_decode_reference(query, torch_cache, block_table, seq_lens, store, rope, scale)
            used = block_table.flatten().long()
            same = (torch_cache[used] == triton_cache[used]).float().mean().item()
            decoded = paged_decode_reference(query, triton_cache, block_table, seq_lens, store, rope, scale)
            record("triton store", dtype, (decoded - expected).abs().max().item(), 1e-4, rope=rope_name,
                   equal_byte_fraction=same)
            chunk_query = torch.randn(int(query_start_loc[-1]), q_heads, head_dim, generator=gen).to(device)
            chunk_expected = paged_attention_reference(chunk_query, torch_cache, block_table, query_start_loc,
                                                       seq_lens, store, rope, scale)
            for q_dtype, tol in ((torch.float32, 1e-4), (torch.float16, 5e-3)):
                q_name = str(q_dtype).removeprefix("torch.")
                for splits in (1, 3, None):
                    out = paged_decode_attention(query.to(q_dtype), torch_cache, block_table, seq_lens, store, rope,
                                                 scale, num_splits=splits)
                    record("triton decode", dtype, (out.float() - expected).abs().max().item(), tol, rope=rope_name,
                           query=q_name, splits=splits or "auto")
                out = paged_prefill_attention(chunk_query.to(q_dtype), torch_cache, block_table, query_start_loc,
                                              seq_lens, store, rope, scale)
                record("triton prefill", dtype, (out.float() - chunk_expected).abs().max().item(), tol,
                       rope=rope_name, query=q_name)
                if cuda_kernel:
                    from kvquant_vllm.kernels import cuda

                    out = cuda.paged_decode_attention(query.to(q_dtype), torch_cache, block_table, seq_lens, store,
                                                      rope, scale)
                    record("cuda decode", dtype, (out.float() - expected).abs().max().item(), tol, rope=rope_name,
                           query=q_name)

    bs16 = 16
    pages_per_seq = -(-max(lens) // bs16)
    key_cache, value_cache = (torch.randn(len(lens) * pages_per_seq, bs16, kv_heads, head_dim, device=device,
                                          dtype=torch.float16) for _ in range(2))
    block_table = torch.randperm(len(lens) * pages_per_seq).view(len(lens), -1).to(device, torch.int32)
    query = torch.randn(len(lens), q_heads, head_dim, device=device)
    expected = paged_decode_fp16_reference(query, key_cache, value_cache, block_table, seq_lens, scale)
    for q_dtype, tol in ((torch.float32, 1e-4), (torch.float16, 5e-3)):
        out = paged_decode_fp16(query.to(q_dtype), key_cache, value_cache, block_table, seq_lens, scale)
        record("triton fp16 baseline", "fp16", (out.float() - expected).abs().max().item(), tol,
               query=str(q_dtype).removeprefix("torch."))
    return records


# ---------------------------------------------------------------------------------------------- timing
def time_ms(fn, warmup: int, iters: int, flush: torch.Tensor) -> float:
    """Mean time of fn() in ms, CUDA events around each call, L2 flushed (a buffer rewritten) before each.
    Off a GPU (--dry-run) fn runs once and the time is NaN."""
    if flush.device.type != "cuda":
        fn()
        return math.nan
    for _ in range(warmup):
        fn()
    total = 0.0
    for _ in range(iters):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        total += start.elapsed_time(end)
    return total / iters


def copy_bandwidth_gbps(device: torch.device, flush: torch.Tensor) -> float:
    """Device memory bandwidth of a plain copy of a 2 GiB buffer (bytes read + written per second)."""
    src = torch.empty(2 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), 2, 10, flush)
    del src, dst
    return 2 * (2 << 30) / (ms * 1e-3) / 1e9


def template_pages(store: PagedKVQuant, rope: Rope, device: torch.device) -> torch.Tensor:
    """TEMPLATE_PAGES pages of one sequence written by the Triton store from random tokens (realistic code,
    scale and outlier-list contents; the timed caches repeat them)."""
    template = fresh_pages(store, TEMPLATE_PAGES, device)
    rows = torch.arange(TEMPLATE_PAGES, device=device, dtype=torch.int32)[None]
    write_sequences(store, template, rows, [TEMPLATE_PAGES * store.layout.block_size], rope,
                    torch.Generator().manual_seed(3), True)
    sinks = store.layout.view(template, "sink")
    sinks[1:] = sinks[0].clone()  # any page may start a timed sequence
    return template


def fits(nbytes: int, device: torch.device) -> bool:
    """Whether buffers of nbytes fit beside what is allocated, with room for the kernels' buffers."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes < 0.8 * free


def kvquant_cache(template: torch.Tensor, num_pages: int) -> torch.Tensor:
    return template.repeat(math.ceil(num_pages / TEMPLATE_PAGES), 1)[:num_pages]


def run_decode(args, device, cuda_kernel, flush, stores, templates, rope) -> list[dict]:
    from kvquant_vllm.kernels.triton_attention import paged_decode_attention, paged_decode_fp16

    h, hq, d = args.kv_heads, args.q_heads, args.head_dim
    scale = d**-0.5
    rows = []
    for ctx, batch in tqdm([(c, b) for c in args.contexts for b in args.batches], desc="decode"):
        seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
        query = torch.randn(batch, hq, d, device=device, dtype=torch.float16)
        kv_bytes = 2 * batch * ctx * h * d * 2  # fp16 K and V: what a 16-bit cache must read
        entries = []
        pages = -(-ctx // args.fp16_block_size)
        if fits(2 * kv_bytes, device):
            shape = (batch * pages, args.fp16_block_size, h, d)
            key_cache = torch.randn(shape, device=device, dtype=torch.float16)
            value_cache = torch.randn(shape, device=device, dtype=torch.float16)
            table = torch.randperm(batch * pages, device=device).view(batch, pages).int()
            entries.append(("fp16", "triton paged", kv_bytes, time_ms(
                lambda: paged_decode_fp16(query, key_cache, value_cache, table, seq_lens, scale),
                args.warmup, args.iters, flush)))
            del key_cache, value_cache
            # SDPA (flash) over contiguous K/V [batch, h, ctx, d]; the query heads of a kv head as query rows.
            keys = torch.randn(batch, h, ctx, d, device=device, dtype=torch.float16)
            values = torch.randn_like(keys)
            grouped = query.view(batch, h, hq // h, d)
            backend = torch.nn.attention.SDPBackend.FLASH_ATTENTION if device.type == "cuda" else \
                torch.nn.attention.SDPBackend.MATH
            with torch.nn.attention.sdpa_kernel(backend):
                entries.append(("fp16", "sdpa flash", kv_bytes, time_ms(
                    lambda: torch.nn.functional.scaled_dot_product_attention(grouped, keys, values, scale=scale),
                    args.warmup, args.iters, flush)))
            del keys, values
        for dtype, store in stores.items():
            pages = -(-ctx // args.block_size)
            page_bytes = batch * pages * store.layout.page_size_bytes
            if not fits(page_bytes, device):
                continue
            cache = kvquant_cache(templates[dtype], batch * pages)
            table = torch.randperm(batch * pages, device=device).view(batch, pages).int()
            kernels = {"triton": lambda: paged_decode_attention(query, cache, table, seq_lens, store, rope, scale)}
            if [ctx, batch] == args.variant_shape:
                for v in VARIANTS:
                    name = "triton " + ", ".join(f"{k}={val}" for k, val in v.items())
                    kernels[name] = lambda v=v: paged_decode_attention(query, cache, table, seq_lens, store, rope,
                                                                       scale, **v)
            if cuda_kernel:
                from kvquant_vllm.kernels import cuda

                kernels["cuda"] = lambda: cuda.paged_decode_attention(query, cache, table, seq_lens, store, rope,
                                                                      scale, max_seq_len=ctx)
            for name, fn in kernels.items():
                entries.append((dtype, name, page_bytes, time_ms(fn, args.warmup, args.iters, flush)))
            del cache
        base = {kernel: ms for dtype, kernel, _, ms in entries if dtype == "fp16"}
        for dtype, kernel, nbytes, ms in entries:
            rows.append({"context": ctx, "batch": batch, "cache": dtype, "kernel": kernel, "time_us": ms * 1e3,
                         "vs_fp16_paged": base["triton paged"] / ms if "triton paged" in base else None,
                         "vs_sdpa_flash": base["sdpa flash"] / ms if "sdpa flash" in base else None,
                         "bytes_read": nbytes, "bandwidth_GBps": nbytes / (ms * 1e-3) / 1e9})
    return rows


def run_prefill(args, device, flush, store, template, rope) -> list[dict]:
    """One chunk of args.chunk query tokens at the end of each context, one sequence."""
    from torch.nn.attention.bias import causal_lower_right

    from kvquant_vllm.kernels.triton_attention import paged_prefill_attention

    h, hq, d = args.kv_heads, args.q_heads, args.head_dim
    scale = d**-0.5
    rows = []
    for ctx in tqdm(args.prefill_contexts, desc="prefill"):
        chunk = min(args.chunk, ctx)
        query = torch.randn(chunk, hq, d, device=device, dtype=torch.float16)
        pages = -(-ctx // args.block_size)
        cache = kvquant_cache(template, pages)
        table = torch.randperm(pages, device=device).view(1, pages).int()
        seq_lens = torch.tensor([ctx], dtype=torch.int32, device=device)
        query_start_loc = torch.tensor([0, chunk], dtype=torch.int32, device=device)
        ms = time_ms(lambda: paged_prefill_attention(query, cache, table, query_start_loc, seq_lens, store, rope,
                                                     scale), args.warmup, args.iters, flush)
        rows.append({"context": ctx, "chunk": chunk, "kernel": f"{store.layout.bits}-bit kvquant triton prefill", "time_us": ms * 1e3})
        del cache
        # SDPA over fp16 K/V with the kv heads expanded to the query heads (flash takes no GQA).
        keys = torch.randn(1, hq, ctx, d, device=device, dtype=torch.float16)
        values = torch.randn_like(keys)
        q = query.transpose(0, 1)[None]  # [1, hq, chunk, d]
        mask = causal_lower_right(chunk, ctx)
        ms_sdpa = time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                                                                   scale=scale),
                          args.warmup, args.iters, flush)
        rows.append({"context": ctx, "chunk": chunk, "kernel": "fp16 sdpa (causal lower right)",
                     "time_us": ms_sdpa * 1e3})
        rows[-2]["vs_sdpa"] = ms / ms_sdpa
        del keys, values
    return rows


def run_store(args, device, flush, store, rope) -> list[dict]:
    from kvquant_vllm.kernels.triton_store import store_tokens

    h, d, n = args.kv_heads, args.head_dim, args.store_tokens
    key, value = synthetic_tokens(store.key_scale, store.key_offset, n, OUTLIER_RATE, torch.Generator().manual_seed(4))
    pos = torch.arange(n, device=device)
    key_post, value = rope.rotate(key, pos).half(), value.half()
    cos, sin = rope.cos_sin(pos)
    cache = fresh_pages(store, -(-n // args.block_size) + 1, device)
    slots = pos + args.block_size
    ms = time_ms(lambda: store_tokens(cache, key_post, value, slots, pos, store, cos, sin, rope.inverse_gain),
                 args.warmup, args.iters, flush)
    fp16_pages = torch.zeros(2, -(-n // args.fp16_block_size) + 1, args.fp16_block_size, h, d, device=device,
                             dtype=torch.float16)
    flat = fp16_pages.view(2, -1, h, d)
    ms16 = time_ms(lambda: (flat[0].index_copy_(0, slots, key_post), flat[1].index_copy_(0, slots, value)),
                   args.warmup, args.iters, flush)
    return [{"tokens": n, "kernel": f"{store.layout.bits}-bit kvquant triton store", "time_us": ms * 1e3},
            {"tokens": n, "kernel": "fp16 paged copy", "time_us": ms16 * 1e3}]


# --------------------------------------------------------------------------------------------- reports
def details(record: dict) -> str:
    """The fields of a correctness record besides kernel, cache, error and verdict."""
    return ", ".join(f"{k}={v:.6f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                     if k not in ("kernel", "dtype", "max_abs_err", "tolerance", "ok"))


def _ratio(x: float | None) -> str:
    return f"{x:.2f}x" if x else "n/a"


def markdown(report: dict) -> str:
    lines = [
        f"# Paged attention kernels on {report['device']}",
        "",
        f"Command: `{report['command']}`",
        "",
        f"torch {report['torch']}, triton {report['triton']}; CUDA C++ kernel: {report['cuda_kernel']}.",
        f"{report['config']}. Device copy bandwidth: {report['copy_bandwidth_GBps']:.0f} GB/s.",
        "",
        "## Correctness (max |error| against kvquant_vllm.kernels.reference)",
        "",
        "| kernel | cache | details | max abs err | tolerance | ok |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["correctness"]:
        lines.append(f"| {r['kernel']} | {r['dtype']} | {details(r)} | {r['max_abs_err']:.2e} | {r['tolerance']:.0e} "
                     f"| {'yes' if r['ok'] else 'NO'} |")
    copy_bw = report["copy_bandwidth_GBps"]
    lines += [
        "",
        "## Decode (one token per sequence; bytes: K/V that the call reads, fp16 K/V for the 16-bit rows)",
        "",
        "| context | batch | cache | kernel | time (us) | vs fp16 paged | vs SDPA flash | GB/s | % of copy bandwidth |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["decode"]:
        lines.append(f"| {r['context']} | {r['batch']} | {r['cache']} | {r['kernel']} | {r['time_us']:.1f} "
                     f"| {_ratio(r['vs_fp16_paged'])} | {_ratio(r['vs_sdpa_flash'])} | {r['bandwidth_GBps']:.0f} "
                     f"| {100 * r['bandwidth_GBps'] / copy_bw:.0f} % |")
    lines += ["", "## Prefill (one chunk at the end of a context, one sequence)", "",
              "| context | chunk | kernel | time (us) | time vs SDPA |", "| --- | --- | --- | --- | --- |"]
    for r in report["prefill"]:
        lines.append(f"| {r['context']} | {r['chunk']} | {r['kernel']} | {r['time_us']:.1f} "
                     f"| {_ratio(r.get('vs_sdpa'))} |")
    lines += ["", "## Store", "", "| tokens | kernel | time (us) |", "| --- | --- | --- |"]
    for r in report["store"]:
        lines.append(f"| {r['tokens']} | {r['kernel']} | {r['time_us']:.1f} |")
    return "\n".join(lines) + "\n"


def cuda_kernel_status(args: argparse.Namespace, device: torch.device) -> tuple[bool, str]:
    """Build the CUDA C++ kernel if it can be here: (usable, a note for the report)."""
    if args.no_cuda_kernel:
        return False, "skipped (--no-cuda-kernel)"
    if device.type != "cuda":
        return False, "skipped (no CUDA device)"
    try:
        from kvquant_vllm.kernels import cuda
    except ImportError as exc:
        return False, f"skipped (kvquant_vllm.kernels.cuda does not import: {exc})"
    if not cuda.available():
        return False, "skipped (the extension did not build or load; see the log)"
    return True, "built and run"


def main() -> int:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        if not (args.smoke or args.dry_run):
            print("the timing run needs a CUDA GPU; use --smoke or --dry-run on a CPU", file=sys.stderr)
            return 2
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("without a GPU the Triton kernels run in the interpreter: set TRITON_INTERPRET=1", file=sys.stderr)
            return 2
    if args.dry_run:  # tiny shapes that still cross pages, splits and the launch-settings sweep
        args.contexts, args.batches, args.variant_shape, args.prefill_contexts = [32], [2], [32, 2], [40]
        args.kv_heads, args.q_heads, args.head_dim, args.block_size = 2, 4, 64, 16
        args.chunk, args.store_tokens = 24, 20
    cuda_kernel, cuda_note = cuda_kernel_status(args, device)
    print(f"CUDA C++ kernel: {cuda_note}", flush=True)
    correctness = check_correctness(device, cuda_kernel, args.smoke or args.dry_run)
    for r in correctness:
        print(f"{'ok ' if r['ok'] else 'BAD'} {r['kernel']:<22} {r['dtype']:<9} err {r['max_abs_err']:.2e} "
              f"(tol {r['tolerance']:.0e}) {details(r)}", flush=True)
    ok = all(r["ok"] for r in correctness)
    if args.smoke:
        return 0 if ok else 1

    import triton

    flush = torch.empty(L2_FLUSH_BYTES if device.type == "cuda" else 1, dtype=torch.uint8, device=device)
    rope = Rope.default(args.head_dim, ROPE_THETA).to(device)
    stores = {dtype: make_store(dtype, args.kv_heads, args.head_dim, args.block_size, device)
              for dtype in args.dtypes}
    templates = {dtype: template_pages(store, rope, device) for dtype, store in stores.items()}
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)",
        "command": "python " + shlex.join(["benchmarks/kernels.py", *sys.argv[1:]]),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda_kernel": cuda_note,
        "config": (f"{args.kv_heads} kv heads, {args.q_heads} query heads, head dim {args.head_dim}, fp16 "
                   f"activations; kvquant pages of {args.block_size} tokens, fp16 pages of {args.fp16_block_size} "
                   f"tokens; {args.warmup} warm-up + {args.iters} timed calls, L2 flushed before each"),
        "copy_bandwidth_GBps": copy_bandwidth_gbps(device, flush) if device.type == "cuda" else math.nan,
        "correctness": correctness,
        "decode": run_decode(args, device, cuda_kernel, flush, stores, templates, rope),
        "prefill": run_prefill(args, device, flush, stores[args.dtypes[0]], templates[args.dtypes[0]], rope),
        "store": run_store(args, device, flush, stores[args.dtypes[0]], rope),
    }
    if args.dry_run:
        print(markdown(report))
        return 0 if ok else 1
    slug = re.sub(r"[^a-z0-9]+", "-", report["device"].lower()).strip("-")
    atomic_write_text(args.out / f"kernels-{slug}.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(args.out / f"kernels-{slug}.md", markdown(report))
    print(markdown(report))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
