"""A random but well-formed KVQuant calibration for unit tests (no model needed)."""

import torch

from kvquant_vllm.quant.codebook import uniform_codebook
from kvquant_vllm.quant.geometry import AttentionGeometry
from kvquant_vllm.quant.kvquant import CalibrationSpec, KVQuantCalibration, LayerCalibration


def random_calibration(
    spec: CalibrationSpec, rng: torch.Generator, heads: int = 2, head_dim: int = 16, layers: int = 1
) -> KVQuantCalibration:
    geo = AttentionGeometry(num_layers=layers, num_kv_heads=heads, head_dim=head_dim, rope_theta=10000.0,
                            rope_type="default")
    k = 1 << spec.bits
    tables = []
    for _ in range(layers):
        key_book = torch.sort(torch.rand(k, generator=rng) * 2 - 1).values
        key_book[0], key_book[-1] = -1.0, 1.0
        tables.append(LayerCalibration(
            key_scale=torch.rand(heads, head_dim, generator=rng) + 0.5,
            key_offset=torch.randn(heads, head_dim, generator=rng),
            key_codebook=key_book,
            value_codebook=uniform_codebook(spec.bits),
            key_qnorm=torch.tensor([1.1, -0.05]),
            value_qnorm=torch.tensor([0.9, 0.02]),
        ))
    return KVQuantCalibration(spec, geo, tables)
