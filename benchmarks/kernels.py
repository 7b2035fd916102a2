"""Paged decode attention kernels: correctness against the PyTorch references, then speed over packed
kvquant3/kvquant4 pages against an fp16 paged baseline (GPU; torch + triton, nvcc for the CUDA kernel; no vLLM).

    python benchmarks/kernels.py                                # full run on a CUDA GPU
    TRITON_INTERPRET=1 python benchmarks/kernels.py --smoke     # tiny correctness-only pass (CPU is fine)

Correctness: for kvquant2/3/4, the Triton store against PagedKVQuant.store (bytes, and the decoded
attention of both caches), the Triton decode kernel (fp32 and fp16 queries, with and without split-K)
and the CUDA decode kernel (when it builds here) against kernels.reference; the fp16 baseline against
its reference. Speed: one decode token per sequence at every context x batch (8 kv heads, 32 query heads,
head dim 128, fp16 queries), kvquant pages of 256 tokens vs fp16 pages of 16 tokens, CUDA-event timing
with the L2 cache flushed before every call; bandwidth = page bytes the call reads / time, against a
device-to-device copy. Writes results/kernels-<gpu>.{json,md} (not with --smoke).
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
from kvquant_vllm.quant.rope import apply_rope, cos_sin_from_cache, rope_cos_sin_cache
from kvquant_vllm.quant.synthetic import synthetic_calibration, synthetic_tokens

RESULTS = Path(__file__).parent / "results"
ROPE_THETA = 10000.0
OUTLIER_RATE = 0.01  # keys outside the calibrated range, as the 1% calibration thresholds leave them
TEMPLATE_PAGES = 64  # distinct pages written by the store, tiled over the timed caches
L2_FLUSH_BYTES = 256 << 20


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny correctness-only pass, no timing, no files")
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536, 131072])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 32])
    p.add_argument("--dtypes", nargs="+", default=["kvquant3", "kvquant4"])
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=256, help="tokens per kvquant page")
    p.add_argument("--fp16-block-size", type=int, default=16, help="tokens per fp16 page")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-cuda-kernel", action="store_true", help="skip building and running the CUDA C++ kernel")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args()


# --------------------------------------------------------------------------------------------- set-up
def make_store(dtype: str, kv_heads: int, head_dim: int, block_size: int, device: torch.device,
               seed: int = 0) -> PagedKVQuant:
    """The kvquant store of one layer with a random calibration (speed does not depend on its values)."""
    cal = synthetic_calibration(kvquant_methods()[dtype].spec, torch.Generator().manual_seed(seed), kv_heads, head_dim)
    return PagedKVQuant(dtype, cal, 0, block_size).to(device)


def post_rope(key: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    return apply_rope(key, *cos_sin_from_cache(cos_sin, positions))


def write_sequences(store: PagedKVQuant, cache: torch.Tensor, block_table: torch.Tensor, lens: list[int],
                    cos_sin: torch.Tensor, rng: torch.Generator, triton_store: bool) -> None:
    """Write random tokens 0 .. len - 1 of every sequence through its block table row, with the Triton
    store or PagedKVQuant.store (same tokens for the same rng state)."""
    from kvquant_vllm.kernels.triton_store import store_tokens

    bs = store.layout.block_size
    for row, n in zip(block_table.long(), lens):
        key, value = synthetic_tokens(store.key_scale, store.key_offset, n, OUTLIER_RATE, rng)
        pos = torch.arange(n, device=cache.device)
        slots = row[pos // bs] * bs + pos % bs
        if triton_store:
            store_tokens(cache, post_rope(key, pos, cos_sin), value, slots, pos, store, cos_sin)
        else:
            store.store(cache, key, value, slots, pos)


def fresh_pages(store: PagedKVQuant, num_blocks: int, device: torch.device) -> torch.Tensor:
    cache = torch.randint(0, 256, (num_blocks, store.layout.page_size_bytes), dtype=torch.uint8, device=device)
    store.layout.view(cache, "key_out_count").zero_()
    return cache


# ------------------------------------------------------------------------------------------ correctness
def check_correctness(device: torch.device, cuda_kernel: bool, smoke: bool) -> list[dict]:
    """Every kernel against its reference on a few ragged sequences; one record per check."""
    from kvquant_vllm.kernels.reference import paged_decode_fp16_reference, paged_decode_reference
    from kvquant_vllm.kernels.triton_decode import paged_decode_attention, paged_decode_fp16

    kv_heads, q_heads, head_dim, bs = (2, 4, 64, 16) if smoke else (8, 32, 128, 256)
    lens = [1, 37, 16] if smoke else [1, 300, 1000, 2 * bs + 17]
    cos_sin = rope_cos_sin_cache(max(lens) + 1, head_dim, ROPE_THETA).to(device)
    scale = head_dim**-0.5
    pages_per_seq = -(-max(lens) // bs)
    num_blocks = len(lens) * pages_per_seq + 2
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    records = []

    def record(kernel: str, dtype: str, err: float, tol: float, **extra) -> None:
        records.append({"kernel": kernel, "dtype": dtype, "max_abs_err": err, "tolerance": tol, "ok": err <= tol,
                        **extra})

    for dtype in ("kvquant2", "kvquant3", "kvquant4"):
        store = make_store(dtype, kv_heads, head_dim, bs, device)
        gen = torch.Generator().manual_seed(1)
        block_table = torch.randperm(num_blocks, generator=gen)[: len(lens) * pages_per_seq]
        block_table = block_table.view(len(lens), -1).to(device, torch.int32)
        torch_cache = fresh_pages(store, num_blocks, device)
        triton_cache = torch_cache.clone()
        write_sequences(store, torch_cache, block_table, lens, cos_sin, torch.Generator().manual_seed(2), False)
        write_sequences(store, triton_cache, block_table, lens, cos_sin, torch.Generator().manual_seed(2), True)
        query = torch.randn(len(lens), q_heads, head_dim, generator=gen).to(device)
        expected = paged_decode_reference(query, torch_cache, block_table, seq_lens, store, cos_sin, scale)

        used = block_table.flatten().long()
        same = (torch_cache[used] == triton_cache[used]).float().mean().item()
        decoded = paged_decode_reference(query, triton_cache, block_table, seq_lens, store, cos_sin, scale)
        record("triton store", dtype, (decoded - expected).abs().max().item(), 1e-4, equal_byte_fraction=same)
        for q_dtype, tol in ((torch.float32, 1e-4), (torch.float16, 5e-3)):
            for splits in (1, 3, None):
                out = paged_decode_attention(query.to(q_dtype), torch_cache, block_table, seq_lens, store, cos_sin,
                                             scale, num_splits=splits)
                record("triton decode", dtype, (out.float() - expected).abs().max().item(), tol,
                       query=str(q_dtype).removeprefix("torch."), splits=splits or "auto")
            if cuda_kernel:
                from kvquant_vllm.kernels import cuda

                out = cuda.paged_decode_attention(query.to(q_dtype), torch_cache, block_table, seq_lens, store,
                                                  cos_sin, scale)
                record("cuda decode", dtype, (out.float() - expected).abs().max().item(), tol,
                       query=str(q_dtype).removeprefix("torch."))

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
    """Mean time of fn() in ms, CUDA events around each call, L2 flushed (a buffer rewritten) before each."""
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


def template_pages(store: PagedKVQuant, cos_sin: torch.Tensor, device: torch.device) -> torch.Tensor:
    """TEMPLATE_PAGES pages of one sequence written by the Triton store from random tokens (realistic code,
    scale and outlier-list contents; the timed caches repeat them)."""
    template = fresh_pages(store, TEMPLATE_PAGES, device)
    rows = torch.arange(TEMPLATE_PAGES, device=device, dtype=torch.int32)[None]
    write_sequences(store, template, rows, [TEMPLATE_PAGES * store.layout.block_size], cos_sin,
                    torch.Generator().manual_seed(3), True)
    sinks = store.layout.view(template, "sink")
    sinks[1:] = sinks[0]  # any page may start a timed sequence
    return template


def run_timing(args: argparse.Namespace, device: torch.device, cuda_kernel: bool, flush: torch.Tensor) -> list[dict]:
    from kvquant_vllm.kernels.triton_decode import paged_decode_attention, paged_decode_fp16

    h, hq, d = args.kv_heads, args.q_heads, args.head_dim
    scale = d**-0.5
    cos_sin = rope_cos_sin_cache(max(args.contexts), d, ROPE_THETA).to(device)
    combos = [(ctx, batch) for ctx in args.contexts for batch in args.batches]
    stores = {dtype: make_store(dtype, h, d, args.block_size, device) for dtype in args.dtypes}
    templates = {dtype: template_pages(store, cos_sin, device) for dtype, store in stores.items()}
    rows = []
    for ctx, batch in tqdm(combos, desc="decode timing"):
        seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
        query = torch.randn(batch, hq, d, device=device, dtype=torch.float16)
        entries = []

        pages = -(-ctx // args.fp16_block_size)
        fp16_bytes = 2 * batch * pages * args.fp16_block_size * h * d * 2
        if fits(fp16_bytes, device):
            shape = (batch * pages, args.fp16_block_size, h, d)
            key_cache = torch.randn(shape, device=device, dtype=torch.float16)
            value_cache = torch.randn(shape, device=device, dtype=torch.float16)
            table = torch.randperm(batch * pages, device=device).view(batch, pages).int()
            ms = time_ms(lambda: paged_decode_fp16(query, key_cache, value_cache, table, seq_lens, scale),
                         args.warmup, args.iters, flush)
            entries.append(("fp16", "triton", args.fp16_block_size, fp16_bytes, ms))
            del key_cache, value_cache
        for dtype, store in stores.items():
            pages = -(-ctx // args.block_size)
            page_bytes = batch * pages * store.layout.page_size_bytes
            if not fits(page_bytes, device):
                continue
            cache = templates[dtype].repeat(math.ceil(batch * pages / TEMPLATE_PAGES), 1)[: batch * pages]
            table = torch.randperm(batch * pages, device=device).view(batch, pages).int()
            kernels = {
                "triton": lambda: paged_decode_attention(query, cache, table, seq_lens, store, cos_sin, scale),
                "triton, 1 stage": lambda: paged_decode_attention(query, cache, table, seq_lens, store, cos_sin,
                                                                  scale, num_stages=1),
            }
            if cuda_kernel:
                from kvquant_vllm.kernels import cuda

                kernels["cuda"] = lambda: cuda.paged_decode_attention(query, cache, table, seq_lens, store, cos_sin,
                                                                      scale, max_seq_len=ctx)
            for name, fn in kernels.items():
                entries.append((dtype, name, args.block_size, page_bytes, time_ms(fn, args.warmup, args.iters, flush)))
            del cache
        torch.cuda.empty_cache()
        base = next((ms for dtype, _, _, _, ms in entries if dtype == "fp16"), None)
        for dtype, kernel, bs, nbytes, ms in entries:
            rows.append({"context": ctx, "batch": batch, "cache": dtype, "kernel": kernel, "block_size": bs,
                         "time_us": ms * 1e3, "speedup_vs_fp16": base / ms if base else None,
                         "bytes_read": nbytes, "bandwidth_GBps": nbytes / (ms * 1e-3) / 1e9})
    return rows


def fits(nbytes: int, device: torch.device) -> bool:
    """Whether a cache of nbytes fits beside what is allocated, with room for the kernels' buffers."""
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes < 0.8 * free


# --------------------------------------------------------------------------------------------- reports
def details(record: dict) -> str:
    """The fields of a correctness record besides kernel, cache, error and verdict."""
    return ", ".join(f"{k}={v:.6f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                     if k not in ("kernel", "dtype", "max_abs_err", "tolerance", "ok"))


def markdown(report: dict) -> str:
    lines = [
        f"# Paged decode attention kernels on {report['device']}",
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
    if report["timings"]:
        copy_bw = report["copy_bandwidth_GBps"]
        lines += [
            "",
            "## Decode time (one token per sequence; bytes = pages read)",
            "",
            "| context | batch | cache | kernel | block size | time (us) | speedup vs fp16 | GB/s | % of copy bandwidth |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in report["timings"]:
            speedup = f"{r['speedup_vs_fp16']:.2f}x" if r["speedup_vs_fp16"] else "n/a"
            lines.append(f"| {r['context']} | {r['batch']} | {r['cache']} | {r['kernel']} | {r['block_size']} "
                         f"| {r['time_us']:.1f} | {speedup} | {r['bandwidth_GBps']:.0f} "
                         f"| {100 * r['bandwidth_GBps'] / copy_bw:.0f} % |")
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
        if not args.smoke:
            print("the timing run needs a CUDA GPU; use --smoke for the correctness pass", file=sys.stderr)
            return 2
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("without a GPU the Triton kernels run in the interpreter: set TRITON_INTERPRET=1", file=sys.stderr)
            return 2
    cuda_kernel, cuda_note = cuda_kernel_status(args, device)
    print(f"CUDA C++ kernel: {cuda_note}", flush=True)
    correctness = check_correctness(device, cuda_kernel, args.smoke)
    for r in correctness:
        print(f"{'ok ' if r['ok'] else 'BAD'} {r['kernel']:<22} {r['dtype']:<9} err {r['max_abs_err']:.2e} "
              f"(tol {r['tolerance']:.0e}) {details(r)}")
    ok = all(r["ok"] for r in correctness)
    if args.smoke:
        return 0 if ok else 1

    import triton

    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
    report = {
        "device": torch.cuda.get_device_name(device),
        "command": "python " + shlex.join(["benchmarks/kernels.py", *sys.argv[1:]]),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda_kernel": cuda_note,
        "config": (f"{args.kv_heads} kv heads, {args.q_heads} query heads, head dim {args.head_dim}, fp16 queries; "
                   f"kvquant pages of {args.block_size} tokens, fp16 pages of {args.fp16_block_size} tokens; "
                   f"{args.warmup} warm-up + {args.iters} timed calls, L2 flushed before each"),
        "copy_bandwidth_GBps": copy_bandwidth_gbps(device, flush),
        "correctness": correctness,
        "timings": run_timing(args, device, cuda_kernel, flush),
    }
    slug = re.sub(r"[^a-z0-9]+", "-", report["device"].lower()).strip("-")
    atomic_write_text(args.out / f"kernels-{slug}.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(args.out / f"kernels-{slug}.md", markdown(report))
    print(markdown(report))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
