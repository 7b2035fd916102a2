"""A random but well-formed KVQuant calibration for unit tests (no model needed)."""

import torch

from kvquant_vllm.quant.kvquant import CalibrationSpec, KVQuantCalibration
from kvquant_vllm.quant.synthetic import synthetic_calibration


def random_calibration(
    spec: CalibrationSpec, rng: torch.Generator, heads: int = 2, head_dim: int = 16, layers: int = 1
) -> KVQuantCalibration:
    return synthetic_calibration(spec, rng, heads, head_dim, layers)
