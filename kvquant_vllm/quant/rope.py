"""Rotary position embedding (NeoX / Llama "rotate half" layout) and its exact inverse.

A RoPE is given by its inverse frequencies ``inv_freq`` [D / 2] and an attention scaling factor (YaRN
multiplies cos and sin by it; 1 otherwise): channel c and c + D / 2 of the vector at position t rotate by
the angle t * inv_freq[c]. Angles are evaluated in float64, so the rotation at position 100,000 is as exact
as at position 1; kernels that compute cos and sin in registers are tested against :meth:`Rope.cos_sin`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def default_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """[head_dim / 2] float32: 1 / theta ** (2i / head_dim), computed in float32 as vLLM and transformers do."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


@dataclass(frozen=True, eq=False)
class Rope:
    """A rotate-half RoPE: ``inv_freq`` [D / 2] float32 and the factor that scales cos and sin."""

    inv_freq: torch.Tensor
    scaling: float = 1.0

    @classmethod
    def default(cls, head_dim: int, theta: float) -> Rope:
        return cls(default_inv_freq(head_dim, theta))

    @property
    def head_dim(self) -> int:
        return 2 * self.inv_freq.shape[0]

    def to(self, device: torch.device | str) -> Rope:
        return Rope(self.inv_freq.to(device), self.scaling)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: [len(positions), D] float32 (both halves), scaled, for integer ``positions`` [n]."""
        angles = positions.to(torch.float64)[:, None] * self.inv_freq.to(positions.device, torch.float64)[None, :]
        angles = torch.cat([angles, angles], dim=-1)
        return (angles.cos() * self.scaling).float(), (angles.sin() * self.scaling).float()

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [n, H, D] at ``positions`` [n] -> the rotated x (what the model's attention sees)."""
        return apply_rope(x, *self.cos_sin(positions))

    def unrotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Exact inverse of :meth:`rotate` (the scaling divided out)."""
        return invert_rope(x, *self.cos_sin(positions)) * self.inverse_gain

    @property
    def inverse_gain(self) -> float:
        """1 / scaling**2: the rotation by scaled cos and sin, taken back, leaves this factor to apply."""
        return 1.0 / self.scaling**2


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, num_heads, head_dim]; cos/sin: [num_tokens, head_dim]."""
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


def invert_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`apply_rope` for unscaled cos/sin (a rotation by the negative angle)."""
    return x * cos[:, None] - _rotate_half(x) * sin[:, None]
