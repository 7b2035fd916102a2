import pytest
import torch

from kvquant_vllm.quant.codebook import nearest_code, qnorm_params, uniform_codebook, weighted_kmeans_1d


def test_nearest_code_matches_brute_force(rng):
    book = torch.sort(torch.rand(8, generator=rng) * 2 - 1).values
    x = torch.rand(1000, generator=rng) * 2.4 - 1.2
    brute = (x[:, None].double() - book[None].double()).abs().argmin(-1)
    assert torch.equal(nearest_code(x, book).long(), brute)


def test_weighted_kmeans_follows_weights(rng):
    # Two clusters of equal size; one carries 100x the weight of the other.
    light = torch.randn(5000, generator=rng) * 0.1 - 0.5
    heavy = torch.randn(5000, generator=rng) * 0.1 + 0.5
    x = torch.cat([light, heavy])
    w = torch.cat([torch.full((5000,), 0.01), torch.ones(5000)])
    unweighted = weighted_kmeans_1d(x, None, 4)
    weighted = weighted_kmeans_1d(x, w, 4)
    assert int((unweighted > 0).sum()) == 2
    assert int((weighted > 0).sum()) == 3  # centroids move toward the heavy cluster
    assert torch.all(weighted[1:] >= weighted[:-1])


def test_weighted_kmeans_is_lloyd_fixed_point(rng):
    x = torch.randn(4000, generator=rng, dtype=torch.float64)
    w = torch.rand(4000, generator=rng, dtype=torch.float64)
    c = weighted_kmeans_1d(x, w, 8, iters=500).double()
    assign = nearest_code(x, c.float()).long()
    for j in range(8):
        sel = assign == j
        assert float(c[j]) == pytest.approx(float((w[sel] * x[sel]).sum() / w[sel].sum()), abs=1e-5)


def test_weighted_kmeans_beats_uniform_on_weighted_error(rng):
    x = torch.randn(20000, generator=rng).clamp(-3, 3) / 3
    w = torch.rand(20000, generator=rng)
    def err(book):
        return float((w * (x - book[nearest_code(x, book).long()]) ** 2).sum())
    assert err(weighted_kmeans_1d(x, w, 8)) < 0.8 * err(uniform_codebook(3))


def test_qnorm_restores_mean_and_std(rng):
    x = torch.randn(10000, generator=rng) * 0.4 + 0.1
    book = uniform_codebook(2)
    scale, offset = qnorm_params(x, book)
    q = book[nearest_code(x, book).long()] * scale + offset
    assert float(q.mean()) == pytest.approx(float(x.mean()), abs=1e-4)
    assert float(q.std()) == pytest.approx(float(x.std()), rel=1e-4)
