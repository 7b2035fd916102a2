"""Writing tokens into kvquant pages and reading them back (vectorized PyTorch, any device).

The numerics are those of :class:`~kvquant_vllm.quant.kvquant.KVQuantCodec`, applied token by token
(every KVQuant statistic is per token or calibrated, and a page's key outlier list keeps its first
entries), so a sequence stored page by page, in chunks of any size, decodes to exactly what the codec
gives for the whole sequence with the same block size.

Values are held in the basis of the method's value rotation (:mod:`kvquant_vllm.quant.rotation`): ``store``
takes them rotated (:meth:`PagedKVQuant.rotate_values`), ``load`` and every attention kernel give back rotated
values or outputs, which :meth:`PagedKVQuant.unrotate` maps back, once per query head.
"""

from __future__ import annotations

import torch

from kvquant_vllm.quant.codebook import lookup, nearest_code
from kvquant_vllm.quant.kvquant import (
    KVQuantCalibration,
    KVQuantCodec,
    code_per_vector,
    first_come_ranks,
    kvquant_methods,
    normalize_per_channel,
)
from kvquant_vllm.quant.packing import pack_code_planes, unpack_code_planes
from kvquant_vllm.quant.paged import PageLayout
from kvquant_vllm.quant.rotation import value_rotation


class PagedKVQuant:
    """One layer's kvquant store/load over a cache of pages [num_blocks, >= page_size_bytes] uint8."""

    def __init__(self, dtype: str, calibration: KVQuantCalibration, layer: int, block_size: int) -> None:
        options = kvquant_methods()[dtype]
        codec = KVQuantCodec(dtype, options, calibration)
        geo = calibration.geometry
        self.layout = PageLayout.for_spec(options.spec, block_size, geo.num_kv_heads, geo.head_dim)
        self.sink = options.sink_tokens > 0
        cal = calibration.layers[layer]
        self.key_scale, self.key_offset = cal.key_scale, cal.key_offset  # [H, D] float32
        # (encode, decode) per channel [H, D, 2**bits] float32: what the kernels take, whatever the calibration's
        # granularity (a layer's one book repeated for every channel)
        self.key_books = tuple(b.expand(geo.num_kv_heads, geo.head_dim, -1).contiguous()
                               for b in codec.codebooks("key", layer))
        self.value_books = codec.codebooks("value", layer)  # (encode, decode) [2**bits] float32
        self.value_refits = options.value_refits
        self.match_moments = options.match_moments
        # [D, D] float32, or None: values stored as they are
        self.value_rotation = value_rotation(geo.head_dim) if options.spec.value_rotation else None

    def rotate_values(self, value: torch.Tensor) -> torch.Tensor:
        """value [T, H, D] as the model computes it -> float32 in the basis the pages hold."""
        return value.float() if self.value_rotation is None else value.float() @ self.value_rotation

    def unrotate(self, out: torch.Tensor) -> torch.Tensor:
        """An attention output over the pages' values [T, Hq, D] -> float32 in the model's basis."""
        return out.float() if self.value_rotation is None else out.float() @ self.value_rotation.T

    def to(self, device: torch.device) -> PagedKVQuant:
        for name in ("key_scale", "key_offset", "value_rotation"):
            if getattr(self, name) is not None:
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

        cache: [num_blocks, ...] uint8 pages; key: [T, H, D] pre-RoPE; value: [T, H, D] rotated (:meth:`rotate_values`);
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

        def put(name: str, x: torch.Tensor) -> None:  # x: [T, H, ...] -> section [page, :, offset]
            lay.view(cache, name)[page, :, offset] = x.to(lay.sections()[name][2])

        kn, kmask = normalize_per_channel(key, self.key_scale, self.key_offset, lay.outlier_fraction > 0)
        put("key_codes", pack_code_planes(nearest_code(kn.clamp(-1, 1), self.key_books[0]), lay.bits))
        vcodes, vmask, vscale, voffset = code_per_vector(value, lay.value_outliers_per_vector, *self.value_books,
                                                         self.value_refits, self.match_moments)
        put("value_codes", pack_code_planes(vcodes, lay.bits))
        put("value_scale", vscale.squeeze(-1))
        put("value_offset", voffset.squeeze(-1))
        if lay.value_outliers_per_vector:
            t, h, _ = value.shape
            idx = vmask.nonzero()[:, -1].view(t, h, lay.value_outliers_per_vector)
            put("value_out_idx", idx)
            put("value_out_val", value.gather(-1, idx))
        self._store_key_outliers(cache, page, offset, key, kmask, positions)
        if self.sink:
            first = positions == 0
            sink = lay.view(cache, "sink")  # [N, H, 2, D]
            sink[page[first], :, 0] = key[first].half()
            sink[page[first], :, 1] = value[first].half()

    def _store_key_outliers(
        self, cache: torch.Tensor, page: torch.Tensor, offset: torch.Tensor, key: torch.Tensor, kmask: torch.Tensor,
        positions: torch.Tensor,
    ) -> None:
        """Append the new tokens' key outliers to their pages' per-head lists, first come first kept.

        page, offset, positions: [T] int64; key: [T, H, D] float32 pre-RoPE; kmask: [T, H, D] bool. A list's
        entries are in (offset, channel) order, so those a previous occupant left at offsets >= the first
        new one form the list's tail, which is dropped.
        """
        lay = self.layout
        cap = lay.key_outlier_capacity
        if cap == 0:
            return
        h, d = lay.num_kv_heads, lay.head_dim
        if self.sink:
            kmask = kmask & (positions != 0)[:, None, None]  # the sink holds position 0 exactly
        pages, local = page.unique(return_inverse=True)  # local: [T] index into pages
        first_new = torch.full((len(pages),), lay.block_size, dtype=torch.long, device=page.device)
        first_new = first_new.scatter_reduce(0, local, offset, "amin")
        pos_view, val_view, count_view = (lay.view(cache, n) for n in ("key_out_pos", "key_out_val", "key_out_count"))
        old_offset = lay.key_positions(pos_view[pages]) // d  # [P, H, cap]
        listed = torch.arange(cap, device=page.device) < count_view[pages].long()  # [P, H, cap]
        kept = (listed & (old_offset < first_new[:, None, None])).sum(-1).flatten()  # [P * H], list p * H + h

        tok, head, chan = kmask.nonzero(as_tuple=True)  # (token, head, channel) order
        lists = local[tok] * h + head
        order = lists.argsort(stable=True)  # tokens of a page arrive in position order
        tok, head, chan, lists = tok[order], head[order], chan[order], lists[order]
        index = kept[lists] + first_come_ranks(lists)
        fits = index < cap
        tok, head, chan, lists, index = tok[fits], head[fits], chan[fits], lists[fits], index[fits]
        pos_view[pages[lists // h], head, index] = (offset[tok] * d + chan).to(torch.int32).to(torch.int16)
        val_view[pages[lists // h], head, index] = key[tok, head, chan].half()
        added = torch.bincount(lists, minlength=len(pages) * h)
        count_view[pages, :, 0] = (kept + added).view(len(pages), h).to(torch.int32)

    # ------------------------------------------------------------------- load
    def load(self, cache: torch.Tensor, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantize whole pages.

        blocks: [N] int64 block ids -> (keys pre-RoPE, values rotated), each [N, block_size, H, D] float32.
        The sink is not applied here (see :meth:`sinks`): only a sequence's first page holds one.
        """
        lay = self.layout
        bs, d = lay.block_size, lay.head_dim
        pages = cache.view(cache.shape[0], -1)[blocks]  # [N, page bytes], gathered once
        key = lookup(self.key_books[1][:, None], unpack_code_planes(lay.view(pages, "key_codes"), lay.bits, d).long())
        # key: [N, H, bs, D]
        key = key * self.key_scale[:, None] + self.key_offset[:, None]
        value = self.value_books[1][unpack_code_planes(lay.view(pages, "value_codes"), lay.bits, d)]
        value = value * lay.view(pages, "value_scale").float()[..., None] + lay.view(pages, "value_offset").float()[..., None]
        if lay.value_outliers_per_vector:
            # Clamped: slots that were never written may hold anything, and must not index out of range.
            idx = lay.view(pages, "value_out_idx").long().clamp_(max=d - 1)
            value.scatter_(-1, idx, lay.view(pages, "value_out_val").float())
        cap = lay.key_outlier_capacity
        if cap:
            pos = lay.key_positions(lay.view(pages, "key_out_pos"))  # [N, H, cap]
            valid = torch.arange(cap, device=pages.device) < lay.view(pages, "key_out_count").long()
            flat = torch.cat([key.flatten(2), key.new_zeros(*key.shape[:2], 1)], dim=2)  # column -1 absorbs unused entries
            # Pages that no sequence wrote in full (a block table's unused tail) may hold any count and position.
            flat.scatter_(2, torch.where(valid & (pos < bs * d), pos, bs * d), lay.view(pages, "key_out_val").float())
            key = flat[..., :-1].view(key.shape)
        return key.transpose(1, 2), value.transpose(1, 2)

    def sinks(self, cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """[N, 2, H, D] float32: the 16-bit K (pre-RoPE) and V of position 0 held by pages ``blocks``."""
        return self.layout.view(cache, "sink")[blocks].float().transpose(1, 2)
