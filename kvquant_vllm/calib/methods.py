"""Calibration of the other published methods from the same activations as KVQuant's.

Each function is a pure function of one layer's activations, so it runs inline or as a Ray task.
Errors are weighted by Fisher information (squared gradients), the sensitivity KVQuant and CQ use.
"""

from __future__ import annotations

import torch

from kvquant_vllm.calib.collect import LayerActivations
from kvquant_vllm.quant.cq import CQSpec, CQTables
from kvquant_vllm.quant.geometry import AttentionGeometry
from kvquant_vllm.quant.skvq import SKVQSpec, SKVQTables, reordered_groups, restore_order
from kvquant_vllm.quant.uniform import dequantize_uniform, quantize_uniform
from kvquant_vllm.quant.wkvquant import WKVQuantSpec, WKVQuantTables, smoothed_fake_quant

CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6)
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
    act: LayerActivations, spec: CQSpec, geometry: AttentionGeometry, positions: torch.Tensor, seed: int = 0,
    max_samples: int = 16384,
) -> CQTables:
    """Per (kv head, channel group) Fisher-weighted k-means centroids of the pre-RoPE keys and values."""
    torch.set_num_threads(1)
    c, k = spec.channels, 1 << spec.code_bits
    keep = _subsample(act.keys.shape[0], max_samples, seed)
    books = {}
    for name, x, grad in (("key", act.keys, act.key_grad), ("value", act.values, act.value_grad)):
        groups = x[keep].reshape(len(keep), -1, c)  # [N, H * D / c, c]
        fisher = grad[keep].square().reshape(len(keep), -1, c).sum(-1)  # a group's sensitivity
        cents = [weighted_kmeans(groups[:, b], fisher[:, b], k, seed=seed + b) for b in range(groups.shape[1])]
        books[name] = torch.stack(cents).reshape(geometry.num_kv_heads, geometry.head_dim // c, k, c)
    return CQTables(key_centroids=books["key"], value_centroids=books["value"])


def _weighted_error(x: torch.Tensor, y: torch.Tensor, fisher: torch.Tensor) -> float:
    return float((fisher * (x - y).square()).sum())


def calibrate_skvq_layer(
    act: LayerActivations, spec: SKVQSpec, geometry: AttentionGeometry, positions: torch.Tensor, seed: int = 0
) -> SKVQTables:
    """Channel order by calibrated range (so a group holds channels of alike range), then the clip
    ratio with the smallest Fisher-weighted error of clipped group quantization."""
    torch.set_num_threads(1)
    keys, key_grad = act.post_rope_keys(geometry, positions)
    keep = _subsample(keys.shape[0], MAX_SEARCH_TOKENS, seed)
    fields = {}
    for kind, x, grad in (("key", keys, key_grad), ("value", act.values, act.value_grad)):
        flat = x.reshape(x.shape[0], -1)
        order = torch.argsort(flat.amax(0) - flat.amin(0))
        sample, fisher = x[keep], grad[keep].square()
        groups = reordered_groups(sample, order, spec.group_size)

        def error(clip: float) -> float:
            q = dequantize_uniform(quantize_uniform(groups, spec.levels(kind), dim=2, clip=clip))
            return _weighted_error(sample, restore_order(q, order, sample.shape), fisher)

        fields[f"{kind}_order"] = order.float()
        fields[f"{kind}_clip"] = torch.tensor([min(CLIP_RATIOS, key=error)])
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
