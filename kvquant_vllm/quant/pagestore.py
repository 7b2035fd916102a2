"""Writing tokens into kvquant pages and reading them back (vectorized PyTorch, any device).

The numerics are those of :class:`~kvquant_vllm.quant.kvquant.KVQuantCodec`, applied token by token
(every KVQuant statistic is per token or calibrated), so a sequence stored page by page decodes to
exactly what the codec gives for the whole sequence, as long as no page's key outlier list overflows.
"""

from __future__ import annotations

import torch

from kvquant_vllm.quant.codebook import nearest_code
from kvquant_vllm.quant.kvquant import (
    KVQuantCalibration,
    KVQuantCodec,
    kvquant_methods,
    normalize_per_channel,
    normalize_per_vector,
)
from kvquant_vllm.quant.packing import pack_codes, unpack_codes
from kvquant_vllm.quant.paged import PageLayout


class PagedKVQuant:
    """One layer's kvquant store/load over a cache of pages [num_blocks, >= page_size_bytes] uint8."""

    def __init__(self, dtype: str, calibration: KVQuantCalibration, layer: int, block_size: int) -> None:
        options = kvquant_methods()[dtype]
        codec = KVQuantCodec(dtype, options, calibration)
        geo = calibration.geometry
        self.layout = PageLayout(options.spec.bits, block_size, geo.num_kv_heads, geo.head_dim,
                                 options.spec.outlier_fraction)
        self.sink = options.sink_tokens > 0
        cal = calibration.layers[layer]
        self.key_scale, self.key_offset = cal.key_scale, cal.key_offset  # [H, D] float32
        self.key_books = codec.codebooks("key", layer)  # (encode, decode) [2**bits] float32
        self.value_books = codec.codebooks("value", layer)

    def to(self, device: torch.device) -> PagedKVQuant:
        for name in ("key_scale", "key_offset"):
            setattr(self, name, getattr(self, name).to(device))
        self.key_books = tuple(b.to(device) for b in self.key_books)
        self.value_books = tuple(b.to(device) for b in self.value_books)
        return self

    # ------------------------------------------------------------------ store
    def store(
        self, cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor,
        positions: torch.Tensor,
    ) -> None:
        """Quantize and write tokens.

        cache: [num_blocks, ...] uint8 pages; key: [T, H, D] pre-RoPE; value: [T, H, D];
        slots: [T] int64 (block * block_size + offset, negative = padding); positions: [T] int64.
        Tokens of one page must arrive in position order (as vLLM writes them); writing offset t of a
        page drops that page's key outliers at offsets >= t, left by a previous occupant.
        """
        keep = slots >= 0
        key, value, slots, positions = key[keep].float(), value[keep].float(), slots[keep], positions[keep]
        if slots.numel() == 0:
            return
        lay = self.layout
        page, offset = slots // lay.block_size, slots % lay.block_size

        kn, kmask = normalize_per_channel(key, self.key_scale, self.key_offset, lay.outlier_fraction > 0)
        lay.view(cache, "key_codes")[page, offset] = pack_codes(nearest_code(kn.clamp(-1, 1), self.key_books[0]),
                                                                  lay.bits)
        vn, vmask, vscale, voffset = normalize_per_vector(value, lay.value_outliers_per_vector)
        lay.view(cache, "value_codes")[page, offset] = pack_codes(
            nearest_code(vn.clamp(-1, 1), self.value_books[0]), lay.bits)
        lay.view(cache, "value_scale")[page, offset] = vscale.squeeze(-1)
        lay.view(cache, "value_offset")[page, offset] = voffset.squeeze(-1)
        if lay.value_outliers_per_vector:
            t, h, _ = value.shape
            idx = vmask.nonzero()[:, -1].view(t, h, lay.value_outliers_per_vector)
            lay.view(cache, "value_out_idx")[page, offset] = idx.to(torch.uint8)
            lay.view(cache, "value_out_val")[page, offset] = value.gather(-1, idx).half()
        self._store_key_outliers(cache, page, offset, key, kn, kmask)
        if self.sink:
            first = positions == 0
            sink = lay.view(cache, "sink")
            sink[page[first], 0] = key[first].half()
            sink[page[first], 1] = value[first].half()

    def _store_key_outliers(
        self, cache: torch.Tensor, page: torch.Tensor, offset: torch.Tensor, key: torch.Tensor,
        kn: torch.Tensor, kmask: torch.Tensor,
    ) -> None:
        """Merge the new tokens' key outliers into their pages' lists, keeping the largest |kn| on overflow."""
        lay = self.layout
        cap = lay.key_outlier_capacity
        if cap == 0:
            return
        h, d = lay.num_kv_heads, lay.head_dim
        pages, local = page.unique(return_inverse=True)  # local: [T] index into pages
        first_new = torch.full((len(pages),), lay.block_size, dtype=torch.long, device=page.device)
        first_new = first_new.scatter_reduce(0, local, offset, "amin")

        pos_view, val_view, count_view = (lay.view(cache, n) for n in ("key_out_pos", "key_out_val", "key_out_count"))
        old_pos = lay.key_positions(pos_view[pages])
        old_val = val_view[pages].float()
        slot = torch.arange(cap, device=page.device)
        old_keep = (slot < count_view[pages].long()) & (old_pos // (h * d) < first_new[:, None])
        old_page = torch.arange(len(pages), device=page.device)[:, None].expand(-1, cap)[old_keep]
        old_pos, old_val = old_pos[old_keep], old_val[old_keep]
        hd = old_pos % (h * d)
        old_mag = ((old_val - self.key_offset.reshape(-1)[hd]) / self.key_scale.reshape(-1)[hd]).abs()

        tok, head, chan = kmask.nonzero(as_tuple=True)
        new_page = local[tok]
        new_pos = offset[tok] * (h * d) + head * d + chan
        all_page = torch.cat([old_page, new_page])
        all_pos = torch.cat([old_pos, new_pos])
        all_val = torch.cat([old_val, key[tok, head, chan]])
        all_mag = torch.cat([old_mag, kn[tok, head, chan].abs()])

        # Sort by page, largest first within a page; rank = place in its page's list.
        order = all_mag.argsort(descending=True, stable=True)
        order = order[all_page[order].argsort(stable=True)]
        all_page, all_pos, all_val = all_page[order], all_pos[order], all_val[order]
        per_page = torch.bincount(all_page, minlength=len(pages))
        starts = per_page.cumsum(0) - per_page
        rank = torch.arange(len(all_page), device=page.device) - starts[all_page]
        fits = rank < cap
        pos_view[pages[all_page[fits]], rank[fits]] = all_pos[fits].to(torch.int32).to(lay.position_dtype)
        val_view[pages[all_page[fits]], rank[fits]] = all_val[fits].half()
        count_view[pages, 0] = per_page.clamp(max=cap).to(torch.int32)

    # ------------------------------------------------------------------- load
    def load(self, cache: torch.Tensor, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantize whole pages.

        blocks: [N] int64 block ids -> (keys pre-RoPE, values), each [N, block_size, H, D] float32.
        The sink is not applied here (see :meth:`sinks`): only a sequence's first page holds one.
        """
        lay = self.layout
        n, bs, h, d = len(blocks), lay.block_size, lay.num_kv_heads, lay.head_dim
        pages = cache.view(cache.shape[0], -1)[blocks]  # [N, page bytes], gathered once
        key = self.key_books[1][unpack_codes(lay.view(pages, "key_codes"), lay.bits, d).long()]
        key = key * self.key_scale + self.key_offset
        value = self.value_books[1][unpack_codes(lay.view(pages, "value_codes"), lay.bits, d).long()]
        value = value * lay.view(pages, "value_scale").float()[..., None] + lay.view(pages, "value_offset").float()[..., None]
        if lay.value_outliers_per_vector:
            # Clamped: slots that were never written may hold anything, and must not index out of range.
            idx = lay.view(pages, "value_out_idx").long().clamp_(max=d - 1)
            value.scatter_(-1, idx, lay.view(pages, "value_out_val").float())
        cap = lay.key_outlier_capacity
        if cap:
            pos = lay.key_positions(lay.view(pages, "key_out_pos"))
            valid = torch.arange(cap, device=pages.device) < lay.view(pages, "key_out_count").long()
            flat = torch.cat([key.reshape(n, -1), key.new_zeros(n, 1)], dim=1)  # column -1 absorbs unused entries
            pos = torch.where(valid & (pos < bs * h * d), pos, bs * h * d)
            flat.scatter_(1, pos, lay.view(pages, "key_out_val").float())
            key = flat[:, :-1].reshape(n, bs, h, d)
        return key, value

    def sinks(self, cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """[N, 2, H, D] float32: the 16-bit K (pre-RoPE) and V of position 0 held by pages ``blocks``."""
        return self.layout.view(cache, "sink")[blocks].float()
