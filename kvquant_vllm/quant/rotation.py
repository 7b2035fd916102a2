"""The fixed orthogonal rotation that values are quantized in.

A token's value vector often has one or two channels far larger than the rest; quantized per token, those
channels set the range and the others round coarsely (KVQuant keeps them exact as per-vector outliers, at
24-32 bits each). Rotated by an orthogonal matrix that mixes every channel into every other (a Hadamard
matrix with random signs, as QuaRot rotates the KV cache: Ashkboos et al., 2024, arXiv:2404.00456), the
vector's energy spreads evenly and its elements become near-Gaussian, so a per-token range and one
non-uniform codebook fit them without outliers.

Attention is linear in the values: with stored values v R, the output sum_j p_j (v_j R) is the true
output times R, so it is rotated back once per query head (``out @ R.T``), not per cached token.
"""

from __future__ import annotations

import functools
import math

import torch

SEED = 0  # part of the calibration's meaning: the value codebooks are learned in this basis


@functools.cache
def _rotation(head_dim: int) -> torch.Tensor:
    signs = torch.randint(0, 2, (head_dim,), generator=torch.Generator().manual_seed(SEED)) * 2 - 1
    if head_dim & (head_dim - 1) == 0:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < head_dim:  # Sylvester's construction
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
        h = h / math.sqrt(head_dim)
    else:  # no Hadamard matrix of this order by Sylvester's construction: a random orthogonal one
        gauss = torch.randn(head_dim, head_dim, generator=torch.Generator().manual_seed(SEED), dtype=torch.float64)
        q, r = torch.linalg.qr(gauss)
        h = q * torch.sign(torch.diagonal(r))
    return (signs[:, None] * h).float()


def value_rotation(head_dim: int) -> torch.Tensor:
    """The orthogonal matrix R [head_dim, head_dim] float32 (R @ R.T = I) that values are stored in: v R."""
    return _rotation(head_dim).clone()
