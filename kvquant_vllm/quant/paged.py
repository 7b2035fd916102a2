"""The paged layout of a kvquant KV cache and the store/load of tokens into pages (pure PyTorch).

One layer's cache is a uint8 tensor [num_blocks, page_size_bytes]. A page holds ``block_size``
tokens x ``num_kv_heads`` heads, in sections (each 4-byte aligned):

    key_codes      [block_size, H, packed(D)]  uint8   per-channel keys, codebook indices
    value_codes    [block_size, H, packed(D)]  uint8   per-token values, codebook indices
    value_scale    [block_size, H]             fp16
    value_offset   [block_size, H]             fp16
    value_out_val  [block_size, H, kv]         fp16    per-vector top-k outliers (kv per vector)
    value_out_idx  [block_size, H, kv]         uint8   channel of each value outlier
    key_out_val    [capacity]                  fp16    per-block sparse key outliers
    key_out_pos    [capacity]                  uint16  t * H * D + h * D + d within the page
                                                       (int32 when a page has more than 65536 key elements)
    key_out_count  [1]                         int32
    sink           [2, H, D]                   fp16    K and V of position 0 (pages that start a sequence)

The key outlier list has a fixed capacity and holds its entries in (t, h, d) order: first come, first
kept (:func:`~kvquant_vllm.quant.kvquant.first_come_ranks`). Outliers that arrive when the list is full
are left to the dense part (clamped to the calibrated range); nothing is written past the page, and no
entry of an earlier token is ever replaced, so a token's stored form does not depend on later tokens.
Position 0's outliers are not listed: the sink holds that token exactly. Keys are stored pre-RoPE, so
a page's content does not depend on where the model's RoPE is applied.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from kvquant_vllm.quant.kvquant import key_outlier_capacity, outliers_per_vector
from kvquant_vllm.quant.packing import packed_numel

DTYPE_BITS = {"kvquant2": 2, "kvquant3": 3, "kvquant4": 4}
KVQUANT_OUTLIER_FRACTION = 0.01
ALIGN = 4


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class PageLayout:
    bits: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    outlier_fraction: float = KVQUANT_OUTLIER_FRACTION

    @property
    def value_outliers_per_vector(self) -> int:
        return outliers_per_vector(self.outlier_fraction, self.head_dim)

    @property
    def key_outlier_capacity(self) -> int:
        """Entries in the per-block key outlier list: the nominal fraction of the page's key elements."""
        return key_outlier_capacity(self.outlier_fraction, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def position_dtype(self) -> torch.dtype:
        """Key outlier positions: 16 bits (read as unsigned) while they fit, else int32."""
        return torch.int16 if self.block_size * self.num_kv_heads * self.head_dim <= 1 << 16 else torch.int32

    def sections(self) -> dict[str, tuple[int, tuple[int, ...], torch.dtype]]:
        """name -> (byte offset, shape, dtype) of every section of a page."""
        return self._sections

    @functools.cached_property
    def _sections(self) -> dict[str, tuple[int, tuple[int, ...], torch.dtype]]:
        # Computed once per layout: every store and load views a dozen sections.
        bs, h, d = self.block_size, self.num_kv_heads, self.head_dim
        kv, cap = self.value_outliers_per_vector, self.key_outlier_capacity
        specs = [
            ("key_codes", (bs, h, packed_numel(d, self.bits)), torch.uint8),
            ("value_codes", (bs, h, packed_numel(d, self.bits)), torch.uint8),
            ("value_scale", (bs, h), torch.float16),
            ("value_offset", (bs, h), torch.float16),
            ("value_out_val", (bs, h, kv), torch.float16),
            ("value_out_idx", (bs, h, kv), torch.uint8),
            ("key_out_val", (cap,), torch.float16),
            ("key_out_pos", (cap,), self.position_dtype),
            ("key_out_count", (1,), torch.int32),
            ("sink", (2, h, d), torch.float16),
        ]
        out, offset = {}, 0
        for name, shape, dtype in specs:
            out[name] = (offset, shape, dtype)
            offset += _aligned(math.prod(shape) * torch.empty(0, dtype=dtype).element_size())
        return out

    @property
    def page_size_bytes(self) -> int:
        offset, shape, dtype = self.sections()["sink"]
        return offset + _aligned(math.prod(shape) * torch.empty(0, dtype=dtype).element_size())

    def view(self, cache: torch.Tensor, name: str) -> torch.Tensor:
        """Section ``name`` of every page of ``cache`` [num_blocks, ...] uint8 (each page contiguous,
        at least page_size_bytes), as [num_blocks, *shape] of its dtype (a view: writes go to the cache)."""
        offset, shape, dtype = self.sections()[name]
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        pages = cache.view(cache.shape[0], -1)
        return pages[:, offset : offset + nbytes].view(dtype).reshape(cache.shape[0], *shape)

    def key_positions(self, stored: torch.Tensor) -> torch.Tensor:
        """Key outlier positions as stored in ``key_out_pos`` -> int64 of the same shape (16-bit entries are unsigned)."""
        pos = stored.long()
        return pos & 0xFFFF if self.position_dtype == torch.int16 else pos


def bits_per_element(dtype: str, head_dim: int, block_size: int, num_kv_heads: int = 1) -> float:
    """Average bits per K and V element that a ``dtype`` page really occupies, every side table included."""
    if dtype not in DTYPE_BITS:
        raise ValueError(f"unknown kvquant cache dtype {dtype!r}; known: {', '.join(DTYPE_BITS)}")
    layout = PageLayout(DTYPE_BITS[dtype], block_size, num_kv_heads, head_dim)
    return layout.page_size_bytes * 8 / (2 * block_size * num_kv_heads * head_dim)
