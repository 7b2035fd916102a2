"""One-dimensional codebooks: nearest-centroid coding and (Fisher-)weighted k-means."""

from __future__ import annotations

import torch


def uniform_codebook(bits: int) -> torch.Tensor:
    """2**bits evenly spaced levels over [-1, 1]: [2**bits] float32."""
    return torch.linspace(-1.0, 1.0, 1 << bits)


def nearest_code(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of a sorted codebook for every element of ``x``; uint8, shape of x.

    ``codebook`` is one book [K] for every element, or one book per channel [..., K] whose leading dims
    match x's trailing ones (x [T, H, D], books [H, D, K]). The nearest entry is the number of midpoints
    below x (torch.bucketize), as the kernels compute it.
    """
    midpoints = (codebook[..., 1:] + codebook[..., :-1]) / 2
    if codebook.dim() == 1:
        return torch.bucketize(x.float().contiguous(), midpoints.float()).to(torch.uint8)
    return (x.float()[..., None] > midpoints.float()).sum(-1).to(torch.uint8)


def lookup(codebook: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Entries of ``codebook`` ([K], or [..., K] per channel as in :func:`nearest_code`) at ``codes`` (long)."""
    if codebook.dim() == 1:
        return codebook[codes]
    return codebook.expand(*codes.shape, codebook.shape[-1]).gather(-1, codes[..., None])[..., 0]


def weighted_kmeans_1d(
    x: torch.Tensor,
    weights: torch.Tensor | None,
    k: int,
    iters: int = 60,
    max_samples: int = 400_000,
    seed: int = 0,
) -> torch.Tensor:
    """Sorted centroids [k] float32 minimising sum(w * (x - c(x))**2) over samples ``x`` [N].

    With ``weights=None`` all samples weigh the same. At most ``max_samples`` samples are used (a seeded
    random subset).
    """
    x = x.reshape(-1)
    w = torch.ones_like(x) if weights is None else weights.reshape(-1)
    if x.numel() == 0:
        raise ValueError("weighted k-means needs at least one sample")
    if x.numel() > max_samples:
        keep = torch.randperm(x.numel(), generator=torch.Generator().manual_seed(seed))[:max_samples]
        x, w = x[keep], w[keep]
    return batched_weighted_kmeans_1d(x[None], w[None], k, iters)[0]


def batched_weighted_kmeans_1d(x: torch.Tensor, weights: torch.Tensor, k: int, iters: int = 60) -> torch.Tensor:
    """One 1-D weighted k-means per row: x, weights [C, N] -> sorted centroids [C, k] float32.

    Initialised at each row's weighted quantiles; Lloyd iterations until no centroid moves. A row whose
    weights sum to zero is clustered unweighted; zero-weight samples do not pull any centroid.
    """
    x, w = x.double(), weights.double()
    w = torch.where(w.sum(1, keepdim=True) > 0, w, torch.ones_like(w))
    x, order = x.sort(1)
    x, w = x.contiguous(), w.gather(1, order)
    cdf = torch.cumsum(w, 1) / w.sum(1, keepdim=True)
    targets = ((torch.arange(k, dtype=torch.float64) + 0.5) / k).expand(x.shape[0], k).contiguous()
    centroids = x.gather(1, torch.searchsorted(cdf, targets).clamp_max(x.shape[1] - 1))
    for _ in range(iters):
        centroids = centroids.sort(1).values
        assign = torch.searchsorted(((centroids[:, 1:] + centroids[:, :-1]) / 2).contiguous(), x)
        mass = torch.zeros_like(centroids).scatter_add_(1, assign, w)
        moment = torch.zeros_like(centroids).scatter_add_(1, assign, w * x)
        updated = torch.where(mass > 0, moment / mass.clamp_min(1e-300), centroids)
        if torch.allclose(updated, centroids, rtol=0, atol=1e-9):
            break
        centroids = updated
    return centroids.sort(1).values.float()


def qnorm_params(samples: torch.Tensor, codebook: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Q-Norm: [scale, offset] (float32) so that ``codebook * scale + offset`` gives the quantized
    ``samples`` the mean and standard deviation of the originals. samples [N] with a book [K], or
    [N, ...] with books per channel [..., K]; ``keep`` (bool, shape of samples): the samples that count."""
    x = samples.double()
    q = lookup(codebook.double(), nearest_code(x, codebook).long())
    if keep is not None:
        x, q = x[keep], q[keep]
    x, q = x.reshape(-1), q.reshape(-1)
    scale = x.std() / q.std().clamp_min(1e-12)
    offset = x.mean() - q.mean() * scale
    return torch.stack([scale, offset]).float()
