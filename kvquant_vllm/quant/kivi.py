"""KIVI (Liu et al., 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache").

- Keys per channel, one asymmetric (scale, zero) per group of ``group`` consecutive tokens.
- Values per token, one (scale, zero) per group of ``group`` consecutive channels.
- A full-precision residual of recent tokens: keys are quantized ``residual`` tokens at a time
  once the residual is full, values leave a sliding window of the last ``residual`` tokens.
- Keys are quantized after RoPE, as KIVI quantizes the cache the model attends over. Tuning-free:
  no calibration.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvquant_vllm.quant.codec import Kind, KVCodec, bits_with_exact_tokens
from kvquant_vllm.quant.geometry import AttentionGeometry
from kvquant_vllm.quant.uniform import SIDE_BITS, UniformPacked, dequantize_uniform, quantize_uniform

KIVI_GROUP = 32  # the paper's group size G
KIVI_RESIDUAL = 128  # the paper's residual length R


@dataclass
class KIVIPacked:
    kind: Kind
    shape: tuple[int, int, int]  # [num_tokens, num_kv_heads, head_dim]
    data: UniformPacked  # keys: [T/G, G, H, D] along dim 1; values: [T, H, D/G, G] along dim 3


class KIVICodec(KVCodec):
    def __init__(self, bits: int, geometry: AttentionGeometry, group: int = KIVI_GROUP,
                 residual: int = KIVI_RESIDUAL) -> None:
        if residual % group:
            raise ValueError(f"KIVI: the residual ({residual}) must be a multiple of the group size ({group})")
        self.name = f"kivi{bits}"
        self.bits, self.rope, self.group, self.residual = bits, geometry.rope(), group, residual

    def _value_group(self, head_dim: int) -> int:
        return min(self.group, head_dim)

    def encode(self, x: torch.Tensor, kind: Kind, layer: int) -> KIVIPacked:
        """x: [T, H, D] (keys pre-RoPE, the sequence starting at position 0)."""
        t, h, d = x.shape
        x = x.float()
        if kind == "key":
            x = self.rope.rotate(x, torch.arange(t))
            # A last, partial group is padded with its final token, which leaves its min/max unchanged.
            pad = (-t) % self.group
            x = torch.cat([x, x[-1:].expand(pad, h, d)]) if pad else x
            data = quantize_uniform(x.reshape(-1, self.group, h, d), 1 << self.bits, dim=1)
        else:
            g = self._value_group(d)
            data = quantize_uniform(x.reshape(t, h, d // g, g), 1 << self.bits, dim=3)
        return KIVIPacked(kind, (t, h, d), data)

    def decode(self, p: KIVIPacked) -> torch.Tensor:
        t, h, d = p.shape
        x = dequantize_uniform(p.data).reshape(-1, h, d)[:t]
        return self.rope.unrotate(x, torch.arange(t)) if p.kind == "key" else x

    def full_precision_masks(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = torch.arange(seq_len)[:, None]
        j = torch.arange(seq_len)[None, :]
        # Query i has seen i + 1 tokens; whole residuals flushed so far are quantized.
        key_exact = j >= i // self.residual * self.residual
        value_exact = j > i - self.residual
        return key_exact, value_exact

    def bits_per_element(self, head_dim: int, seq_len: int) -> float:
        return bits_with_exact_tokens(self.bits + 2 * SIDE_BITS / self.group, self.residual, seq_len)
