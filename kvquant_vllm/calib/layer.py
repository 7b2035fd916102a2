"""Calibration of one layer from its activations: KVQuant's thresholds, codebooks and Q-Norm, and
the dispatch to every other method's calibration by the type of its spec.

Pure functions of their inputs, so they run the same inline or as Ray tasks.
"""

from __future__ import annotations

import torch

from kvquant_vllm.calib.collect import LayerActivations
from kvquant_vllm.calib.methods import calibrate_cq_layer, calibrate_skvq_layer, calibrate_wkvquant_layer
from kvquant_vllm.quant.cq import CQSpec
from kvquant_vllm.quant.codebook import batched_weighted_kmeans_1d, qnorm_params, weighted_kmeans_1d
from kvquant_vllm.quant.geometry import AttentionGeometry
from kvquant_vllm.quant.kvquant import (
    CalibrationSpec,
    LayerCalibration,
    normalize_per_channel,
    normalize_per_vector,
    outliers_per_vector,
)
from kvquant_vllm.quant.rotation import value_rotation
from kvquant_vllm.quant.skvq import SKVQSpec
from kvquant_vllm.quant.wkvquant import WKVQuantSpec


def tail_rank(n: int, outlier_fraction: float) -> int:
    """k such that the k-th smallest and k-th largest of n samples bound all but ``outlier_fraction`` of them
    (at least 1, at most n // 2 where n > 1)."""
    return max(1, min(int(round(n * outlier_fraction / 2)), n // 2))


def channel_thresholds(x: torch.Tensor, outlier_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel lower/upper thresholds [H, D] of x [N, H, D]: the fraction/2 and 1-fraction/2 quantiles.

    kthvalue rather than torch.quantile, which refuses large inputs.
    """
    n = x.shape[0]
    if outlier_fraction <= 0:
        return x.amin(0), x.amax(0)
    k = tail_rank(n, outlier_fraction)
    return x.kthvalue(k, dim=0).values, x.kthvalue(n - k + 1, dim=0).values


# Outlier fractions a channel may get, as multiples of the spec's fraction (its mean over a head's channels).
ALLOCATION_STEPS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)


def allocated_thresholds(
    x: torch.Tensor, weights: torch.Tensor, outlier_fraction: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel thresholds [H, D] of x [N, H, D] that share each head's outlier budget (``outlier_fraction``
    of its elements) among its channels where it most reduces the rounding error of the rest.

    A channel whose inliers span 2s rounds them with an error proportional to s**2, weighted by their Fisher
    information (``weights`` [N, H, D], squared gradients; ones for unweighted). Each channel takes one of
    ALLOCATION_STEPS x outlier_fraction; the choice minimises sum(error) + lam * fraction channel by channel,
    with lam per head the smallest (bisection) that keeps the head's mean fraction within the budget. Heavy-tailed
    channels so get more outliers and narrow ranges; compact ones give theirs away.
    """
    if outlier_fraction <= 0:
        return channel_thresholds(x, 0.0)
    fractions = torch.tensor(ALLOCATION_STEPS, dtype=torch.float64) * outlier_fraction
    ordered = x.sort(0).values  # one sort serves every step's quantiles (as channel_thresholds picks them)
    n = x.shape[0]
    lowers, uppers, errors = [], [], []
    for f in fractions.tolist():
        k = tail_rank(n, f)
        lower, upper = ordered[k - 1], ordered[n - k]
        inlier_weight = (weights * ((x >= lower) & (x <= upper))).sum(0).double()
        lowers.append(lower)
        uppers.append(upper)
        errors.append(inlier_weight * ((upper - lower).double() / 2).square())
    error = torch.stack(errors, -1)  # [H, D, steps]
    error = error / error.mean((1, 2), keepdim=True).clamp_min(1e-300)  # lam on one scale for every head

    def choose(lam: torch.Tensor) -> torch.Tensor:  # lam [H] -> step per channel [H, D]
        return (error + lam[:, None, None] * fractions).argmin(-1)

    # log10(lam) in [-6, 12]: from every channel at the largest step to every channel at the smallest
    lo = torch.full((x.shape[1],), -6.0, dtype=torch.float64)
    hi = torch.full_like(lo, 12.0)
    for _ in range(60):
        mid = (lo + hi) / 2
        over = fractions[choose(10**mid)].mean(-1) > outlier_fraction * (1 + 1e-9)
        lo, hi = torch.where(over, mid, lo), torch.where(over, hi, mid)
    step = choose(10**hi)[..., None]
    return (torch.stack(lowers, -1).gather(-1, step)[..., 0], torch.stack(uppers, -1).gather(-1, step)[..., 0])


def calibrate_kvquant_layer(
    act: LayerActivations,
    spec: CalibrationSpec,
    geometry: AttentionGeometry,
    positions: torch.Tensor,
    seed: int = 0,
) -> LayerCalibration:
    """Thresholds, codebooks and Q-Norm for one layer.

    act: calibration activations of the layer; positions [N] the token positions of its rows
    (needed for post-RoPE keys). seed makes the k-means subsample reproducible.
    """
    torch.set_num_threads(1)  # one layer per worker; results must not depend on the thread count
    k = 1 << spec.bits
    keys, key_grad = act.keys, act.key_grad
    if spec.key_position == "post-rope":
        keys, key_grad = act.post_rope_keys(geometry, positions)

    if spec.key_granularity == "channel":
        fraction = spec.outlier_fraction * spec.key_threshold_share
        if spec.outlier_allocation == "fisher":
            weights = key_grad.square() if spec.fisher else torch.ones_like(keys)
            lower, upper = allocated_thresholds(keys, weights, fraction)
        else:
            lower, upper = channel_thresholds(keys, fraction)
        key_scale = ((upper - lower) / 2).clamp_min(1e-4)
        key_offset = (upper + lower) / 2
        kn, kmask = normalize_per_channel(keys, key_scale, key_offset, spec.outlier_fraction > 0)
    else:
        key_scale = torch.ones(geometry.num_kv_heads, geometry.head_dim)
        key_offset = torch.zeros(geometry.num_kv_heads, geometry.head_dim)
        kn, kmask, _, _ = normalize_per_vector(keys, outliers_per_vector(spec.outlier_fraction, geometry.head_dim))
    values, value_grad = act.values, act.value_grad
    if spec.value_rotation:  # v' = v R, so dL/dv' = dL/dv R (R orthogonal)
        rotation = value_rotation(geometry.head_dim)
        values, value_grad = values @ rotation, value_grad @ rotation
    vn, vmask, _, _ = normalize_per_vector(values, spec.value_outliers_per_vector(geometry.head_dim))

    if spec.key_books == "channel":
        key_book = channel_codebooks(kn.clamp(-1, 1), key_grad.square() if spec.fisher else None, kmask, k)
        key_qnorm = qnorm_params(kn.clamp(-1, 1), key_book, ~kmask)
    else:
        key_book, key_qnorm = layer_codebook(kn, kmask, key_grad if spec.fisher else None, k, seed)
    value_book, value_qnorm = layer_codebook(vn, vmask, value_grad if spec.fisher else None, k, seed)
    return LayerCalibration(
        key_scale=key_scale.float(),
        key_offset=key_offset.float(),
        key_codebook=key_book,
        value_codebook=value_book,
        key_qnorm=key_qnorm,
        value_qnorm=value_qnorm,
    )


# Samples of a layer's codebook k-means: a layer's values give about 16 x 2048 x kv_heads x head_dim (6M for
# SmolLM2); the Fisher weights are heavy-tailed, so a 400K subsample made codebooks that varied with the seed.
LAYER_BOOK_SAMPLES = 4_000_000


def layer_codebook(
    xn: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor | None, k: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One codebook [k] for a layer's normalised samples xn [N, H, D] outside ``mask`` (outliers), Fisher-weighted
    by grad**2 (None: unweighted), and its Q-Norm parameters [2]."""
    inliers = xn[~mask].clamp(-1, 1)
    weights = grad[~mask].square() if grad is not None else None
    book = weighted_kmeans_1d(inliers, weights, k, max_samples=LAYER_BOOK_SAMPLES, seed=seed)
    return book, qnorm_params(inliers, book)


def channel_codebooks(xn: torch.Tensor, fisher: torch.Tensor | None, mask: torch.Tensor, k: int) -> torch.Tensor:
    """One codebook per channel: xn [N, H, D] normalised and clamped, fisher [N, H, D] (None: unweighted),
    outliers ``mask`` (weight 0) -> [H, D, k] float32."""
    n, h, d = xn.shape
    weights = (torch.ones_like(xn) if fisher is None else fisher) * ~mask
    return batched_weighted_kmeans_1d(xn.reshape(n, h * d).T, weights.reshape(n, h * d).T, k).reshape(h, d, k)


CALIBRATORS = {
    CalibrationSpec: calibrate_kvquant_layer,
    CQSpec: calibrate_cq_layer,
    SKVQSpec: calibrate_skvq_layer,
    WKVQuantSpec: calibrate_wkvquant_layer,
}


def calibrate_layer(act: LayerActivations, spec, geometry: AttentionGeometry, positions: torch.Tensor, seed: int = 0):
    """One layer's tables for ``spec`` (any method's): the calibrator registered for its type."""
    return CALIBRATORS[type(spec)](act, spec, geometry, positions, seed=seed)
