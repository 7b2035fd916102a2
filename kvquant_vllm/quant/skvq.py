"""SKVQ (Duanmu et al., 2024, "SKVQ: Sliding-window Key and Value Cache Quantization for LLMs",
arXiv:2405.06219), as its reference implementation (github.com/cat538/SKVQ) runs it.

- Channel reordering: each layer's key (and value) channels, over all kv heads, are clustered by their
  calibrated (min, max) with k-means into ``H * D / group_size`` clusters (``get_reorder_indices`` in the
  reference's ``calibration.py``); a cluster is one quantization group, so groups differ in size and a
  few outlier channels get a group of their own. The channels are stored in cluster order.
- Clipped dynamic group quantization: per token, asymmetric quantization of each group, its min and max
  both multiplied by one calibrated clip ratio (the reference's ``quant`` in ``KV_process.py``); scale
  and zero point stored in fp8 (e4m3) as the reference's configurations do (``fp8=True`` in
  ``eval_ppl.py``, the ``-fp8`` LongBench configuration of its README).
- A sliding window of the ``window`` most recent tokens and the first ``sink_tokens`` tokens (attention
  sinks; 5 in the reference's configurations, ``sink5`` / ``attn_sink=5``) stay in full precision.
- Keys are quantized before RoPE, as the reference evaluates them (``pre_rope=True``, configurations
  ``...-reorder-pre_rope-clip-sink5``). 1.5-bit values are three-level codes, stored as trits (five per
  byte: 1.6 bits).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvquant_vllm.quant.codec import Kind, KVCodec, bits_with_exact_tokens, recent_and_sink_masks
from kvquant_vllm.quant.geometry import AttentionGeometry
from kvquant_vllm.quant.uniform import pack_levels, packed_code_bytes, uniform_codes, uniform_side, unpack_levels


@dataclass(frozen=True)
class SKVQSpec:
    method: str
    key_levels: int
    value_levels: int
    # Mean channels per group: the calibration makes num_kv_heads * head_dim / group_size clusters (the
    # reference's n_cluster = kv_hidden // gsize).
    group_size: int = 32
    side_bits: int = 8  # scale and zero point per (token, group): fp8, as the reference stores them
    window: int = 128  # the paper's window
    sink_tokens: int = 5
    family: ClassVar[str] = "skvq"

    def calibrate_flags(self) -> str:
        return f"--method {self.method}"

    def levels(self, kind: Kind) -> int:
        return self.key_levels if kind == "key" else self.value_levels

    def num_clusters(self, geometry: AttentionGeometry) -> int:
        channels = geometry.num_kv_heads * geometry.head_dim
        if channels % self.group_size:
            raise ValueError(f"{self.method}: group size {self.group_size} does not divide "
                             f"{geometry.num_kv_heads} kv heads x {geometry.head_dim} channels")
        return channels // self.group_size


@dataclass
class SKVQTables:
    """One layer's channel groups and clip ratios; channel c of the flattened [H * D] vector."""

    key_groups: torch.Tensor  # [H * D] float32 holding group indices 0 .. G-1, every one used
    key_clip: torch.Tensor  # [1] float32 in (0, 1]
    value_groups: torch.Tensor
    value_clip: torch.Tensor

    TENSORS: ClassVar[tuple[str, ...]] = ("key_groups", "key_clip", "value_groups", "value_clip")

    @classmethod
    def shapes(cls, geometry: AttentionGeometry, spec: SKVQSpec) -> dict[str, tuple[int, ...]]:
        hd = geometry.num_kv_heads * geometry.head_dim
        return {"key_groups": (hd,), "key_clip": (1,), "value_groups": (hd,), "value_clip": (1,)}

    def groups(self, kind: Kind) -> torch.Tensor:
        """[H * D] int64: the group of each channel."""
        return (self.key_groups if kind == "key" else self.value_groups).long()

    def clip(self, kind: Kind) -> float:
        return float(self.key_clip if kind == "key" else self.value_clip)


def group_ranges(flat: torch.Tensor, groups: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token min and max of each group: flat [T, C] float32, groups [C] int64 -> ([T, G], [T, G])."""
    index = groups.expand(flat.shape[0], -1)
    lo = flat.new_full((flat.shape[0], num_groups), float("inf")).scatter_reduce(1, index, flat, "amin")
    hi = flat.new_full((flat.shape[0], num_groups), float("-inf")).scatter_reduce(1, index, flat, "amax")
    return lo, hi


@dataclass
class SKVQPacked:
    kind: Kind
    layer: int
    shape: tuple[int, int, int]  # [T, H, D]
    codes: torch.Tensor  # [T, packed codes of H * D channels in group order] uint8
    scale: torch.Tensor  # [T, G] fp8 or fp16
    zero: torch.Tensor  # [T, G], the value of code 0


def quantize_groups(
    flat: torch.Tensor, groups: torch.Tensor, levels: int, clip: float, side_bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped asymmetric quantization of each (token, group): flat [T, C] float32, groups [C] int64 ->
    codes [T, C] uint8, scale and zero [T, G] in the side data's type."""
    lo, hi = group_ranges(flat, groups, int(groups.max()) + 1)
    scale, zero = uniform_side(lo * clip, hi * clip, levels, side_bits)
    return uniform_codes(flat, scale[:, groups], zero[:, groups], levels), scale, zero


def dequantize_groups(q: torch.Tensor, groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_groups`: [T, C] float32."""
    return q.float() * scale.float()[:, groups] + zero.float()[:, groups]


class SKVQCodec(KVCodec):
    def __init__(self, spec: SKVQSpec, calibration) -> None:
        spec.num_clusters(calibration.geometry)
        self.name, self.spec, self.calibration = spec.method, spec, calibration

    def encode(self, x: torch.Tensor, kind: Kind, layer: int) -> SKVQPacked:
        """x: [T, H, D] (keys pre-RoPE)."""
        tables = self.calibration.layers[layer]
        groups, levels = tables.groups(kind), self.spec.levels(kind)
        flat = x.float().reshape(x.shape[0], -1)
        q, scale, zero = quantize_groups(flat, groups, levels, tables.clip(kind), self.spec.side_bits)
        codes = pack_levels(q[:, groups.argsort(stable=True)], levels)
        return SKVQPacked(kind, layer, tuple(x.shape), codes, scale, zero)

    def decode(self, p: SKVQPacked) -> torch.Tensor:
        groups = self.calibration.layers[p.layer].groups(p.kind)
        q = torch.empty(p.shape[0], groups.numel(), dtype=torch.uint8)
        q[:, groups.argsort(stable=True)] = unpack_levels(p.codes, self.spec.levels(p.kind), groups.numel())
        return dequantize_groups(q, groups, p.scale, p.zero).reshape(p.shape)

    def full_precision_masks(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        return recent_and_sink_masks(seq_len, self.spec.window, self.spec.sink_tokens)

    def quantized_bits(self) -> float:
        """Bits per element of a quantized token, averaged over layers, keys and values: packed codes plus
        a scale and zero point per group (the layers' group counts)."""
        spec, per_layer = self.spec, []
        for tables in self.calibration.layers:
            for kind in ("key", "value"):
                groups = tables.groups(kind)
                bits = packed_code_bytes(groups.numel(), spec.levels(kind)) * 8
                bits += (int(groups.max()) + 1) * 2 * spec.side_bits
                per_layer.append(bits / groups.numel())
        if not per_layer:
            raise ValueError(f"{self.name}: the calibration holds no layers to count the groups of")
        return sum(per_layer) / len(per_layer)

    def bits_per_element(self, head_dim: int, seq_len: int) -> float:
        return bits_with_exact_tokens(self.quantized_bits(), self.spec.window + self.spec.sink_tokens, seq_len)
