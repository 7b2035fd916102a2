"""Rotary position embedding (NeoX / Llama "rotate half" layout) and its exact inverse."""

from __future__ import annotations

import torch


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [num_tokens, head_dim] float32 for integer ``positions`` [num_tokens] (default RoPE)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def sequence_cos_sin(num_tokens: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [num_tokens, head_dim] float32 of a sequence at positions 0 .. num_tokens - 1."""
    return rope_cos_sin(torch.arange(num_tokens), head_dim, theta)


def rope_cos_sin_cache(max_position: int, head_dim: int, theta: float) -> torch.Tensor:
    """vLLM's RoPE cache for positions 0 .. max_position - 1: [max_position, head_dim] float32, the cos of
    the head_dim / 2 frequencies then their sin."""
    cos, sin = rope_cos_sin(torch.arange(max_position), head_dim, theta)
    return torch.cat([cos[:, : head_dim // 2], sin[:, : head_dim // 2]], dim=-1)


def cos_sin_from_cache(cos_sin_cache: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [num_tokens, head_dim] float32 in the rotate-half layout, read from a RoPE cache
    [max_position, head_dim] (cos of the head_dim / 2 frequencies, then their sin; vLLM's layout)."""
    cos, sin = cos_sin_cache.to(positions.device)[positions].float().chunk(2, dim=-1)
    return torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, num_heads, head_dim]; cos/sin: [num_tokens, head_dim]."""
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


def invert_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Exact inverse of :func:`apply_rope` (a rotation by the negative angle)."""
    return x * cos[:, None] - _rotate_half(x) * sin[:, None]
