"""The low-rank algorithms as pure functions on small tensors."""

import itertools

import pytest
import torch

from hfcompress.techniques.low_rank.algorithm import (
    asvd_scaling,
    factorize,
    rank_for_budget,
    rank_for_energy,
    rank_for_ratio,
    refit_out_factor,
    whitening,
)


def _problem(n=12, k=10, t=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g, dtype=torch.float64)
    # Inputs with very unequal channel scales, as activations have.
    x = torch.randn(t, k, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, k, dtype=torch.float64)
    return w, x


def _out_err(w, f, x):
    return ((w - f.b @ f.a) @ x.T).pow(2).sum().item()


def test_plain_svd_error_is_the_discarded_singular_values():
    w, _ = _problem()
    f = factorize(w, 4)
    assert f.a.shape == (4, 10) and f.b.shape == (12, 4)
    assert (w - f.b @ f.a).pow(2).sum().item() == pytest.approx(f.singular_values[4:].pow(2).sum().item(), rel=1e-9)


def test_whitened_svd_output_error_is_exact_and_beats_plain_and_asvd():
    w, x = _problem()
    xtx = x.T @ x
    f = factorize(w, 4, whitening(xtx, damp=1e-12))
    # SVD-LLM's theorem: the output error is the sum of the discarded singular values of W S.
    assert _out_err(w, f, x) == pytest.approx(f.singular_values[4:].pow(2).sum().item(), rel=1e-6)
    plain = factorize(w, 4)
    asvd = factorize(w, 4, asvd_scaling(x.abs().mean(0)))
    assert _out_err(w, f, x) < _out_err(w, asvd, x) < _out_err(w, plain, x)


def test_whitening_survives_rank_deficient_inputs():
    # Inputs spanning 3 of 10 directions (grouped-query attention's o_proj, dead channels):
    # a Cholesky factor of x^T x fails; the floored eigendecomposition does not.
    w, x = _problem()
    x = x[:, :3] @ torch.randn(3, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    xtx = x.T @ x
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(xtx)
    t = whitening(xtx)
    assert torch.isfinite(t.s_inv).all()
    assert torch.allclose(t.s @ t.s_inv, torch.eye(10, dtype=torch.float64), atol=1e-6)
    f = factorize(w, 3, t)
    # Rank 3 reproduces the layer's outputs on a 3-dimensional input space.
    assert _out_err(w, f, x) < 1e-6 * (w @ x.T).pow(2).sum().item()


def test_whitening_rejects_bad_statistics():
    with pytest.raises(ValueError, match="NaN"):
        whitening(torch.full((3, 3), float("nan")))
    with pytest.raises(ValueError, match="never saw"):
        whitening(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="square"):
        whitening(torch.zeros(3, 4))


@pytest.mark.parametrize("rank", [0, 11], ids=["zero", "above-min"])
def test_rank_out_of_range_is_an_error(rank):
    w, _ = _problem()
    with pytest.raises(ValueError, match="min\\(out, in\\) = 10"):
        factorize(w, rank)


def test_asvd_scaling_floors_dead_channels():
    t = asvd_scaling(torch.tensor([4.0, 0.0, 1.0]), alpha=0.5)
    assert torch.allclose(torch.diag(t.s), torch.tensor([2.0, 2e-6, 1.0], dtype=torch.float64))
    assert torch.isfinite(t.s_inv).all()


@pytest.mark.parametrize("n,k,ratio", [(1536, 576, 0.2), (576, 576, 0.5), (8, 6, 0.1)])
def test_rank_for_ratio_is_the_largest_rank_within_the_budget(n, k, ratio):
    r = rank_for_ratio(n, k, ratio)
    assert r * (n + k) <= (1 - ratio) * n * k < (r + 1) * (n + k)


def test_rank_for_ratio_rejects_fractions_outside_0_1():
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        rank_for_ratio(4, 4, 1.0)


def test_rank_for_energy():
    sigma = torch.tensor([3.0, 2.0, 1.0, 1.0])  # energies 9, 4, 1, 1 of 15
    assert rank_for_energy(sigma, 0.6) == 1
    assert rank_for_energy(sigma, 0.61) == 2
    assert rank_for_energy(sigma, 13 / 15) == 2
    assert rank_for_energy(sigma, 1.0) == 4


def test_rank_for_budget_matches_brute_force():
    spectra = {"a": torch.tensor([5.0, 3.0, 2.0, 1.0]), "b": torch.tensor([4.0, 3.5, 3.0, 0.5])}
    costs = {"a": 3, "b": 5}

    def kept(name, r):
        p = spectra[name].pow(2)
        return (p[:r].sum() / p.sum()).item()

    for budget in (8, 14, 20, 26, 32):
        ranks = rank_for_budget(spectra, costs, budget)
        assert sum(ranks[n] * costs[n] for n in ranks) <= budget
        best = max(
            kept("a", ra) + kept("b", rb)
            for ra, rb in itertools.product(range(1, 5), repeat=2)
            if ra * costs["a"] + rb * costs["b"] <= budget
        )
        assert kept("a", ranks["a"]) + kept("b", ranks["b"]) == pytest.approx(best)
    with pytest.raises(ValueError, match="rank 1 everywhere"):
        rank_for_budget(spectra, costs, 7)


def test_refit_out_factor_recovers_from_a_perturbed_first_factor():
    w, x = _problem()
    xtx = x.T @ x
    white = whitening(xtx, damp=1e-12)
    f = factorize(w, 4, white)
    # With the optimal A, the refit B gives the same product.
    b = refit_out_factor(w, f.a, white)
    assert torch.allclose(b @ f.a, f.b @ f.a, atol=1e-8)
    # With a rounded A, refitting B lowers the output error.
    a_hat = f.a + 0.05 * torch.randn(f.a.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def err(bb):
        return ((w - bb @ a_hat) @ x.T).pow(2).sum().item()

    assert err(refit_out_factor(w, a_hat, white)) < err(f.b)


def test_refit_out_factor_stays_bounded_when_x_t_x_is_indefinite():
    # X^T X summed from bfloat16 products can have negative eigenvalues. Solved against the raw
    # matrix, A H A^T could be nearly singular, and B blew up (SmolLM2 layer 11's down
    # projection: the layer's error became 4.7 times its weight). The whitening's floored
    # eigenvalues keep the refit's metric positive definite.
    g = torch.Generator().manual_seed(0)
    k, n = 24, 16
    q, _ = torch.linalg.qr(torch.randn(k, k, dtype=torch.float64, generator=g))
    lam = torch.logspace(4, -2, k, dtype=torch.float64)
    lam[-1] = -2.0  # rounding's negative eigenvalue
    xtx = (q * lam) @ q.T
    w = torch.randn(n, k, dtype=torch.float64, generator=g)
    white = whitening(xtx, damp=1e-4)
    a = factorize(w, 2, white).a
    # A row on which the positive and the negative direction nearly cancel: a^T X^T X a ~ 0.
    p, m = 10, k - 1
    a[1] = q[:, p] / lam[p].sqrt() + q[:, m] / (-lam[m]).sqrt() * (1 + 1e-7)
    raw_gram = a @ xtx @ a.T
    raw_b = torch.linalg.solve(raw_gram, a @ xtx @ w.T).T
    assert (w - raw_b @ a).norm() > 100 * w.norm()  # what the raw X^T X gave
    b = refit_out_factor(w, a, white)
    h = white.s @ white.s.T
    assert torch.linalg.eigvalsh(a @ h @ a.T).min() > 0
    assert torch.allclose(b, torch.linalg.solve(a @ h @ a.T, a @ h @ w.T).T, rtol=1e-6, atol=1e-8)
    assert (w - b @ a).norm() < 2 * w.norm()
