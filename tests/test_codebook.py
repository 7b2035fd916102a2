import pytest
import torch

from kvquant_vllm.quant.codebook import (
    batched_weighted_kmeans_1d,
    lookup,
    nearest_code,
    qnorm_params,
    uniform_codebook,
    weighted_kmeans_1d,
)
from kvquant_vllm.quant.rotation import value_rotation


def test_nearest_code_matches_brute_force(rng):
    book = torch.sort(torch.rand(8, generator=rng) * 2 - 1).values
    x = torch.rand(1000, generator=rng) * 2.4 - 1.2
    brute = (x[:, None].double() - book[None].double()).abs().argmin(-1)
    assert torch.equal(nearest_code(x, book).long(), brute)


def test_books_per_channel_match_brute_force(rng):
    books = torch.sort(torch.rand(3, 5, 8, generator=rng) * 2 - 1).values  # [H, D, K]
    x = torch.rand(40, 3, 5, generator=rng) * 2.4 - 1.2
    brute = (x[..., None].double() - books.double()).abs().argmin(-1)
    codes = nearest_code(x, books).long()
    assert torch.equal(codes, brute)
    entries = lookup(books, codes)
    assert torch.equal(entries, books[torch.arange(3)[None, :, None], torch.arange(5)[None, None, :], codes])


def test_batched_kmeans_is_one_kmeans_per_row(rng):
    x = torch.randn(3, 2000, generator=rng) * torch.tensor([[0.2], [1.0], [3.0]])
    w = torch.rand(3, 2000, generator=rng)
    w[1, :1000] = 0  # zero-weight samples pull no centroid
    batched = batched_weighted_kmeans_1d(x, w, 8)
    for row in range(3):
        keep = w[row] > 0
        single = weighted_kmeans_1d(x[row][keep], w[row][keep], 8)
        torch.testing.assert_close(batched[row], single, rtol=0, atol=1e-6)


@pytest.mark.parametrize("head_dim", [64, 128, 96])  # 96: no Sylvester Hadamard matrix, a random orthogonal one
def test_value_rotation_is_orthogonal_and_spreads_a_spike(head_dim):
    r = value_rotation(head_dim).double()
    torch.testing.assert_close(r @ r.T, torch.eye(head_dim, dtype=torch.float64), rtol=0, atol=1e-6)
    assert torch.equal(value_rotation(head_dim), value_rotation(head_dim))  # fixed: the calibration depends on it
    spike = torch.zeros(head_dim, dtype=torch.float64)
    spike[7] = 1.0
    # one channel's energy spread over all of them: no element keeps more than a few times its even share
    assert float((spike @ r).abs().max()) < 4 / head_dim**0.5


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
