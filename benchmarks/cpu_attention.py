"""CPU attention kernels, one layer's call at a time: the C++ kvquant kernels (csrc/cpu) against vLLM's own CPU
attention over a 16-bit cache (the kernel that `auto` runs) and the PyTorch kvquant path, for decode batches and
prefill chunks of one model's attention geometry.

Pages are filled with the model's calibration from random keys and values; times are medians over repeats of one
call (all threads, torch.get_num_threads()); "ns/token-head" divides by the keys attended x kv heads, the unit of a
memory-bound kernel (each key is read once per kv head).

    python benchmarks/cpu_attention.py [--kv-heads 3 --gqa 3 --head-dim 64 --block-size 256] [--name cpu-attention]
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from kvquant_vllm.fsutil import atomic_write_text
from kvquant_vllm.kernels import cpu
from kvquant_vllm.quant.kvquant import kvquant_methods
from kvquant_vllm.quant.pagestore import PagedKVQuant
from kvquant_vllm.quant.rope import Rope
from kvquant_vllm.quant.synthetic import synthetic_calibration, synthetic_tokens

RESULTS = Path(__file__).parent / "results"
# (kind, requests, context tokens, query tokens per request): the shapes of benchmarks/throughput.py's steps.
SHAPES = [("decode", 32, 256, 1), ("decode", 32, 1024, 1), ("decode", 4, 8192, 1), ("decode", 1, 8192, 1),
          ("prefill", 1, 1024, 1024), ("prefill", 1, 8192, 512)]


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class KVQuantCase:
    """One layer's kvquant pages holding `requests` sequences of `context` tokens."""

    def __init__(self, args: argparse.Namespace, requests: int, context: int, rng: torch.Generator):
        spec = kvquant_methods()[args.dtype].spec
        calibration = synthetic_calibration(spec, rng, args.kv_heads, args.head_dim, rope_theta=100000.0)
        self.store = PagedKVQuant(args.dtype, calibration, 0, args.block_size)
        self.rope = Rope.default(args.head_dim, 100000.0)
        pages = -(-context // args.block_size)
        self.cache = torch.zeros(requests * pages, self.store.layout.page_size_bytes, dtype=torch.uint8)
        self.block_table = torch.randperm(requests * pages, generator=rng).view(requests, pages)
        key, value = synthetic_tokens(self.store.key_scale, self.store.key_offset, context, 0.004, rng)
        positions = torch.arange(context)
        for row in self.block_table:  # the same tokens in every request: the cost does not depend on them
            slots = row[positions // args.block_size] * args.block_size + positions % args.block_size
            self.store.store(self.cache, key, value, slots, positions)
        self.seq_lens = torch.full((requests,), context)

    @property
    def bytes_per_token_head(self) -> float:
        return self.store.layout.head_stride / self.store.layout.block_size


class VllmCase:
    """vLLM's CPU attention (the `auto` backend's kernel) over a 16-bit cache of the same shape."""

    def __init__(self, args: argparse.Namespace, requests: int, context: int, query_len: int, rng: torch.Generator):
        from vllm import _custom_ops as ops
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        self.ops = ops
        self.dtype = torch.bfloat16
        torch.cpu._init_amx()  # the process's permission to use AMX tiles, as vLLM's workers have it
        block = args.vllm_block_size
        self.isa = _get_attn_isa(self.dtype, block, args.head_dim)
        pages = -(-context // block)
        heads, d = args.kv_heads, args.head_dim
        kv_cache = torch.zeros(requests * pages, heads, block * 2, d, dtype=self.dtype)
        self.key_cache, self.value_cache = kv_cache.chunk(2, dim=2)
        self.block_table = torch.randperm(requests * pages, generator=rng).view(requests, pages).int()
        positions = torch.arange(context)
        for row in self.block_table:
            slots = (row[positions // block] * block + positions % block).long()
            key = torch.randn(context, heads, d, generator=rng).to(self.dtype)
            value = torch.randn(context, heads, d, generator=rng).to(self.dtype)
            ops.cpu_attn_reshape_and_cache(key, value, self.key_cache, self.value_cache, slots, self.isa)
        self.seq_lens = torch.full((requests,), context, dtype=torch.int32)
        self.query_start_loc = torch.arange(requests + 1, dtype=torch.int32) * query_len
        self.metadata = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=requests, num_heads=heads * args.gqa, num_kv_heads=heads, head_dim=d, seq_lens=self.seq_lens,
            dtype=self.dtype, query_start_loc=self.query_start_loc, causal=True, sliding_window_size=-1,
            isa=self.isa, enable_kv_split=False)

    def run(self, query: torch.Tensor, scale: float) -> torch.Tensor:
        out = torch.empty_like(query)
        self.ops.cpu_attention_with_kv_cache(
            query=query, key_cache=self.key_cache, value_cache=self.value_cache, output=out,
            query_start_loc=self.query_start_loc, seq_lens=self.seq_lens, scale=scale, causal=True,
            alibi_slopes=None, sliding_window=-1, block_table=self.block_table, softcap=0.0,
            scheduler_metadata=self.metadata, s_aux=None)
        return out


def measure(args: argparse.Namespace, kind: str, requests: int, context: int, query_len: int) -> dict:
    rng = torch.Generator().manual_seed(0)
    case = KVQuantCase(args, requests, context, rng)
    heads = args.kv_heads * args.gqa
    scale = args.head_dim**-0.5
    # bf16 queries for both kernels, as a bf16 model hands them over (the kvquant kernels then take prefill products
    # from AMX tiles where the CPU has them, as vLLM's does).
    query = torch.randn(requests * query_len, heads, args.head_dim, generator=rng).bfloat16()
    keys_attended = requests * (context if kind == "decode" else context - query_len + (query_len + 1) / 2)
    row = {"kind": kind, "requests": requests, "context": context, "query_tokens": query_len}
    if kind == "decode":
        kernel = lambda: cpu.paged_decode_attention(query, case.cache, case.block_table, case.seq_lens,  # noqa: E731
                                                    case.store, case.rope, scale)
    else:
        starts = torch.arange(requests + 1) * query_len
        kernel = lambda: cpu.paged_prefill_attention(query, case.cache, case.block_table, starts,  # noqa: E731
                                                     case.seq_lens, case.store, case.rope, scale)
    row["kvquant_ms"] = 1e3 * _median_time(kernel, args.repeats)
    vllm = VllmCase(args, requests, context, query_len, rng)
    row["vllm_bf16_ms"] = 1e3 * _median_time(lambda: vllm.run(query, scale), args.repeats)
    token_heads = keys_attended * args.kv_heads
    row["kvquant_ns_per_token_head"] = 1e6 * row["kvquant_ms"] / token_heads
    row["vllm_ns_per_token_head"] = 1e6 * row["vllm_bf16_ms"] / token_heads
    row["kvquant_bytes_per_token_head"] = case.bytes_per_token_head
    row["vllm_bytes_per_token_head"] = 2 * args.head_dim * 2
    row["ratio"] = row["vllm_bf16_ms"] / row["kvquant_ms"]
    print(json.dumps(row), flush=True)
    return row


def to_markdown(rows: list[dict], args: argparse.Namespace, command: str) -> str:
    lines = [
        "# CPU attention kernels, one layer's call",
        "",
        f"`{args.dtype}` pages (C++ kernels, {cpu.instruction_set()}) against vLLM's CPU attention over a bf16 cache "
        f"(`{VllmCase.__name__}`: the kernel of `--kv-cache-dtype auto`, block {args.vllm_block_size}), "
        f"{args.kv_heads} kv heads x {args.gqa} query heads each, head dim {args.head_dim}, kvquant block "
        f"{args.block_size}; {platform.machine()}, {torch.get_num_threads()} threads; median of {args.repeats} calls. "
        "Prefill rows: one chunk of `query tokens` at the end of `context`.",
        "",
        f"Command: `{command}`",
        "",
        "| kind | requests | context | query tokens | kvquant ms | vLLM bf16 ms | speed ratio | kvquant ns/token-head "
        "| vLLM ns/token-head | kvquant bytes/token-head | vLLM bytes/token-head |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['kind']} | {r['requests']} | {r['context']} | {r['query_tokens']} | {r['kvquant_ms']:.2f} "
            f"| {r['vllm_bf16_ms']:.2f} | {r['ratio']:.2f}x | {r['kvquant_ns_per_token_head']:.2f} "
            f"| {r['vllm_ns_per_token_head']:.2f} | {r['kvquant_bytes_per_token_head']:.1f} "
            f"| {r['vllm_bytes_per_token_head']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="cpu-attention")
    p.add_argument("--dtype", default="kvquant3")
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--gqa", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--vllm-block-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--shapes", help="kind:requests:context:query_tokens,... (default: the throughput benchmark's)")
    p.add_argument("--notes", type=Path, help="markdown file appended under the table")
    args = p.parse_args()
    shapes = SHAPES
    if args.shapes:
        shapes = [(k, int(r), int(c), int(q)) for k, r, c, q in (s.split(":") for s in args.shapes.split(","))]
    rows = [measure(args, *shape) for shape in shapes]
    command = "python " + shlex.join(["benchmarks/cpu_attention.py", *sys.argv[1:]])
    RESULTS.mkdir(exist_ok=True)
    atomic_write_text(RESULTS / f"{args.name}.json", json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    markdown = to_markdown(rows, args, command) + (f"\n{args.notes.read_text()}" if args.notes else "")
    atomic_write_text(RESULTS / f"{args.name}.md", markdown)
    print(markdown)


if __name__ == "__main__":
    main()
