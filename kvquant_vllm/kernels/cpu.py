"""The C++ CPU kernels of ``csrc/cpu``: paged attention straight from kvquant pages, decode and prefill chunks, with
the contract of :mod:`kvquant_vllm.kernels.reference`, and the store of new tokens into the pages.

The kernels are a torch extension that registers ``torch.ops.kvquant_cpu.paged_attention``. ``setup.py`` builds
it at install where torch and a C++ compiler are there (``kvquant_vllm/_cpu_kernels*.so``, see
:mod:`kvquant_vllm.kernels.cpu_build`); otherwise, or when that build predates the sources, it is built just in
time with :func:`torch.utils.cpp_extension.load` into ``<cache>/torch_extensions/`` (see
:func:`kvquant_vllm.models.cache_dir`). :func:`available` says whether either worked (once per process, with one
warning when neither did: the caller then runs the PyTorch path).

The op picks the widest instruction set the CPU has at run time: AMX (AVX-512 with bf16 tiles), AVX512-BF16 (AVX-512
with bf16 dot products), AVX-512, AVX2 (with FMA and F16C), or portable C++; ``isa=`` forces one. For a bf16 model
(bf16 queries) the AMX and AVX512-BF16 kernels take the products of prefill blocks in bf16 (tiles, or ``vdpbf16ps``),
as vLLM's own CPU attention does; other queries are attended in float32. Work is spread over torch's intra-op threads
(``torch.get_num_threads()``): one item per (request, block of query tokens, kv head, split of the context). Nothing
here imports vLLM.

Batch invariance: a query token's result depends on its request alone (its pages, its position, its query), bit
for bit, never on the other requests of the call, on how vLLM chunked the prompt or on the thread count. A context
is split at fixed page ranges of :data:`SPLIT_TOKENS` (the same for a decode token and for a prefill chunk's rows,
merged in split order), and every row runs the same arithmetic whatever the size of its work item. Outputs under
load then differ from those of the request alone only where the queries, keys and values that vLLM hands over do.
Not so for a bf16 model on a CPU with AMX or AVX512-BF16: there a prefill item's rows in whole blocks of 16 take
bf16 products and the others float32 ones, so a row's rounding depends on where the scheduler cut its chunk.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kvquant_vllm.kernels import cpu_build
from kvquant_vllm.models import cache_dir
from kvquant_vllm.quant.paged import PageLayout
from kvquant_vllm.quant.rope import Rope

if TYPE_CHECKING:
    from kvquant_vllm.quant.pagestore import PagedKVQuant

logger = logging.getLogger(__name__)

INSTRUCTION_SETS = ("amx", "avx512bf16", "avx512", "avx2", "scalar")  # widest first
HEAD_DIMS = (64, 128, 256)
LOG2E = math.log2(math.e)
# Contexts attend in splits of this many tokens (whole pages, at least one): enough items for every thread with
# few long requests; short contexts (the decode batches of a busy server) run unsplit, without a merge.
SPLIT_TOKENS = 1024


@functools.cache
def available() -> bool:
    """True when the kernels can run here (built at install, or just in time: the first call of a process may
    compile them, about a minute). Decided once per process; a failure is logged once as a warning."""
    try:
        _load_op()
    except Exception as exc:  # no compiler, a failed build: the caller falls back to the PyTorch path
        logger.warning("kvquant C++ CPU attention kernels unavailable, attention runs on the much slower PyTorch "
                       "path: %s", exc)
        return False
    return True


def instruction_set() -> str:
    """The instruction set the kernels use on this CPU: one of :data:`INSTRUCTION_SETS`."""
    _load_op()
    return torch.ops.kvquant_cpu.best_isa()


def paged_decode_attention(
    query: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
    store: PagedKVQuant, rope: Rope, scale: float, split_tokens: int = SPLIT_TOKENS, isa: str | None = None,
) -> torch.Tensor:
    """Decode attention of one token per sequence over its kvquant pages (the contract of
    :func:`kvquant_vllm.kernels.reference.paged_decode_reference`).

    query: [num_seqs, num_q_heads, D] float32/bf16/fp16, post-RoPE, the token at position seq_len - 1; cache:
    [num_blocks, ...] uint8 pages of ``store``'s layout, each page contiguous; block_table: [num_seqs,
    max_blocks] int32/int64; seq_lens: [num_seqs] (tokens attended, the current one included; 0 gives zeros);
    split_tokens: a context attends in splits of this many tokens, rounded down to whole pages (at least one);
    isa: force an instruction set of :data:`INSTRUCTION_SETS` (None: the widest this CPU has).
    Returns [num_seqs, num_q_heads, D] float32.
    """
    starts = torch.arange(query.shape[0] + 1)
    return _attention(query, cache, block_table, starts, seq_lens, store, rope, scale, split_tokens, isa)


def paged_prefill_attention(
    query: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor, store: PagedKVQuant, rope: Rope, scale: float, split_tokens: int = SPLIT_TOKENS,
    isa: str | None = None,
) -> torch.Tensor:
    """Causal attention of chunks of query tokens over their requests' kvquant pages, the chunks already stored
    (the contract of :func:`kvquant_vllm.kernels.reference.paged_attention_reference`).

    query: [num_tokens, num_q_heads, D], the requests' chunks one after the other, post-RoPE; query_start_loc:
    [num_reqs + 1], where each chunk starts in ``query``; seq_lens: [num_reqs], context plus chunk (the chunk's
    last token is at position seq_len - 1); other arguments as :func:`paged_decode_attention`.
    Returns [num_tokens, num_q_heads, D] float32.
    """
    return _attention(query, cache, block_table, query_start_loc, seq_lens, store, rope, scale, split_tokens, isa)


def store_tokens(
    cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
    store: PagedKVQuant, cos: torch.Tensor, sin: torch.Tensor, inverse_gain: float,
) -> None:
    """Quantize and write new tokens into their page slots: the bytes of :meth:`PagedKVQuant.store` of the
    un-rotated keys (the contract of :func:`kvquant_vllm.kernels.triton_store.store_tokens`).

    cache: [num_blocks, ...] uint8 pages (written); key: [T, H, D] post-RoPE, value: [T, H, D] (any float dtype);
    slots: [T] (block * block_size + offset, negative = padding); positions: [T]; cos, sin: [T, D] float32, the
    model's RoPE at the positions (:meth:`Rope.cos_sin`); inverse_gain: :attr:`Rope.inverse_gain`. Tokens of one
    page must come in position order (as vLLM writes them).
    """
    lay = store.layout
    pages = _pages(cache, lay)
    if key.dim() != 3 or key.shape[1:] != (lay.num_kv_heads, lay.head_dim) or value.shape != key.shape:
        raise ValueError(f"key and value must be [tokens, {lay.num_kv_heads}, {lay.head_dim}], got "
                         f"{list(key.shape)} and {list(value.shape)}")
    _load_op()
    torch.ops.kvquant_cpu.store(
        pages, key.float().contiguous(), value.float().contiguous(), slots.long().contiguous(),
        positions.long().contiguous(), cos.float(), sin.float(), float(inverse_gain),
        store.key_scale.float().contiguous(), store.key_offset.float().contiguous(),
        store.key_books[0].float().contiguous(), store.value_books[0].float().contiguous(),
        store.value_books[1].float().contiguous(), store.value_refits, store.match_moments, lay.bits, lay.block_size,
        _section_offsets(lay), lay.head_stride, lay.key_outlier_capacity, lay.value_outliers_per_vector, store.sink,
    )


def _section_offsets(layout: PageLayout) -> list[int]:
    """Byte offsets of the sections within a head's segment, in PageLayout's order (that of the C++ Sections)."""
    return [offset for offset, _, _ in layout.sections().values()]


def _attention(
    query: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor, store: PagedKVQuant, rope: Rope, scale: float, split_tokens: int, isa: str | None,
) -> torch.Tensor:
    lay = store.layout
    pages = _pages(cache, lay)
    bf16_products = query.dtype == torch.bfloat16  # a bf16 model: products in bf16, as vLLM's CPU attention has them
    query = _check_query(query, lay, rope)
    if isa is not None and isa not in INSTRUCTION_SETS:
        raise ValueError(f"isa must be one of {', '.join(INSTRUCTION_SETS)}, got {isa!r}")
    if block_table.shape[0] != len(seq_lens) or len(query_start_loc) != len(seq_lens) + 1:
        raise ValueError(f"block_table has {block_table.shape[0]} rows, seq_lens {len(seq_lens)} entries and "
                         f"query_start_loc {len(query_start_loc)}: expected one per request (+1)")
    _load_op()
    out = torch.empty(query.shape, dtype=torch.float32)
    torch.ops.kvquant_cpu.paged_attention(
        out, query, pages, block_table.to(torch.int32), query_start_loc, seq_lens,
        store.key_scale.float().contiguous(), store.key_offset.float().contiguous(),
        store.key_books[1].float().contiguous(), store.value_books[1].float().contiguous(),
        rope.inv_freq.float().contiguous(), scale * rope.scaling * LOG2E, lay.bits, lay.block_size,
        _section_offsets(lay),
        lay.head_stride, lay.key_outlier_capacity, lay.value_outliers_per_vector, store.sink, bf16_products,
        max(1, split_tokens // lay.block_size), isa or "",
    )
    return out


def _pages(cache: torch.Tensor, layout: PageLayout) -> torch.Tensor:
    """``cache`` on the CPU as [num_blocks, page bytes] (:meth:`PageLayout.page_rows`)."""
    if cache.device.type != "cpu":
        raise ValueError(f"the kvquant CPU kernels need CPU tensors, the cache is on {cache.device}")
    return layout.page_rows(cache)


def _check_query(query: torch.Tensor, layout: PageLayout, rope: Rope) -> torch.Tensor:
    """The query as float32 with its last dim contiguous, after checking its shape against the layout."""
    if query.dim() != 3 or query.shape[2] != layout.head_dim:
        raise ValueError(f"query must be [tokens, heads, {layout.head_dim}], got {list(query.shape)}")
    if layout.head_dim not in HEAD_DIMS:
        raise ValueError(f"head dim {layout.head_dim} is not supported by the CPU kernels ({HEAD_DIMS})")
    if query.shape[1] % layout.num_kv_heads:
        raise ValueError(f"{query.shape[1]} query heads are not a multiple of {layout.num_kv_heads} kv heads")
    if rope.head_dim != layout.head_dim:
        raise ValueError(f"the RoPE rotates {rope.head_dim} channels, the pages hold {layout.head_dim}")
    query = query.float()
    return query if query.stride(-1) == 1 else query.contiguous()


# --------------------------------------------------------------------------------------------------- build
def installed_library() -> Path | None:
    """The library that setup.py built, when there is one and it was built from the sources beside it (an editable
    install whose csrc/cpu changed since is rebuilt just in time instead)."""
    spec = importlib.util.find_spec(cpu_build.EXTENSION)
    if spec is None or spec.origin is None:
        return None
    library = Path(spec.origin)
    if cpu_build.CSRC.is_dir() and not cpu_build.built_from_sources(library):
        logger.info("kvquant CPU kernels: %s predates the sources in %s, building them instead", library,
                    cpu_build.CSRC)
        return None
    return library


@functools.cache
def _load_op() -> None:
    """Load the installed library, or build (once per source version, cached on disk) and load one; registers
    torch.ops.kvquant_cpu."""
    started = time.perf_counter()
    library = installed_library()
    if library is not None:
        torch.ops.load_library(str(library))
        return
    from torch.utils import cpp_extension

    missing = [name for name in cpu_build.SOURCES if not (cpu_build.CSRC / name).is_file()]
    if missing:
        raise RuntimeError(f"{cpu_build.CSRC} lacks {', '.join(missing)}: without an installed build, the kernels "
                           "are built from a source checkout of the package")
    build = cache_dir() / "torch_extensions" / f"kvquant_cpu-torch{torch.__version__}-{cpu_build.source_hash()}"
    build.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name="kvquant_cpu_kernels", sources=[str(cpu_build.CSRC / name) for name in cpu_build.SOURCES],
        extra_cflags=[*cpu_build.CFLAGS, cpu_build.hash_define()], extra_ldflags=list(cpu_build.LDFLAGS),
        build_directory=str(build), is_python_module=False,
    )
    logger.info("kvquant CPU attention kernels built in %s in %.1f s", build, time.perf_counter() - started)
