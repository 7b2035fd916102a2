"""The CUDA C++ paged decode attention kernel of ``csrc/``: loading and the Python entry point.

The op ``torch.ops.kvquant.paged_decode`` comes from the library that ``pip install`` built (a CUDA build of
torch and nvcc present at install time, see :mod:`kvquant_vllm.kernels.cuda_build`) when it was built from the
current sources, else it is built just in time with :func:`torch.utils.cpp_extension.load` at first use, for the
device's architecture, into ``<cache>/torch_extensions/`` (see :func:`kvquant_vllm.models.cache_dir`).
This module imports on any machine (no CUDA, no vLLM needed); only calling the kernel needs a GPU (sm_80+).

``python -m kvquant_vllm.kernels.cuda [OUT_DIR]`` compiles every kernel for sm_90 without a GPU and reports
registers, spills and shared memory per kernel (``make check-cuda``).
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import logging
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kvquant_vllm.kernels.cuda_build import (
    CSRC,
    EXTENSION,
    NVCC_FLAGS,
    SOURCE,
    built_from_sources,
    hash_define,
)
from kvquant_vllm.models import cache_dir
from kvquant_vllm.quant.paged import PageLayout
from kvquant_vllm.quant.rope import Rope

if TYPE_CHECKING:
    from kvquant_vllm.quant.pagestore import PagedKVQuant

logger = logging.getLogger(__name__)

HEAD_DIMS = (64, 128, 256)
BITS = (2, 3, 4)
QUERY_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# C++ names of the query dtypes in the kernels' template arguments.
CXX_DTYPES = {torch.float16: "__half", torch.bfloat16: "__nv_bfloat16", torch.float32: "float"}
MIN_CAPABILITY = (8, 0)  # tensor-core mma.sync with bf16/tf32 and cp.async
# The order in which the op takes the page's section offsets (the C++ struct PageSections).
SECTION_ORDER = ("key_codes", "value_codes", "value_scale", "value_offset", "value_out_val", "value_out_idx",
                 "key_out_val", "key_out_pos", "key_out_count", "sink")
CHECK_ARCH = "sm_90"


@functools.cache
def available() -> bool:
    """True when the kernel can run here: a CUDA build of torch, a visible GPU of compute capability 8.0 or more,
    and the library loads (a first JIT build takes about a minute). Decided once per process."""
    if torch.version.cuda is None or not torch.cuda.is_available():
        return False
    device = torch.device("cuda", torch.cuda.current_device())
    if torch.cuda.get_device_capability(device) < MIN_CAPABILITY:
        return False
    try:
        _load_op(_device_arch(device))
    except Exception as exc:  # a missing nvcc or a failed build: report it, the caller falls back
        logger.warning("kvquant CUDA decode kernel unavailable: %s", exc)
        return False
    return True


def paged_decode_attention(
    query: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    store: PagedKVQuant,
    rope: Rope,
    scale: float,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """Decode attention of one new token per sequence over its kvquant pages: the contract of
    :func:`kvquant_vllm.kernels.reference.paged_decode_reference`.

    query: [num_seqs, num_q_heads, D] fp16/bf16/fp32, post-RoPE, the token at position seq_len - 1;
    num_q_heads a multiple of the store's num_kv_heads (GQA), D in :data:`HEAD_DIMS`.
    cache: [num_blocks, ...] uint8, each page contiguous, 16-byte aligned and at least
    ``store.layout.page_size_bytes`` (vLLM's [num_blocks, 1, block_size, C] view is fine).
    block_table: [num_seqs, max_blocks] int32 block ids; seq_lens: [num_seqs] int32, tokens attended
    (the current one included). store: the layer's :class:`PagedKVQuant` (its tables on the query's device).
    rope: the model's RoPE (inverse frequencies and scaling); keys are rotated in the kernel.
    scale: softmax scale. max_seq_len: an upper bound of ``seq_lens`` that plans the split-K partitions;
    computed from ``seq_lens`` (a device sync) when None, so pass it under CUDA graphs.

    Returns [num_seqs, num_q_heads, D] of the query's dtype. An empty sequence gives zeros.
    """
    pages = _check_inputs(query, cache, block_table, seq_lens, store, rope)
    if query.device.type != "cuda":
        raise RuntimeError(
            f"the kvquant CUDA decode kernel needs CUDA tensors, got {query.device.type} ones; use "
            "kvquant_vllm.kernels.reference or the Triton kernels on this device"
        )
    _load_op(_device_arch(query.device))
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max()) if seq_lens.numel() else 0
    lay = store.layout
    if max_seq_len > block_table.shape[1] * lay.block_size:
        raise ValueError(f"max_seq_len {max_seq_len} exceeds the block table ({block_table.shape[1]} blocks of "
                         f"{lay.block_size} tokens)")
    query = query if query.stride(-1) == 1 else query.contiguous()
    block_table = block_table if block_table.stride(-1) == 1 else block_table.contiguous()
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    torch.ops.kvquant.paged_decode(
        out, query, pages, block_table, seq_lens.contiguous(),
        store.key_scale.float().contiguous(), store.key_offset.float().contiguous(),
        store.key_books[1].float().contiguous(), store.value_books[1].float().contiguous(),
        rope.inv_freq.float().contiguous(), float(scale) * rope.scaling, max_seq_len, lay.bits, lay.block_size,
        lay.head_stride, _section_offsets(lay), lay.key_outlier_capacity, lay.value_outliers_per_vector, store.sink,
    )
    return out


def _check_inputs(
    query: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
    store: PagedKVQuant, rope: Rope,
) -> torch.Tensor:
    """Raise a clear error on any input the kernel does not take; return the cache as [num_blocks, page bytes]."""
    lay = store.layout
    if lay.head_dim not in HEAD_DIMS:
        raise ValueError(f"head dim {lay.head_dim} is not supported by the CUDA decode kernel "
                         f"(supported: {', '.join(map(str, HEAD_DIMS))})")
    if lay.bits not in BITS:
        raise ValueError(f"{lay.bits}-bit pages are not supported by the CUDA decode kernel (supported: 2, 3, 4)")
    if lay.block_size % 16:
        raise ValueError(f"the CUDA decode kernel needs a block size that is a multiple of 16, not {lay.block_size}")
    if query.dtype not in QUERY_DTYPES:
        raise TypeError(f"query must be float16, bfloat16 or float32, got {query.dtype}")
    if query.dim() != 3 or query.shape[2] != lay.head_dim:
        raise ValueError(f"query must be [num_seqs, num_q_heads, {lay.head_dim}], got {list(query.shape)}")
    num_seqs, num_q_heads = query.shape[:2]
    if num_q_heads % lay.num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads are not a multiple of {lay.num_kv_heads} kv heads")
    pages = lay.page_rows(cache)
    if pages.data_ptr() % 16 or pages.stride(0) % 16:
        raise ValueError("cache pages must start at 16-byte aligned addresses (the kernel copies 16-byte chunks)")
    if block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.shape[0] != num_seqs:
        raise TypeError(f"block_table must be int32 [{num_seqs}, max_blocks], got {block_table.dtype} "
                        f"{list(block_table.shape)}")
    if seq_lens.dtype != torch.int32 or seq_lens.shape != (num_seqs,):
        raise TypeError(f"seq_lens must be int32 [{num_seqs}], got {seq_lens.dtype} {list(seq_lens.shape)}")
    if not isinstance(rope, Rope):
        raise TypeError(f"rope must be a kvquant_vllm.quant.rope.Rope (inverse frequencies), got {type(rope).__name__}")
    if rope.head_dim != lay.head_dim:
        raise ValueError(f"the RoPE rotates {rope.head_dim} channels, the pages hold {lay.head_dim}")
    tables = {"key_scale": store.key_scale, "key_offset": store.key_offset,
              "key codebook": store.key_books[1], "value codebook": store.value_books[1]}
    tensors = {"cache": cache, "block_table": block_table, "seq_lens": seq_lens, "rope inv_freq": rope.inv_freq,
               **{f"store {name}": t for name, t in tables.items()}}
    for name, t in tensors.items():
        if t.device != query.device:
            raise ValueError(f"{name} is on {t.device}, the query on {query.device}")
    return pages


def _section_offsets(layout: PageLayout) -> list[int]:
    """Byte offsets of the sections within a head's segment, in :data:`SECTION_ORDER`."""
    sections = layout.sections()
    if set(sections) != set(SECTION_ORDER):
        raise RuntimeError(f"the page layout's sections {sorted(sections)} are not the ones the CUDA kernel reads")
    return [sections[name][0] for name in SECTION_ORDER]


def _device_arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def installed_library() -> Path | None:
    """The library that ``pip install`` built, when there is one and it was built from the current sources
    (without a source checkout there is nothing to compare: it is taken as it is)."""
    spec = importlib.util.find_spec(EXTENSION)
    if spec is None or spec.origin is None:
        return None
    library = Path(spec.origin)
    if SOURCE.is_file() and not built_from_sources(library):
        logger.info("kvquant CUDA decode kernel: %s predates the sources in %s, building them instead", library, CSRC)
        return None
    return library


@functools.cache
def _load_op(arch: str) -> None:
    """Load the installed library, or build (once per machine, cached on disk) and load one for ``arch``;
    registers torch.ops.kvquant."""
    started = time.perf_counter()
    library = installed_library()
    if library is not None:
        torch.ops.load_library(str(library))
    else:
        from torch.utils import cpp_extension

        if not SOURCE.is_file():
            raise RuntimeError(f"{SOURCE} is missing: without an installed build, the CUDA kernel is built from a "
                               "source checkout of the package")
        build = cache_dir() / "torch_extensions" / f"kvquant_decode-{arch}-torch{torch.__version__}"
        build.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(
            name="kvquant_decode", sources=[str(SOURCE)],
            extra_cflags=["-O3", hash_define()], extra_cuda_cflags=[*NVCC_FLAGS, hash_define(), f"-arch={arch}"],
            build_directory=str(build), is_python_module=False,
        )
        library = build
    logger.info("kvquant CUDA decode kernel loaded from %s for %s in %.1f s", library, arch,
                time.perf_counter() - started)


# ------------------------------------------------------------------------------------------------ compile check
def check_command(out_dir: Path, arch: str = CHECK_ARCH) -> list[str]:
    """The nvcc command that compiles every kernel instantiation for ``arch`` into ``out_dir`` with the flags of
    the builds, ptxas reporting each kernel's resources; it needs the torch headers only (no GPU, any torch)."""
    from torch.utils import cpp_extension

    includes = cpp_extension.include_paths()
    flags = [*cpp_extension.COMMON_NVCC_FLAGS, "--compiler-options", "-fPIC", *NVCC_FLAGS, hash_define()]
    # CPU builds of torch ship the c10/cuda headers without the one that CUDA builds generate.
    if not any((Path(d) / "c10/cuda/impl/cuda_cmake_macros.h").is_file() for d in includes):
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return [
        "nvcc", f"-arch={arch}", *flags, "-Xptxas", "-v", *(f"-I{d}" for d in includes),
        "-c", str(SOURCE), "-o", str(Path(out_dir) / "kvquant_decode.o"),
    ]


def kernel_symbol(dtype: torch.dtype, head_dim: int, bits: int | None = None) -> str:
    """The mangled name of the decode kernel (bits given) or of the reduce kernel (bits None)."""
    mangled = {torch.float16: "6__half", torch.bfloat16: "13__nv_bfloat16", torch.float32: "f"}[dtype]
    if bits is None:
        return f"_ZN7kvquant26paged_decode_reduce_kernelI{mangled}Li{head_dim}EEEvNS_12DecodeParamsE"
    return f"_ZN7kvquant19paged_decode_kernelI{mangled}Li{head_dim}ELi{bits}EEEvNS_12DecodeParamsE"


def ptxas_resources(ptxas_output: str) -> dict[str, dict[str, int]]:
    """Per compiled kernel (mangled name): registers, stack frame and spill bytes, static shared memory, from
    ptxas -v output."""
    report: dict[str, dict[str, int]] = {}
    for block in re.split(r"(?=ptxas info\s+: Compiling entry function)", ptxas_output):
        name = re.search(r"Compiling entry function '(\w+)'", block)
        if not name:
            continue
        frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", block)
        registers = re.search(r"Used (\d+) registers", block)
        smem = re.search(r"(\d+) bytes smem", block)
        report[name[1]] = {
            "registers": int(registers[1]) if registers else -1,
            "stack": int(frame[1]) if frame else 0,
            "spill_stores": int(frame[2]) if frame else 0,
            "spill_loads": int(frame[3]) if frame else 0,
            "static_smem": int(smem[1]) if smem else 0,
        }
    return report


def dynamic_smem_bytes(out_dir: Path) -> dict[tuple[int, int], int]:
    """(head dim, bits) -> the decode kernel's dynamic shared memory (SmemLayout::BYTES), from a host program
    compiled against the kernel header."""
    program = Path(out_dir) / "smem_bytes.cu"
    lines = [f'  std::printf("{d} {b} %d\\n", kvquant::SmemLayout<{d}, {b}>::BYTES);'
             for d, b in itertools.product(HEAD_DIMS, BITS)]
    program.write_text('#include <cstdio>\n#include "kvquant_decode.cuh"\nint main() {\n' + "\n".join(lines)
                       + "\n}\n")
    binary = Path(out_dir) / "smem_bytes"
    subprocess.run(["nvcc", "-std=c++20", f"-I{CSRC}", str(program), "-o", str(binary)], check=True,
                   capture_output=True, text=True)
    printed = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    return {(int(d), int(b)): int(n) for d, b, n in (line.split() for line in printed.splitlines())}


def main() -> int:
    """Compile check without a GPU: ``python -m kvquant_vllm.kernels.cuda [OUT_DIR]``."""
    if shutil.which("nvcc") is None:
        print("nvcc not found on PATH: the CUDA compile check needs the CUDA toolkit", file=sys.stderr)
        return 1
    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("build/check-cuda")
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = check_command(out_dir)
    print(" ".join(cmd), flush=True)
    started = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        print(result.stdout + result.stderr, file=sys.stderr)
        print(f"FAILED in {time.perf_counter() - started:.0f} s")
        return result.returncode
    resources = ptxas_resources(result.stderr)
    smem = dynamic_smem_bytes(out_dir)
    print(f"{'kernel':<44} {'registers':>9} {'spill st/ld':>11} {'stack':>5} {'shared memory':>13}")
    missing = 0
    for dtype, head_dim, bits in itertools.product(QUERY_DTYPES, HEAD_DIMS, (*BITS, None)):
        name = f"paged_decode_{'reduce' if bits is None else 'kernel'}<{CXX_DTYPES[dtype]}, {head_dim}" + (
            ">" if bits is None else f", {bits}>")
        info = resources.get(kernel_symbol(dtype, head_dim, bits))
        if info is None:
            missing += 1
            print(f"{name:<44} MISSING")
            continue
        shared = "num_partitions x 4" if bits is None else str(smem[head_dim, bits] + info["static_smem"])
        print(f"{name:<44} {info['registers']:>9} {info['spill_stores']:>5}/{info['spill_loads']:<5} "
              f"{info['stack']:>5} {shared:>13}")
    print(f"{'ok' if not missing else 'FAILED'} in {time.perf_counter() - started:.0f} s")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
