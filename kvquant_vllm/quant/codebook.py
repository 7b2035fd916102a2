"""One-dimensional codebooks: nearest-centroid coding and (Fisher-)weighted k-means."""

from __future__ import annotations

import torch


def uniform_codebook(bits: int) -> torch.Tensor:
    """2**bits evenly spaced levels over [-1, 1]: [2**bits] float32."""
    return torch.linspace(-1.0, 1.0, 1 << bits)


def nearest_code(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of a sorted ``codebook`` [K] for every element of ``x``; uint8, shape of x."""
    midpoints = (codebook[1:] + codebook[:-1]) / 2
    return torch.bucketize(x.float().contiguous(), midpoints.float()).to(torch.uint8)


def weighted_kmeans_1d(
    x: torch.Tensor,
    weights: torch.Tensor | None,
    k: int,
    iters: int = 60,
    max_samples: int = 400_000,
    seed: int = 0,
) -> torch.Tensor:
    """Sorted centroids [k] float32 minimising sum(w * (x - c(x))**2) over samples ``x`` [N].

    Initialised at the weighted quantiles; Lloyd iterations. With ``weights=None`` all samples
    weigh the same. At most ``max_samples`` samples are used (a seeded random subset).
    """
    x = x.reshape(-1).double()
    w = torch.ones_like(x) if weights is None else weights.reshape(-1).double()
    if x.numel() == 0:
        raise ValueError("weighted k-means needs at least one sample")
    if x.numel() > max_samples:
        keep = torch.randperm(x.numel(), generator=torch.Generator().manual_seed(seed))[:max_samples]
        x, w = x[keep], w[keep]
    if float(w.sum()) <= 0:
        w = torch.ones_like(x)
    order = torch.argsort(x)
    x, w = x[order], w[order]
    cdf = torch.cumsum(w, 0) / w.sum()
    targets = (torch.arange(k, dtype=torch.float64) + 0.5) / k
    centroids = x[torch.searchsorted(cdf, targets).clamp_max(x.numel() - 1)]
    for _ in range(iters):
        centroids = torch.sort(centroids).values
        assign = torch.bucketize(x, (centroids[1:] + centroids[:-1]) / 2)
        mass = torch.zeros(k, dtype=torch.float64).scatter_add_(0, assign, w)
        moment = torch.zeros(k, dtype=torch.float64).scatter_add_(0, assign, w * x)
        updated = torch.where(mass > 0, moment / mass.clamp_min(1e-300), centroids)
        if torch.allclose(updated, centroids, rtol=0, atol=1e-9):
            break
        centroids = updated
    return torch.sort(centroids).values.float()


def qnorm_params(samples: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Q-Norm: [scale, offset] (float32) so that ``codebook * scale + offset`` gives the quantized
    ``samples`` the mean and standard deviation of the originals."""
    x = samples.reshape(-1).double()
    q = codebook.double()[nearest_code(x, codebook).long()]
    scale = x.std() / q.std().clamp_min(1e-12)
    offset = x.mean() - q.mean() * scale
    return torch.stack([scale, offset]).float()
