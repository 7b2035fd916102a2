"""Plain integer baselines.

- ``intN-token``: keys and values, one asymmetric (scale, zero) per token and kv head.
- ``intN-channel``: keys with one (scale, zero) per channel over the sequence, values per token.
"""

from __future__ import annotations

import torch

from kvquant_vllm.quant.codec import Kind, KVCodec
from kvquant_vllm.quant.uniform import SIDE_BITS, UniformPacked, dequantize_uniform, quantize_uniform

INT_BITS = (2, 3, 4, 8)

# Axes of x: [num_tokens, num_kv_heads, head_dim]
TOKEN_AXIS = 0
CHANNEL_AXIS = 2


class IntTokenCodec(KVCodec):
    """Asymmetric per-token, per-head integer quantization of keys and values."""

    def __init__(self, bits: int) -> None:
        if bits not in INT_BITS:
            raise ValueError(f"int{bits}-token: bits must be one of {INT_BITS}")
        self.bits = bits
        self.name = f"int{bits}-token"

    def key_axis(self) -> int:
        """The axis a key's (scale, zero) is shared along."""
        return CHANNEL_AXIS

    def encode(self, x: torch.Tensor, kind: Kind, layer: int) -> UniformPacked:
        axis = self.key_axis() if kind == "key" else CHANNEL_AXIS
        return quantize_uniform(x, 1 << self.bits, axis)

    def decode(self, packed: UniformPacked) -> torch.Tensor:
        return dequantize_uniform(packed)

    def bits_per_element(self, head_dim: int, seq_len: int) -> float:
        return self.bits + 2 * SIDE_BITS / head_dim


class IntChannelCodec(IntTokenCodec):
    """Per-channel keys (over the sequence), per-token values."""

    def __init__(self, bits: int) -> None:
        super().__init__(bits)
        self.name = f"int{bits}-channel"

    def key_axis(self) -> int:
        return TOKEN_AXIS

    def bits_per_element(self, head_dim: int, seq_len: int) -> float:
        key_bits = self.bits + 2 * SIDE_BITS / seq_len
        value_bits = self.bits + 2 * SIDE_BITS / head_dim
        return (key_bits + value_bits) / 2
