"""SKVQ (Duanmu et al., 2024, "SKVQ: Sliding-window Key and Value Cache Quantization for LLMs").

- Channel reordering: each layer's key (and value) channels, over all kv heads, are permuted by a
  calibrated order that puts channels of similar range next to each other, so that a quantization
  group holds alike channels.
- Clipped dynamic group quantization: per token, asymmetric quantization of each group of
  ``group_size`` reordered channels, its [min, max] shrunk by a calibrated clip ratio.
- A sliding window of the ``window`` most recent tokens, and the first ``sink_tokens`` tokens
  (attention sinks), stay in full precision.
- Keys are quantized after RoPE, as in the paper. 1.5-bit values are read as three-level codes
  (stored as trits, five per byte: 1.6 bits).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvquant_vllm.quant.codec import Kind, KVCodec
from kvquant_vllm.quant.geometry import AttentionGeometry
from kvquant_vllm.quant.rope import apply_rope, invert_rope, sequence_cos_sin
from kvquant_vllm.quant.uniform import SIDE_BITS, UniformPacked, code_bits, dequantize_uniform, quantize_uniform


@dataclass(frozen=True)
class SKVQSpec:
    method: str
    key_levels: int
    value_levels: int
    group_size: int = 64
    window: int = 128  # the paper's window
    sink_tokens: int = 4
    family: ClassVar[str] = "skvq"

    def calibrate_flags(self) -> str:
        return f"--method {self.method}"

    def levels(self, kind: Kind) -> int:
        return self.key_levels if kind == "key" else self.value_levels


@dataclass
class SKVQTables:
    """One layer's channel order and clip ratios; channel c of the flattened [H * D] vector."""

    key_order: torch.Tensor  # [H * D] float32 holding a permutation
    key_clip: torch.Tensor  # [1] float32 in (0, 1]
    value_order: torch.Tensor
    value_clip: torch.Tensor

    TENSORS: ClassVar[tuple[str, ...]] = ("key_order", "key_clip", "value_order", "value_clip")

    @classmethod
    def shapes(cls, geometry: AttentionGeometry, spec: SKVQSpec) -> dict[str, tuple[int, ...]]:
        hd = geometry.num_kv_heads * geometry.head_dim
        return {"key_order": (hd,), "key_clip": (1,), "value_order": (hd,), "value_clip": (1,)}

    def order(self, kind: Kind) -> torch.Tensor:
        return (self.key_order if kind == "key" else self.value_order).long()

    def clip(self, kind: Kind) -> float:
        return float(self.key_clip if kind == "key" else self.value_clip)


def reordered_groups(x: torch.Tensor, order: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [T, H, D] -> [T, H * D / group_size, group_size]: channels in ``order``, cut into groups."""
    t = x.shape[0]
    return x.reshape(t, -1)[:, order].reshape(t, -1, group_size)


def restore_order(groups: torch.Tensor, order: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`reordered_groups`."""
    flat = torch.empty_like(groups.reshape(groups.shape[0], -1))
    flat[:, order] = groups.reshape(groups.shape[0], -1)
    return flat.reshape(shape)


@dataclass
class SKVQPacked:
    kind: Kind
    layer: int
    shape: tuple[int, int, int]
    data: UniformPacked  # [T, H * D / group_size, group_size] along dim 2


class SKVQCodec(KVCodec):
    def __init__(self, spec: SKVQSpec, calibration) -> None:
        geo = calibration.geometry
        if (geo.num_kv_heads * geo.head_dim) % spec.group_size:
            raise ValueError(f"{spec.method}: group size {spec.group_size} does not divide "
                             f"{geo.num_kv_heads} kv heads x {geo.head_dim} channels")
        self.name, self.spec, self.calibration = spec.method, spec, calibration

    def _rope(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        geo = self.calibration.geometry
        return sequence_cos_sin(num_tokens, geo.head_dim, geo.rope_theta)

    def encode(self, x: torch.Tensor, kind: Kind, layer: int) -> SKVQPacked:
        """x: [T, H, D] (keys pre-RoPE, the sequence starting at position 0)."""
        x = x.float()
        if kind == "key":
            x = apply_rope(x, *self._rope(x.shape[0]))
        tables = self.calibration.layers[layer]
        groups = reordered_groups(x, tables.order(kind), self.spec.group_size)
        data = quantize_uniform(groups, self.spec.levels(kind), dim=2, clip=tables.clip(kind))
        return SKVQPacked(kind, layer, tuple(x.shape), data)

    def decode(self, p: SKVQPacked) -> torch.Tensor:
        order = self.calibration.layers[p.layer].order(p.kind)
        x = restore_order(dequantize_uniform(p.data), order, p.shape)
        return invert_rope(x, *self._rope(p.shape[0])) if p.kind == "key" else x

    def full_precision_masks(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = torch.arange(seq_len)[:, None]
        j = torch.arange(seq_len)[None, :]
        exact = (j > i - self.spec.window) | (j < self.spec.sink_tokens)
        return exact, exact.clone()

    def bits_per_element(self, head_dim: int, seq_len: int) -> float:
        side = 2 * SIDE_BITS / self.spec.group_size
        quantized = (code_bits(self.spec.key_levels) + code_bits(self.spec.value_levels)) / 2 + side
        exact = min(self.spec.window + self.spec.sink_tokens, seq_len) / seq_len
        return (1 - exact) * quantized + exact * 16
