"""Coupled Quantization (Zhang et al., 2024, "KV Cache is 1 Bit Per Channel: Efficient Large Language
Model Inference with Coupled Quantization").

Each kv head's channels are cut into groups of ``channels`` contiguous channels; a group of one
token is coded jointly as the index of the nearest of ``2**code_bits`` learned centroids (per layer,
kv head and group), so ``code_bits / channels`` bits per element. Centroids come from k-means weighted
by Fisher information (``calib/methods.py``). Keys are coded before RoPE, where their channels keep
a position-independent joint distribution for the centroids to fit.

The first token (the attention sink) is kept in fp16, as calibration assumes: it is left out of the
calibration activations of every method (``calib/collect.py``), so no centroid has seen it. The ``-w32``
methods also keep a sliding window of the 32 most recent tokens in fp16, the setting of the paper's
downstream-task tables (Zhang et al., 2024, arXiv:2405.03917: "a sliding window of 32 recent tokens cached
in FP16").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvquant_vllm.quant.codec import Kind, KVCodec, bits_with_exact_tokens, recent_and_sink_masks
from kvquant_vllm.quant.geometry import AttentionGeometry
from kvquant_vllm.quant.packing import pack_codes, unpack_codes


@dataclass(frozen=True)
class CQSpec:
    method: str
    channels: int  # c: channels coded jointly
    code_bits: int = 8  # bits of one group's code: 2**code_bits centroids
    family: ClassVar[str] = "cq"

    def calibrate_flags(self) -> str:
        return f"--method {self.method}"


@dataclass(frozen=True)
class CQOptions:
    """One cq method: the calibration it needs plus the tokens it keeps in fp16."""

    spec: CQSpec
    sink_tokens: int = 1
    window: int = 0  # most recent tokens kept in fp16 (0: none)


@dataclass
class CQTables:
    key_centroids: torch.Tensor  # [num_kv_heads, head_dim / c, 2**code_bits, c] float32
    value_centroids: torch.Tensor

    TENSORS: ClassVar[tuple[str, ...]] = ("key_centroids", "value_centroids")

    @classmethod
    def shapes(cls, geometry: AttentionGeometry, spec: CQSpec) -> dict[str, tuple[int, ...]]:
        shape = (geometry.num_kv_heads, geometry.head_dim // spec.channels, 1 << spec.code_bits, spec.channels)
        return {name: shape for name in cls.TENSORS}


def nearest_centroid(groups: torch.Tensor, centroids: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """groups [T, B, c], centroids [B, K, c] -> index of the nearest centroid [T, B] int64.

    Chunked over tokens so the [B, chunk, K] distance matrix stays small.
    """
    out = []
    for part in groups.split(chunk):
        out.append(torch.cdist(part.transpose(0, 1), centroids).argmin(-1).transpose(0, 1))
    return torch.cat(out) if out else groups.new_zeros(0, groups.shape[1], dtype=torch.long)


@dataclass
class CQPacked:
    kind: Kind
    layer: int
    shape: tuple[int, int, int]
    codes: torch.Tensor  # [T - sinks, H * D / c, packed code] uint8
    sink: torch.Tensor  # [min(sink_tokens, T), H, D] fp16


class CQCodec(KVCodec):
    def __init__(self, name: str, options: CQOptions, calibration) -> None:
        spec = options.spec
        if calibration.spec != spec:
            raise ValueError(f"{name}: calibration is for {calibration.spec}, the method needs {spec}")
        if calibration.geometry.head_dim % spec.channels:
            raise ValueError(f"{name}: {spec.channels} channels per group do not divide head dim "
                             f"{calibration.geometry.head_dim}")
        self.name, self.options, self.spec, self.calibration = name, options, spec, calibration

    def _centroids(self, kind: Kind, layer: int) -> torch.Tensor:
        """[H * D / c, K, c]: one codebook per (kv head, group)."""
        tables = self.calibration.layers[layer]
        c = tables.key_centroids if kind == "key" else tables.value_centroids
        return c.reshape(-1, *c.shape[2:])

    def encode(self, x: torch.Tensor, kind: Kind, layer: int) -> CQPacked:
        """x: [T, H, D] (keys pre-RoPE, the sequence starting at position 0)."""
        sinks = self.options.sink_tokens
        rest = x[sinks:].float()
        groups = rest.reshape(rest.shape[0], -1, self.spec.channels)
        codes = nearest_centroid(groups, self._centroids(kind, layer))
        packed = pack_codes(codes[..., None], self.spec.code_bits)
        return CQPacked(kind, layer, tuple(x.shape), packed, x[:sinks].half())

    def decode(self, p: CQPacked) -> torch.Tensor:
        centroids = self._centroids(p.kind, p.layer)  # [B, K, c]
        codes = unpack_codes(p.codes, self.spec.code_bits, 1)[..., 0].long()  # [T - sinks, B]
        groups = centroids[torch.arange(centroids.shape[0]), codes]  # [T - sinks, B, c]
        return torch.cat([p.sink.float(), groups.reshape(-1, *p.shape[1:])])

    def full_precision_masks(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.options.window:
            return None  # the sink alone is exact for every query: encode keeps it
        return recent_and_sink_masks(seq_len, self.options.window, self.options.sink_tokens)

    def bits_per_element(self, head_dim: int, seq_len: int) -> float:
        quantized = self.spec.code_bits / self.spec.channels
        return bits_with_exact_tokens(quantized, self.options.sink_tokens + self.options.window, seq_len)
