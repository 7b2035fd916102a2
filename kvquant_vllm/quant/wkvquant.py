"""WKVQuant's KV cache quantization (Yue et al., 2024, "WKVQuant: Quantizing Weight and Key/Value
Cache for Large Language Models Gains More"), without its weight quantization.

- Past-only quantization: a token attends to its own key and value unquantized; only the cache
  it reads back for later tokens is quantized.
- Two-dimensional quantization: a static per-channel smoothing (shift and scale, calibrated)
  followed by dynamic per-token asymmetric quantization of the smoothed vector.
- Keys are quantized after RoPE, as in the paper. The paper learns the smoothing by gradient-based
  block reconstruction; the calibration here centres each channel and picks the scale exponent
  that minimises the Fisher-weighted reconstruction error (see ``calib/methods.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvquant_vllm.quant.codec import Kind, KVCodec
from kvquant_vllm.quant.geometry import AttentionGeometry
from kvquant_vllm.quant.uniform import SIDE_BITS, UniformPacked, dequantize_uniform, quantize_uniform


@dataclass(frozen=True)
class WKVQuantSpec:
    method: str
    bits: int = 4
    family: ClassVar[str] = "wkvquant"

    def calibrate_flags(self) -> str:
        return f"--method {self.method}"


@dataclass
class WKVQuantTables:
    """One layer's smoothing: a channel c is stored as (x - shift[c]) / smooth[c]."""

    key_shift: torch.Tensor  # [num_kv_heads, head_dim] float32
    key_smooth: torch.Tensor  # [num_kv_heads, head_dim] float32, > 0
    value_shift: torch.Tensor
    value_smooth: torch.Tensor

    TENSORS: ClassVar[tuple[str, ...]] = ("key_shift", "key_smooth", "value_shift", "value_smooth")

    @classmethod
    def shapes(cls, geometry: AttentionGeometry, spec: WKVQuantSpec) -> dict[str, tuple[int, ...]]:
        return {name: (geometry.num_kv_heads, geometry.head_dim) for name in cls.TENSORS}

    def smoothing(self, kind: Kind) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.key_shift, self.key_smooth) if kind == "key" else (self.value_shift, self.value_smooth)


def smoothed_fake_quant(x: torch.Tensor, shift: torch.Tensor, smooth: torch.Tensor, bits: int) -> torch.Tensor:
    """Smooth per channel, quantize per vector (last dim), unsmooth: x [..., H, D] float32."""
    return dequantize_uniform(quantize_uniform((x - shift) / smooth, 1 << bits, dim=-1)) * smooth + shift


@dataclass
class WKVQuantPacked:
    kind: Kind
    layer: int
    data: UniformPacked  # smoothed [T, H, D], one (scale, zero) per token and head


class WKVQuantCodec(KVCodec):
    def __init__(self, spec: WKVQuantSpec, calibration) -> None:
        self.name, self.spec, self.calibration = spec.method, spec, calibration
        self.rope = calibration.geometry.rope()

    def encode(self, x: torch.Tensor, kind: Kind, layer: int) -> WKVQuantPacked:
        """x: [T, H, D] (keys pre-RoPE, the sequence starting at position 0)."""
        x = x.float()
        if kind == "key":
            x = self.rope.rotate(x, torch.arange(x.shape[0]))
        shift, smooth = self.calibration.layers[layer].smoothing(kind)
        return WKVQuantPacked(kind, layer, quantize_uniform((x - shift) / smooth, 1 << self.spec.bits, dim=2))

    def decode(self, p: WKVQuantPacked) -> torch.Tensor:
        shift, smooth = self.calibration.layers[p.layer].smoothing(p.kind)
        x = dequantize_uniform(p.data) * smooth + shift
        return self.rope.unrotate(x, torch.arange(x.shape[0])) if p.kind == "key" else x

    def full_precision_masks(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        own = torch.eye(seq_len, dtype=torch.bool)
        return own, own.clone()

    def bits_per_element(self, head_dim: int, seq_len: int) -> float:
        return self.spec.bits + 2 * SIDE_BITS / head_dim
