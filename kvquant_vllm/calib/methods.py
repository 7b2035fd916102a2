"""Calibration of the other published methods from the same activations as KVQuant's.

Each function is a pure function of one layer's activations, so it runs inline or as a Ray task.
Errors are weighted by Fisher information (squared gradients), the sensitivity KVQuant and CQ use.
"""

from __future__ import annotations

from typing import Callable

import torch

from kvquant_vllm.calib.collect import LayerActivations
from kvquant_vllm.quant.cq import CQSpec, CQTables
from kvquant_vllm.quant.geometry import AttentionGeometry
from kvquant_vllm.quant.skvq import SKVQSpec, SKVQTables, dequantize_groups, quantize_groups
from kvquant_vllm.quant.wkvquant import WKVQuantSpec, WKVQuantTables, smoothed_fake_quant

SMOOTH_EXPONENTS = (0.0, 0.25, 0.5, 0.75, 1.0)
MAX_SEARCH_TOKENS = 8192  # tokens used to score clip ratios / smoothing exponents


def _subsample(n: int, limit: int, seed: int) -> torch.Tensor:
    if n <= limit:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit]


def weighted_kmeans(x: torch.Tensor, weights: torch.Tensor, k: int, iters: int = 25, seed: int = 0) -> torch.Tensor:
    """Centroids [k, c] float32 minimising sum(w * |x - c(x)|^2) over samples x [N, c] with weights w [N].

    Initialised at k distinct random samples (seeded); Lloyd iterations; an empty cluster keeps its centroid.
    """
    # Distances in float32 (the bulk of the work), sums in float64.
    x, w = x.float(), weights.double().clamp_min(0)
    if float(w.sum()) <= 0:
        w = torch.ones_like(w)
    g = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(x.shape[0], generator=g)[:k]]
    if centroids.shape[0] < k:  # fewer samples than centroids: repeat some
        centroids = centroids[torch.arange(k) % centroids.shape[0]]
    for _ in range(iters):
        assign = torch.cdist(x, centroids).argmin(-1)
        mass = torch.zeros(k, dtype=torch.float64).index_add_(0, assign, w)
        moment = torch.zeros(k, x.shape[1], dtype=torch.float64).index_add_(0, assign, w[:, None] * x.double())
        updated = torch.where(mass[:, None] > 0, moment / mass.clamp_min(1e-300)[:, None], centroids.double()).float()
        if torch.equal(updated, centroids):
            break
        centroids = updated
    return centroids


def calibrate_cq_layer(
    act: LayerActivations, spec: CQSpec, geometry: AttentionGeometry, positions: torch.Tensor, seed: int = 0
) -> CQTables:
    """Per (kv head, channel group) Fisher-weighted k-means centroids of the pre-RoPE keys and values,
    from every calibration token."""
    torch.set_num_threads(1)
    c, k = spec.channels, 1 << spec.code_bits
    books = {}
    for name, x, grad in (("key", act.keys, act.key_grad), ("value", act.values, act.value_grad)):
        groups = x.reshape(x.shape[0], -1, c)  # [N, H * D / c, c]
        fisher = grad.square().reshape(x.shape[0], -1, c).sum(-1)  # a group's sensitivity
        cents = [weighted_kmeans(groups[:, b], fisher[:, b], k, seed=seed + b) for b in range(groups.shape[1])]
        books[name] = torch.stack(cents).reshape(geometry.num_kv_heads, geometry.head_dim // c, k, c)
    return CQTables(key_centroids=books["key"], value_centroids=books["value"])


def _weighted_error(x: torch.Tensor, y: torch.Tensor, fisher: torch.Tensor) -> float:
    return float((fisher * (x - y).square()).sum())


def cluster_labels(points: torch.Tensor, k: int, restarts: int = 10, seed: int = 0) -> torch.Tensor:
    """k-means of points [N, f] into at most k clusters: labels [N] int64, 0 .. G-1 with every label used,
    numbered by the centroid's coordinates (lexicographic). The best of ``restarts`` seeded runs by
    inertia, as scikit-learn's ``KMeans(n_init=10)`` that SKVQ's reference calibration uses."""
    points = points.float()
    ones = torch.ones(points.shape[0])
    best, best_inertia = None, float("inf")
    for r in range(restarts):
        centroids = weighted_kmeans(points, ones, min(k, points.shape[0]), iters=100, seed=seed * restarts + r)
        distance = torch.cdist(points, centroids)
        inertia = float(distance.amin(-1).double().square().sum())
        if inertia < best_inertia:
            best, best_inertia = (centroids, distance.argmin(-1)), inertia
    centroids, labels = best
    used = labels.unique()  # an emptied cluster is no group
    rank = sorted(range(len(used)), key=lambda i: centroids[used[i]].tolist())
    renumber = torch.empty(int(used.max()) + 1, dtype=torch.long)
    renumber[used[rank]] = torch.arange(len(used))
    return renumber[labels]


CLIP_STEP = 0.01
CLIP_PATIENCE = 10  # steps past the best ratio that the search goes on for


def search_clip(error: Callable[[float], float]) -> float:
    """The clip ratio in (0, 1] with the smallest ``error``: from 1 down in steps of ``CLIP_STEP`` until
    ``CLIP_PATIENCE`` steps pass without a better one, so the search never stops at the edge of a grid."""
    best_step, best_error = 0, error(1.0)
    step = 0
    while step - best_step < CLIP_PATIENCE and (step + 1) * CLIP_STEP < 1:
        step += 1
        e = error(1 - step * CLIP_STEP)
        if e < best_error:
            best_step, best_error = step, e
    return round(1 - best_step * CLIP_STEP, 6)


def calibrate_skvq_layer(
    act: LayerActivations, spec: SKVQSpec, geometry: AttentionGeometry, positions: torch.Tensor, seed: int = 0
) -> SKVQTables:
    """Per kind: channel groups by k-means of each channel's calibrated (min, max) (pre-RoPE keys), then
    the multiplicative clip ratio with the smallest Fisher-weighted error of the group quantization."""
    torch.set_num_threads(1)
    keep = _subsample(act.keys.shape[0], MAX_SEARCH_TOKENS, seed)
    fields = {}
    for kind, x, grad in (("key", act.keys, act.key_grad), ("value", act.values, act.value_grad)):
        flat = x.reshape(x.shape[0], -1)
        groups = cluster_labels(torch.stack([flat.amin(0), flat.amax(0)], -1), spec.num_clusters(geometry), seed=seed)
        sample, fisher = flat[keep], grad[keep].reshape(len(keep), -1).square()

        def error(clip: float) -> float:
            q, scale, zero = quantize_groups(sample, groups, spec.levels(kind), clip, spec.side_bits)
            return _weighted_error(sample, dequantize_groups(q, groups, scale, zero), fisher)

        fields[f"{kind}_groups"] = groups.float()
        fields[f"{kind}_clip"] = torch.tensor([search_clip(error)])
    return SKVQTables(**fields)


def calibrate_wkvquant_layer(
    act: LayerActivations, spec: WKVQuantSpec, geometry: AttentionGeometry, positions: torch.Tensor, seed: int = 0
) -> WKVQuantTables:
    """Per-channel shift = the centre of the calibrated range; per-channel scale = (half range)**alpha,
    normalised to geometric mean 1, with alpha from a grid by Fisher-weighted error."""
    torch.set_num_threads(1)
    keys, key_grad = act.post_rope_keys(geometry, positions)
    keep = _subsample(keys.shape[0], MAX_SEARCH_TOKENS, seed)
    fields = {}
    for kind, x, grad in (("key", keys, key_grad), ("value", act.values, act.value_grad)):
        hi, lo = x.amax(0), x.amin(0)
        shift, half = (hi + lo) / 2, ((hi - lo) / 2).clamp_min(1e-4)
        sample, fisher = x[keep], grad[keep].square()

        def smooth(alpha: float) -> torch.Tensor:
            s = half**alpha
            return s / s.log().mean(-1, keepdim=True).exp()

        def error(alpha: float) -> float:
            return _weighted_error(sample, smoothed_fake_quant(sample, shift, smooth(alpha), spec.bits), fisher)

        fields[f"{kind}_shift"] = shift.float()
        fields[f"{kind}_smooth"] = smooth(min(SMOOTH_EXPONENTS, key=error)).float()
    return WKVQuantTables(**fields)
