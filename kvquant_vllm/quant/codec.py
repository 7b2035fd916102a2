"""The codec interface every KV cache quantization method implements.

A codec turns one sequence's keys or values, ``[num_tokens, num_kv_heads, head_dim]``,
into a packed form and back. Keys are handed over **before RoPE**. ``layer`` lets a
calibrated codec pick that layer's tables.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Literal

import torch

Kind = Literal["key", "value"]


class KVCodec(ABC):
    """encode(k or v) -> packed; decode(packed) -> dense."""

    name: str

    @abstractmethod
    def encode(self, x: torch.Tensor, kind: Kind, layer: int) -> Any:
        """x: [num_tokens, num_kv_heads, head_dim] float -> method-specific packed object."""

    @abstractmethod
    def decode(self, packed: Any) -> torch.Tensor:
        """packed -> [num_tokens, num_kv_heads, head_dim] float32."""

    @abstractmethod
    def bits_per_element(self, head_dim: int, seq_len: int) -> float:
        """Average storage per K and V element, every side table included."""

    def fake_quant(self, x: torch.Tensor, kind: Kind, layer: int) -> torch.Tensor:
        """Quantize and dequantize ``x``; same shape and dtype as ``x``."""
        return self.decode(self.encode(x, kind, layer)).to(x.dtype)

    def full_precision_masks(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For methods whose cache depends on the token order (recent-token windows, past-only):
        ``(key_exact, value_exact)``, each [seq_len (query), seq_len (key)] bool, True where the query
        at position i sees the exact key/value of position j rather than its quantized one.
        None (the default): every query sees every cached token quantized.
        """
        return None


def recent_and_sink_masks(seq_len: int, window: int, sink_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks (see :meth:`KVCodec.full_precision_masks`) of a cache that keeps the first ``sink_tokens``
    tokens and a sliding window of the ``window`` most recent ones (the query's own token included) exact."""
    i = torch.arange(seq_len)[:, None]
    j = torch.arange(seq_len)[None, :]
    exact = (j > i - window) | (j < sink_tokens)
    return exact, exact.clone()


def bits_with_exact_tokens(quantized_bits: float, exact_tokens: int, seq_len: int) -> float:
    """Bits per element of a ``seq_len``-token cache that holds ``exact_tokens`` of them in 16 bits
    instead of ``quantized_bits``."""
    exact = min(exact_tokens, seq_len) / seq_len
    return (1 - exact) * quantized_bits + exact * 16


class Unquantized(KVCodec):
    """The 16-bit cache every quantized method is compared against."""

    name = "fp16"

    def encode(self, x: torch.Tensor, kind: Kind, layer: int) -> torch.Tensor:
        return x

    def decode(self, packed: torch.Tensor) -> torch.Tensor:
        return packed.float()

    def bits_per_element(self, head_dim: int, seq_len: int) -> float:
        return 16.0

    def fake_quant(self, x: torch.Tensor, kind: Kind, layer: int) -> torch.Tensor:
        return x
