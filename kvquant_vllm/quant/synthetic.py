"""Random but well-formed KVQuant calibrations and K/V tokens, for tests and kernel benchmarks (no model needed)."""

from __future__ import annotations

import torch

from kvquant_vllm.quant.codebook import uniform_codebook
from kvquant_vllm.quant.geometry import AttentionGeometry
from kvquant_vllm.quant.kvquant import CalibrationSpec, KVQuantCalibration, LayerCalibration


def synthetic_calibration(
    spec: CalibrationSpec, rng: torch.Generator, num_kv_heads: int = 2, head_dim: int = 16, num_layers: int = 1,
    rope_theta: float = 10000.0,
) -> KVQuantCalibration:
    """A calibration of ``spec`` drawn from ``rng``: per-channel key scales in [0.5, 1.5) and Gaussian
    offsets [num_kv_heads, head_dim], random sorted key codebooks spanning [-1, 1] (one per channel, or per
    layer, as the spec says), a uniform value codebook, and fixed Q-Norm parameters (so the decode codebooks
    differ from the encode ones)."""
    geo = AttentionGeometry(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
                            rope_theta=rope_theta, rope_type="default")
    k = 1 << spec.bits
    tables = []
    for _ in range(num_layers):
        books = (num_kv_heads, head_dim) if spec.key_books == "channel" else ()
        key_book = torch.sort(torch.rand(*books, k, generator=rng) * 2 - 1).values
        key_book[..., 0], key_book[..., -1] = -1.0, 1.0
        tables.append(LayerCalibration(
            key_scale=torch.rand(num_kv_heads, head_dim, generator=rng) + 0.5,
            key_offset=torch.randn(num_kv_heads, head_dim, generator=rng),
            key_codebook=key_book,
            value_codebook=uniform_codebook(spec.bits),
            key_qnorm=torch.tensor([1.1, -0.05]),
            value_qnorm=torch.tensor([0.9, 0.02]),
        ))
    return KVQuantCalibration(spec, geo, tables)


def synthetic_tokens(
    key_scale: torch.Tensor, key_offset: torch.Tensor, num_tokens: int, outlier_rate: float, rng: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [num_tokens, H, D] float32 for a layer with calibrated key_scale, key_offset [H, D]:
    pre-RoPE keys uniform inside the calibrated range except a fraction ``outlier_rate`` pushed far outside
    (Gaussian, 4x the range), standard Gaussian values."""
    shape = (num_tokens, *key_scale.shape)
    u = torch.rand(shape, generator=rng) * 2 - 1
    spikes = (torch.rand(shape, generator=rng) < outlier_rate) * torch.randn(shape, generator=rng) * 4
    key = key_offset.cpu() + key_scale.cpu() * (u + spikes)
    return key.to(key_scale.device), torch.randn(shape, generator=rng).to(key_scale.device)
