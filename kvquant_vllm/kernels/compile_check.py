"""Compile the Triton kernels for a GPU architecture on a machine without one (Triton's ahead-of-time path).

Triton's interpreter, which runs the kernels in the CPU tests, accepts programs that its compiler rejects
(types, shapes, ops a backend lacks). Here the real launchers run on CPU tensors with every launch
captured instead of run, and each captured launch (its argument types and constexprs, as the JIT would
specialise them) is compiled to a cubin for the target by Triton's NVIDIA backend and its bundled ptxas,
which also reports each kernel's registers, spills and shared memory.

    python -m kvquant_vllm.kernels.compile_check [--arch 90]

Needs Triton's compiler, not its interpreter: TRITON_INTERPRET must be unset.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("kvquant_vllm.kernels.compile_check compiles kernels: unset TRITON_INTERPRET")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction, mangle_type  # noqa: E402

from kvquant_vllm.kernels.triton_attention import (  # noqa: E402
    paged_decode_attention,
    paged_decode_fp16,
    paged_prefill_attention,
)
from kvquant_vllm.kernels.triton_store import store_tokens  # noqa: E402
from kvquant_vllm.quant.kvquant import kvquant_methods  # noqa: E402
from kvquant_vllm.quant.pagestore import PagedKVQuant  # noqa: E402
from kvquant_vllm.quant.rope import Rope  # noqa: E402
from kvquant_vllm.quant.synthetic import synthetic_calibration  # noqa: E402


@dataclass
class Launch:
    kernel: JITFunction
    args: tuple
    kwargs: dict[str, Any]


@contextmanager
def captured_launches() -> Iterator[list[Launch]]:
    """Within the block, ``kernel[grid](...)`` records its arguments and runs nothing."""
    launches: list[Launch] = []
    run = JITFunction.run

    def capture(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs))

    JITFunction.run = capture
    try:
        yield launches
    finally:
        JITFunction.run = run


def compile_launch(launch: Launch, target: GPUTarget):
    """The launch's kernel compiled for ``target`` with the launch's argument types and constexprs."""
    fn = launch.kernel
    names = [p.name for p in fn.params]
    bound = inspect.signature(fn.fn).bind_partial(*launch.args, **{k: v for k, v in launch.kwargs.items()
                                                                    if k in names})
    options = {k: v for k, v in launch.kwargs.items() if k not in names}
    signature, constexprs = {}, {}
    for p in fn.params:
        value = bound.arguments.get(p.name, p.default)
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", value
        else:
            signature[p.name] = mangle_type(value)
    return triton.compile(ASTSource(fn, signature, constexprs), target=target, options=options)


def resource_usage(kernel) -> str:
    """Registers, spills and shared memory of a compiled kernel, as ptxas reports them for its PTX."""
    ptx = kernel.asm["ptx"]
    arch = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
    ptxas = get_ptxas(kernel.metadata.target.arch).path  # the ptxas that Triton compiled the cubin with
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        result = subprocess.run([ptxas, f"--gpu-name={arch}", "-v", path, "-o", os.devnull], capture_output=True,
                                text=True)
    info = result.stderr
    registers = re.search(r"Used (\d+) registers", info)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    return (f"{registers.group(1) if registers else '?'} registers, "
            f"{spills.group(1) + '/' + spills.group(2) if spills else '?'} bytes spilled (stores/loads), "
            f"{kernel.metadata.shared} bytes shared memory")


def _store(dtype: str, block_size: int, kv_heads: int, head_dim: int) -> PagedKVQuant:
    cal = synthetic_calibration(kvquant_methods()[dtype].spec, torch.Generator().manual_seed(0), kv_heads, head_dim)
    return PagedKVQuant(dtype, cal, 0, block_size)


# dtype, block size, kv heads, head dim, query heads per kv head, activation dtype: the benchmark's shape,
# the bundled model's, and the layouts' corners (no outliers, no sink, head dim 256).
CASES = [
    ("kvquant3", 256, 8, 128, 4, torch.float16),
    ("kvquant4", 256, 8, 128, 4, torch.float16),
    ("kvquant2", 256, 3, 64, 3, torch.bfloat16),
    ("kvquant3", 256, 3, 64, 3, torch.bfloat16),
    ("kvquant3-nooutliers", 16, 2, 64, 1, torch.float32),
    ("kvquant3-nosink", 32, 1, 256, 8, torch.float16),
]


def launches_of_every_kernel() -> list[Launch]:
    """One captured launch per kernel and case: store, kvquant decode (split-K, so the merge too), prefill, fp16
    baseline."""
    with captured_launches() as launches:
        for dtype, block_size, kv_heads, head_dim, gqa, act in CASES:
            store = _store(dtype, block_size, kv_heads, head_dim)
            rope = Rope.default(head_dim, 10000.0)
            cache = torch.zeros(4, store.layout.page_size_bytes, dtype=torch.uint8)
            tokens = torch.randn(3, kv_heads, head_dim, dtype=act)
            positions = torch.tensor([0, 1, 2])
            store_tokens(cache, tokens, tokens, positions, positions, store, *rope.cos_sin(positions))
            query = torch.randn(2, kv_heads * gqa, head_dim, dtype=act)
            table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
            lens = torch.tensor([block_size + 1, 5], dtype=torch.int32)
            paged_decode_attention(query, cache, table, lens, store, rope, head_dim**-0.5, num_splits=2)
            query = torch.randn(7, kv_heads * gqa, head_dim, dtype=act)
            paged_prefill_attention(query, cache, table, torch.tensor([0, 2, 7], dtype=torch.int32), lens, store,
                                    rope, head_dim**-0.5)
        key_cache = torch.zeros(4, 16, 8, 128, dtype=torch.float16)
        paged_decode_fp16(torch.randn(2, 32, 128, dtype=torch.float16), key_cache, key_cache,
                          torch.tensor([[0, 1], [2, 3]], dtype=torch.int32), torch.tensor([20, 3], dtype=torch.int32),
                          128**-0.5, num_splits=2)
    return launches


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 for H100/H200")
    args = p.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    failed = 0
    for launch in launches_of_every_kernel():
        constexprs = {k: v for k, v in launch.kwargs.items()
                      if k in ("BITS", "HEAD_DIM", "GQA", "BLOCK_Q", "NUM_SPLITS")}
        start = time.perf_counter()
        try:
            kernel = compile_launch(launch, target)
        except Exception as exc:  # report every kernel, then fail
            failed += 1
            print(f"FAILED {launch.kernel.__name__} {constexprs}: {type(exc).__name__}: {exc}", flush=True)
            continue
        print(f"ok {launch.kernel.__name__} {constexprs}: sm_{args.arch} cubin of {len(kernel.asm['cubin'])} bytes, "
              f"{resource_usage(kernel)}, {time.perf_counter() - start:.1f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
