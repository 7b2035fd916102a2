"""The CUDA C++ paged decode attention kernel of ``csrc/``: JIT build and Python entry point.

The extension is built with :func:`torch.utils.cpp_extension.load` at first use on a CUDA machine,
for the device's architecture, into ``<cache>/torch_extensions/`` (see
:func:`kvquant_vllm.models.cache_dir`), and registers the op ``torch.ops.kvquant.paged_decode``.
This module imports on any machine (no CUDA, no vLLM needed); only calling the kernel needs a GPU.

``python -m kvquant_vllm.kernels.cuda`` compiles the sources for sm_90 without a GPU (``make check-cuda``).
"""

from __future__ import annotations

import functools
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kvquant_vllm.models import cache_dir
from kvquant_vllm.quant.paged import PageLayout

if TYPE_CHECKING:
    from kvquant_vllm.quant.pagestore import PagedKVQuant

logger = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parents[2] / "csrc"
SOURCE = CSRC / "kvquant_decode.cu"
HEAD_DIMS = (64, 128, 256)
BITS = (2, 3, 4)
QUERY_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The order in which the op takes the page's section offsets (the C++ struct PageSections).
SECTION_ORDER = ("key_codes", "value_codes", "value_scale", "value_offset", "value_out_val", "value_out_idx",
                 "key_out_val", "key_out_pos", "key_out_count", "sink")
# nvcc flags of both the JIT build and the compile check, besides the architecture. No --use_fast_math:
# the kernel's only transcendental is one expf per logit, so approximate math would buy no measurable time.
NVCC_FLAGS = ("-O3",)
CHECK_ARCH = "sm_90"


@functools.cache
def available() -> bool:
    """True when the kernel can run here: a CUDA build of torch, a visible GPU, and the extension builds
    (the first call on a machine compiles it, which takes about a minute). Decided once per process."""
    if torch.version.cuda is None or not torch.cuda.is_available():
        return False
    try:
        _load_op(_device_arch(torch.device("cuda", torch.cuda.current_device())))
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
    cos_sin_cache: torch.Tensor,
    scale: float,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """Decode attention of one new token per sequence over its kvquant pages.

    query: [num_seqs, num_q_heads, D] fp16/bf16/fp32, post-RoPE, the token at position seq_len - 1;
    num_q_heads a multiple of the store's num_kv_heads (GQA), D in :data:`HEAD_DIMS`.
    cache: [num_blocks, ...] uint8, each page contiguous and at least ``store.layout.page_size_bytes``
    (vLLM's [num_blocks, 1, block_size, C] view is fine).
    block_table: [num_seqs, max_blocks] int32 block ids; seq_lens: [num_seqs] int32, tokens attended
    (the current one included). store: the layer's :class:`PagedKVQuant` (its tables on the same device).
    cos_sin_cache: [max_position, D] float32, cos of the D/2 frequencies then their sin (vLLM's
    rotate-half RoPE cache); keys are rotated at their positions in the kernel.
    scale: softmax scale. max_seq_len: an upper bound of ``seq_lens`` that sizes the split-K partitions;
    computed from ``seq_lens`` (a device sync) when None, so pass it under CUDA graphs.

    Returns [num_seqs, num_q_heads, D] of the query's dtype. An empty sequence gives zeros.
    """
    pages = _check_inputs(query, cache, block_table, seq_lens, store, cos_sin_cache)
    if query.device.type != "cuda":
        raise RuntimeError(
            f"the kvquant CUDA decode kernel needs CUDA tensors, got {query.device.type} ones; "
            "use the PyTorch path of kvquant_vllm.quant.pagestore on this device"
        )
    _load_op(_device_arch(query.device))
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max()) if seq_lens.numel() else 0
    return _launch(query, pages, block_table, seq_lens, store, cos_sin_cache, scale, max_seq_len)


def _check_inputs(
    query: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
    store: PagedKVQuant, cos_sin_cache: torch.Tensor,
) -> torch.Tensor:
    """Raise a clear error on any input the kernel does not take; return the cache as [num_blocks, page bytes]."""
    lay = store.layout
    if lay.head_dim not in HEAD_DIMS:
        raise ValueError(f"head dim {lay.head_dim} is not supported by the CUDA decode kernel "
                         f"(supported: {', '.join(map(str, HEAD_DIMS))})")
    if lay.bits not in BITS:
        raise ValueError(f"{lay.bits}-bit pages are not supported by the CUDA decode kernel (supported: 2, 3, 4)")
    if query.dtype not in QUERY_DTYPES:
        raise TypeError(f"query must be float16, bfloat16 or float32, got {query.dtype}")
    if query.dim() != 3 or query.shape[2] != lay.head_dim:
        raise ValueError(f"query must be [num_seqs, num_q_heads, {lay.head_dim}], got {list(query.shape)}")
    num_seqs, num_q_heads = query.shape[:2]
    if num_q_heads % lay.num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads are not a multiple of {lay.num_kv_heads} kv heads")
    if cache.dtype != torch.uint8 or cache.dim() < 2:
        raise TypeError(f"cache must be a uint8 tensor [num_blocks, ...], got {cache.dtype} {list(cache.shape)}")
    try:
        pages = cache.view(cache.shape[0], -1)
    except RuntimeError as exc:
        raise ValueError("cache must hold each page contiguously") from exc
    if pages.shape[1] < lay.page_size_bytes:
        raise ValueError(f"cache pages hold {pages.shape[1]} bytes, the layout needs {lay.page_size_bytes}")
    if pages.data_ptr() % 4 or pages.stride(0) % 4:
        raise ValueError("cache pages must start at 4-byte aligned addresses")
    if block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.shape[0] != num_seqs:
        raise TypeError(f"block_table must be int32 [{num_seqs}, max_blocks], got {block_table.dtype} "
                        f"{list(block_table.shape)}")
    if seq_lens.dtype != torch.int32 or seq_lens.shape != (num_seqs,):
        raise TypeError(f"seq_lens must be int32 [{num_seqs}], got {seq_lens.dtype} {list(seq_lens.shape)}")
    if cos_sin_cache.dtype != torch.float32 or cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != lay.head_dim:
        raise TypeError(f"cos_sin_cache must be float32 [max_position, {lay.head_dim}], got "
                        f"{cos_sin_cache.dtype} {list(cos_sin_cache.shape)}")
    tables = {"key_scale": store.key_scale, "key_offset": store.key_offset,
              "key codebook": store.key_books[1], "value codebook": store.value_books[1]}
    tensors = {"cache": cache, "block_table": block_table, "seq_lens": seq_lens, "cos_sin_cache": cos_sin_cache,
               **{f"store {name}": t for name, t in tables.items()}}
    for name, t in tensors.items():
        if t.device != query.device:
            raise ValueError(f"{name} is on {t.device}, the query on {query.device}")
    return pages


def _launch(
    query: torch.Tensor, pages: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
    store: PagedKVQuant, cos_sin_cache: torch.Tensor, scale: float, max_seq_len: int,
) -> torch.Tensor:
    """Call the op on checked inputs; pages: [num_blocks, page bytes] uint8."""
    lay = store.layout
    if max_seq_len > block_table.shape[1] * lay.block_size or max_seq_len > cos_sin_cache.shape[0]:
        raise ValueError(f"max_seq_len {max_seq_len} exceeds the block table ({block_table.shape[1]} blocks of "
                         f"{lay.block_size}) or the RoPE cache ({cos_sin_cache.shape[0]} positions)")
    query, block_table, cos_sin_cache = (_rows_contiguous(t) for t in (query, block_table, cos_sin_cache))
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    torch.ops.kvquant.paged_decode(
        out, query, pages, block_table, seq_lens.contiguous(),
        store.key_scale.float().contiguous(), store.key_offset.float().contiguous(),
        store.key_books[1].float().contiguous(), store.value_books[1].float().contiguous(),
        cos_sin_cache, float(scale), max_seq_len, lay.bits, lay.block_size,
        _section_offsets(lay), lay.key_outlier_capacity, lay.value_outliers_per_vector,
        2 if lay.position_dtype == torch.int16 else 4, store.sink, _vector_bytes(pages, lay),
    )
    return out


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dim is contiguous (the op takes other strides as they are), else a copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _section_offsets(layout: PageLayout) -> list[int]:
    """Byte offsets of the page's sections in :data:`SECTION_ORDER`."""
    sections = layout.sections()
    if set(sections) != set(SECTION_ORDER):
        raise RuntimeError(f"the page layout's sections {sorted(sections)} are not the ones the CUDA kernel reads")
    return [sections[name][0] for name in SECTION_ORDER]


def _vector_bytes(pages: torch.Tensor, layout: PageLayout) -> int:
    """Widest load (16, 8 or 4 bytes) that every packed code vector of ``pages`` is aligned for."""
    sections = layout.sections()
    code_bytes = sections["key_codes"][1][-1]
    quantities = (pages.data_ptr(), pages.stride(0), sections["key_codes"][0], sections["value_codes"][0], code_bytes)
    return next(v for v in (16, 8, 4) if all(q % v == 0 for q in quantities))


def _device_arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


@functools.cache
def _load_op(arch: str) -> None:
    """Build (once per machine, cached on disk) and load the extension for ``arch``; registers torch.ops.kvquant."""
    from torch.utils import cpp_extension

    if not SOURCE.is_file():
        raise RuntimeError(f"{SOURCE} is missing: the CUDA kernel is built from a source checkout of the package")
    build = cache_dir() / "torch_extensions" / f"kvquant_decode-{arch}-torch{torch.__version__}"
    build.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cpp_extension.load(
        name="kvquant_decode", sources=[str(SOURCE)], extra_cuda_cflags=[*NVCC_FLAGS, f"-arch={arch}"],
        build_directory=str(build), is_python_module=False,
    )
    logger.info("kvquant CUDA decode kernel loaded for %s in %.1f s", arch, time.perf_counter() - started)


def check_command(out_dir: Path, arch: str = CHECK_ARCH) -> list[str]:
    """The nvcc command that compiles every kernel instantiation for ``arch`` into ``out_dir`` with the
    flags of the JIT build; it needs the torch headers only (no GPU, any torch build)."""
    from torch.utils import cpp_extension

    includes = cpp_extension.include_paths()
    flags = [*cpp_extension.COMMON_NVCC_FLAGS, "-std=c++20", "--compiler-options", "-fPIC", *NVCC_FLAGS]
    # CPU builds of torch ship the c10/cuda headers without the one that CUDA builds generate.
    if not any((Path(d) / "c10/cuda/impl/cuda_cmake_macros.h").is_file() for d in includes):
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return [
        "nvcc", f"-arch={arch}", *flags, *(f"-I{d}" for d in includes),
        "-c", str(SOURCE), "-o", str(Path(out_dir) / "kvquant_decode.o"),
    ]


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
    rc = subprocess.run(cmd).returncode
    print(f"{'ok' if rc == 0 else 'FAILED'} in {time.perf_counter() - started:.0f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
