"""The paged layout of a kvquant KV cache (layout version 2).

One layer's cache is a uint8 tensor [num_blocks, page_size_bytes]. A page holds ``block_size`` tokens of
``num_kv_heads`` heads as one segment per kv head, ``head_stride`` bytes apart, so that everything a kernel
program for one head needs from a page is contiguous. Within a head's segment (each section 16-byte aligned):

    key_codes      [block_size, D * bits / 8]  uint8   per-channel keys, codebook indices in bit planes
    value_codes    [block_size, D * bits / 8]  uint8   per-token values, codebook indices in bit planes
    value_scale    [block_size]                fp16
    value_offset   [block_size]                fp16
    value_out_val  [block_size, kv]            fp16    per-vector top-k outliers (kv per vector; none, kv = 0,
                                                       for the kvquant dtypes, whose values are rotated)
    value_out_idx  [block_size, kv]            uint8   channel of each value outlier
    key_out_val    [capacity]                  fp16    the head's sparse key outliers
    key_out_pos    [capacity]                  uint16  t * D + d within the head's block (stored as int16)
    key_out_count  [1]                         int32
    sink           [2, D]                      fp16    K and V of position 0 (pages that start a sequence)

Codes are packed by :func:`~kvquant_vllm.quant.packing.pack_code_planes`. A head's key outlier list has a
fixed capacity (the nominal outlier fraction of its ``block_size x D`` keys) and holds its entries in
(t, d) order: first come, first kept (:func:`~kvquant_vllm.quant.kvquant.first_come_ranks`). Outliers
that arrive when the list is full are left to the dense part (clamped to the calibrated range); nothing is
written past the list, and no entry of an earlier token is ever replaced, so a token's stored form does
not depend on later tokens. Position 0's outliers are not listed: the sink holds that token exactly. Keys
are stored pre-RoPE, so a page's content does not depend on where the model's RoPE is applied.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from kvquant_vllm.quant.kvquant import CalibrationSpec, key_outlier_capacity, kvquant_methods, outliers_per_vector
from kvquant_vllm.quant.packing import CODE_PLANES

LAYOUT_VERSION = 2
DTYPE_BITS = {"kvquant2": 2, "kvquant3": 3, "kvquant4": 4}
KVQUANT_OUTLIER_FRACTION = 0.01
ALIGN = 16
MAX_POSITIONS = 1 << 16  # key outlier positions are 16-bit


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


@dataclass(frozen=True)
class PageLayout:
    bits: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    outlier_fraction: float = KVQUANT_OUTLIER_FRACTION
    # per-vector top-k value outliers, k from outlier_fraction (the kvquant dtypes store rotated values without)
    value_outliers: bool = False

    @classmethod
    def for_spec(cls, spec: CalibrationSpec, block_size: int, num_kv_heads: int, head_dim: int) -> PageLayout:
        """The pages of a kvquant method whose calibration has ``spec``."""
        return cls(spec.bits, block_size, num_kv_heads, head_dim, spec.outlier_fraction, spec.value_outliers)

    def __post_init__(self) -> None:
        if self.bits not in CODE_PLANES:
            raise ValueError(f"kvquant pages hold 2, 3 or 4-bit codes, not {self.bits}")
        if self.head_dim % 32:
            raise ValueError(f"kvquant pages need a head dim that is a multiple of 32, not {self.head_dim}")
        if self.block_size * self.head_dim > MAX_POSITIONS:
            raise ValueError(
                f"block size {self.block_size} is too large for head dim {self.head_dim}: a kv head's key "
                f"outlier positions are 16-bit, so block_size x head_dim must be at most {MAX_POSITIONS} "
                f"(use --block-size {MAX_POSITIONS // self.head_dim} or less)")

    @property
    def value_outliers_per_vector(self) -> int:
        return outliers_per_vector(self.outlier_fraction, self.head_dim) if self.value_outliers else 0

    @property
    def key_outlier_capacity(self) -> int:
        """Entries in one kv head's key outlier list: the nominal fraction of its block_size x D keys."""
        return key_outlier_capacity(self.outlier_fraction, self.block_size, self.head_dim)

    @property
    def packed_bytes(self) -> int:
        """Bytes of one vector's packed codes."""
        return self.head_dim * self.bits // 8

    def sections(self) -> dict[str, tuple[int, tuple[int, ...], torch.dtype]]:
        """name -> (byte offset within a head's segment, shape, dtype) of every section."""
        return self._sections

    @functools.cached_property
    def _sections(self) -> dict[str, tuple[int, tuple[int, ...], torch.dtype]]:
        # Computed once per layout: every store and load views a dozen sections.
        bs, d = self.block_size, self.head_dim
        kv, cap = self.value_outliers_per_vector, self.key_outlier_capacity
        specs = [
            ("key_codes", (bs, self.packed_bytes), torch.uint8),
            ("value_codes", (bs, self.packed_bytes), torch.uint8),
            ("value_scale", (bs,), torch.float16),
            ("value_offset", (bs,), torch.float16),
            ("value_out_val", (bs, kv), torch.float16),
            ("value_out_idx", (bs, kv), torch.uint8),
            ("key_out_val", (cap,), torch.float16),
            ("key_out_pos", (cap,), torch.int16),
            ("key_out_count", (1,), torch.int32),
            ("sink", (2, d), torch.float16),
        ]
        out, offset = {}, 0
        for name, shape, dtype in specs:
            out[name] = (offset, shape, dtype)
            offset += _aligned(_nbytes(shape, dtype))
        return out

    @property
    def head_stride(self) -> int:
        """Bytes between the segments of consecutive kv heads."""
        offset, shape, dtype = self.sections()["sink"]
        return offset + _aligned(_nbytes(shape, dtype))

    @property
    def page_size_bytes(self) -> int:
        return self.num_kv_heads * self.head_stride

    def page_rows(self, cache: torch.Tensor) -> torch.Tensor:
        """``cache`` [num_blocks, ...] uint8 as [num_blocks, page bytes], one page per row, after checking that a
        kernel can read this layout's pages from it (vLLM's [num_blocks, 1, block_size, C] view is fine)."""
        if cache.dtype != torch.uint8 or cache.dim() < 2:
            raise TypeError(f"the kvquant cache must be uint8 [num_blocks, ...], got {cache.dtype} {list(cache.shape)}")
        try:
            pages = cache.view(cache.shape[0], -1)
        except RuntimeError as exc:
            raise ValueError("the kvquant cache must hold each page contiguously") from exc
        if pages.shape[1] < self.page_size_bytes:
            raise ValueError(f"cache pages hold {pages.shape[1]} bytes, the layout needs {self.page_size_bytes}")
        return pages

    def view(self, cache: torch.Tensor, name: str) -> torch.Tensor:
        """Section ``name`` of every head of every page of ``cache`` [num_blocks, ...] uint8 (each page
        contiguous, at least page_size_bytes), as [num_blocks, num_kv_heads, *shape] of its dtype (a view:
        writes go to the cache)."""
        offset, shape, dtype = self.sections()[name]
        pages = cache.view(cache.shape[0], -1)[:, : self.page_size_bytes]
        heads = pages.unflatten(1, (self.num_kv_heads, self.head_stride))
        return heads[:, :, offset : offset + _nbytes(shape, dtype)].view(dtype).unflatten(2, shape)

    @staticmethod
    def key_positions(stored: torch.Tensor) -> torch.Tensor:
        """Key outlier positions as stored in ``key_out_pos`` (int16) -> int64 t * D + d, read unsigned."""
        return stored.long() & 0xFFFF


def dtype_layout(dtype: str, block_size: int, num_kv_heads: int, head_dim: int) -> PageLayout:
    """The pages of the kvquant cache dtype ``dtype`` (kvquant2, kvquant3, kvquant4)."""
    if dtype not in DTYPE_BITS:
        raise ValueError(f"unknown kvquant cache dtype {dtype!r}; known: {', '.join(DTYPE_BITS)}")
    return PageLayout.for_spec(kvquant_methods()[dtype].spec, block_size, num_kv_heads, head_dim)


def bits_per_element(dtype: str, head_dim: int, block_size: int, num_kv_heads: int = 1) -> float:
    """Average bits per K and V element that a ``dtype`` page really occupies, every side table included."""
    layout = dtype_layout(dtype, block_size, num_kv_heads, head_dim)
    return layout.page_size_bytes * 8 / (2 * block_size * num_kv_heads * head_dim)
