"""Low-rank factorization of Linear weights as pure functions on tensors.

``W: [N, K]`` is approximated by ``B A`` with ``A: [r, K]`` and ``B: [N, r]``. Three ways of
choosing the factors, all one truncated SVD of ``W S`` for some invertible ``S: [K, K]``,
mapped back by ``S^-1``:

* plain SVD (``S = I``): the best rank-``r`` approximation of the weights themselves
  (Eckart-Young), blind to which input directions matter;
* whitened SVD (SVD-LLM, Wang et al. 2024, section 3.1): ``S`` is a square root of the
  inputs' second moment, ``S S^T = X^T X``. Then ``||(W - W') X^T||_F = ||(W - W') S||_F``, so
  truncating ``W S`` minimises the layer's output error on the calibration inputs, and the
  error equals the discarded singular values exactly (their Theorem 3.2);
* ASVD (Yuan et al. 2023): ``S = diag(mean |x_j|^alpha)``, a per-channel scaling that makes
  the SVD weigh the input channels with large activations.

The whitening here is an eigendecomposition in float64, ``X^T X = Q diag(lam) Q^T`` and
``S = Q diag(sqrt(lam))``, with every eigenvalue floored at ``damp * mean(lam)``. SVD-LLM's
Cholesky factor fails on the rank-deficient ``X^T X`` that grouped-query attention produces
(the ``o_proj`` input spans at most ``kv_heads * head_dim * q_per_kv`` directions, and
usually fewer in practice) and on dead channels; the floor handles those directions exactly:
they get almost no weight in the approximation instead of breaking it.

The same functions fit the quantization error ``E = W - Q(W)`` (EoRA, LQER, ZeroQuant-V2's
LoRC): ``W ~ Q(W) + B A``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "Factors",
    "Whitening",
    "asvd_scaling",
    "factorize",
    "rank_for_budget",
    "rank_for_energy",
    "rank_for_ratio",
    "refit_out_factor",
    "whitening",
]


@dataclass(frozen=True)
class Whitening:
    """An input transform ``S`` and its inverse (float64, ``[K, K]``), ``S S^T ~ X^T X``."""

    s: torch.Tensor
    s_inv: torch.Tensor


@dataclass(frozen=True)
class Factors:
    """The result of :func:`factorize`.

    Attributes:
        a: ``[r, K]`` first factor (applied to the input).
        b: ``[N, r]`` second factor.
        singular_values: ``[min(N, K)]`` all singular values of ``W S`` (float64), so callers
            can read the energy kept and the error of any other rank.
    """

    a: torch.Tensor
    b: torch.Tensor
    singular_values: torch.Tensor

    @property
    def rank(self) -> int:
        return self.a.shape[0]


def whitening(xtx: torch.Tensor, *, damp: float = 1e-4) -> Whitening:
    """The whitening of inputs whose second moment is ``xtx``.

    Args:
        xtx: ``[K, K]`` symmetric positive semi-definite, ``sum_t x_t x_t^T`` (any positive
            scale: it cancels in the factors).
        damp: Floor of the eigenvalues, relative to their mean; directions the inputs never
            take get this weight instead of zero, which keeps ``S`` invertible.

    Returns:
        :class:`Whitening` with ``S = Q diag(sqrt(lam))`` and ``S^-1 = diag(1/sqrt(lam)) Q^T``.
    """
    if xtx.ndim != 2 or xtx.shape[0] != xtx.shape[1]:
        raise ValueError(f"xtx must be a square [K, K] matrix, got shape {tuple(xtx.shape)}")
    if not torch.isfinite(xtx).all():
        raise ValueError("xtx holds NaN or infinite values: the calibration activations overflowed")
    h = xtx.detach().double()
    lam, q = torch.linalg.eigh((h + h.T) / 2)
    mean = lam.clamp_min(0).mean()
    if mean <= 0:
        raise ValueError("xtx is zero: the layer never saw a nonzero input")
    root = lam.clamp_min(damp * mean).sqrt()
    return Whitening(s=q * root, s_inv=q.T / root[:, None])


def asvd_scaling(abs_mean: torch.Tensor, *, alpha: float = 0.5, eps: float = 1e-6) -> Whitening:
    """ASVD's diagonal ``S = diag(mean|x_j|^alpha)`` from each input channel's mean magnitude.

    Args:
        abs_mean: ``[K]`` mean absolute activation per input channel.
        alpha: The exponent (ASVD's 0.5).
        eps: Floor of the scale (relative to the largest), for dead channels.
    """
    s = abs_mean.detach().double().clamp_min(0).pow(alpha)
    s = s.clamp_min(eps * float(s.max()) if float(s.max()) > 0 else 1.0)
    return Whitening(s=torch.diag(s), s_inv=torch.diag(1.0 / s))


def factorize(
    w: torch.Tensor, rank: int | Callable[[torch.Tensor], int], transform: Whitening | None = None
) -> Factors:
    """Rank-``rank`` factors of ``w: [N, K]``: the truncated SVD of ``W S``, mapped back.

    The singular values are split evenly between the factors (``B = U sqrt(sigma)``,
    ``A = sqrt(sigma) V^T S^-1``), so both have similar ranges, which suits quantizing them.

    Args:
        w: Float weight (or quantization error) ``[N, K]``.
        rank: ``1 <= rank <= min(N, K)``, or a function of the singular values that returns
            it (e.g. :func:`rank_for_energy`).
        transform: A :func:`whitening` or :func:`asvd_scaling`; None for plain SVD.

    Returns:
        :class:`Factors` in ``w``'s dtype and device.
    """
    n, k = w.shape
    m = w.detach().double()
    if transform is not None:
        if transform.s.shape != (k, k):
            raise ValueError(f"the transform is {tuple(transform.s.shape)}; a weight with {k} inputs needs [{k}, {k}]")
        m = m @ transform.s.to(m.device)
    u, sigma, vh = torch.linalg.svd(m, full_matrices=False)
    if callable(rank):
        rank = rank(sigma)
    if not 1 <= rank <= min(n, k):
        raise ValueError(f"rank={rank} must be between 1 and min(out, in) = {min(n, k)} for a {n}x{k} weight")
    root = sigma[:rank].sqrt()
    b = u[:, :rank] * root
    a = root[:, None] * vh[:rank]
    if transform is not None:
        a = a @ transform.s_inv.to(m.device)
    return Factors(a=a.to(w.dtype), b=b.to(w.dtype), singular_values=sigma)


def refit_out_factor(w: torch.Tensor, a: torch.Tensor, transform: Whitening | None = None) -> torch.Tensor:
    """The best ``B: [N, r]`` for a fixed ``A: [r, K]``: ``argmin_B ||(W - B A) S||_F``.

    After ``A`` is quantized, refitting ``B`` to the quantized ``A`` takes back part of what
    rounding ``A`` lost (least squares: ``B = W H A^T (A H A^T)^-1`` with ``H = S S^T``, or
    ``H = I`` without a transform).

    ``H`` is the :func:`whitening`'s, whose eigenvalues are floored, not the raw ``X^T X``:
    summed from bfloat16 products, ``X^T X`` can have negative eigenvalues, and ``A H A^T``
    then too; solved against that, ``B`` grew 20-fold on SmolLM2's layer 11 down projection
    (bfloat16 model, W3 + rank 32) and the layer's error to 4.7 times its weight.

    Args:
        w: ``[N, K]`` the matrix the factors approximate.
        a: ``[r, K]`` the fixed first factor (e.g. dequantized).
        transform: The inputs' :func:`whitening` (the one the factors were fitted with), or None.
    """
    wd, ad = w.detach().double(), a.detach().double().to(w.device)
    if transform is None:
        ha = ad.T
    else:
        s = transform.s.double().to(w.device)
        ha = s @ (s.T @ ad.T)  # H A^T, [K, r]
    gram = ad @ ha  # [r, r], positive definite for a full-rank A
    eye = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    ridge = 1e-10 * gram.diagonal().mean().clamp_min(1e-300) * eye
    b = torch.linalg.solve(gram + ridge, (wd @ ha).T).T
    return b.to(w.dtype)


def rank_for_ratio(out_features: int, in_features: int, ratio: float) -> int:
    """The largest rank whose two factors hold at most ``1 - ratio`` of the layer's weights.

    Args:
        ratio: Fraction of the weights to remove, in (0, 1).
    """
    if not 0 < ratio < 1:
        raise ValueError(f"ratio={ratio} must be in (0, 1): the fraction of the layer's weights to remove")
    n, k = out_features, in_features
    return max(1, int((1 - ratio) * n * k // (n + k)))


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """The smallest rank whose singular values keep ``energy`` of the total ``sum sigma^2``
    (with whitening, the fraction of the layer's output energy kept)."""
    if not 0 < energy <= 1:
        raise ValueError(f"energy={energy} must be in (0, 1]")
    power = singular_values.double().pow(2)
    kept = torch.cumsum(power, 0) / power.sum().clamp_min(1e-300)
    return min(int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype) - 1e-12)) + 1, len(power))


def rank_for_budget(spectra: dict[str, torch.Tensor], costs: dict[str, int], budget: int) -> dict[str, int]:
    """Ranks for several layers that keep the most relative output energy within ``budget``.

    Each layer ``l`` gains ``sigma_i^2 / sum(sigma^2)`` (its relative output error falls by that
    much, with whitening) for its ``i``-th rank and pays ``costs[l]`` weights (``N + K``) per
    rank. The gains fall with ``i``, so taking ranks greedily by gain per weight is optimal for
    this separable problem. Every layer keeps at least rank 1.

    Args:
        spectra: Singular values per layer (descending).
        costs: Weights one rank costs, per layer.
        budget: Total weights the factors may hold.

    Returns:
        Rank per layer.
    """
    ranks = {name: 1 for name in spectra}
    spent = sum(costs.values())
    if spent > budget:
        raise ValueError(f"a budget of {budget} weights cannot hold even rank 1 everywhere ({spent} weights)")
    candidates = []
    for name, sigma in spectra.items():
        power = sigma.double().pow(2)
        gains = (power / power.sum().clamp_min(1e-300))[1:] / costs[name]
        candidates.append(torch.stack([gains, torch.full_like(gains, len(candidates))], 1))
    if not candidates:
        return ranks
    names = list(spectra)
    table = torch.cat(candidates)
    order = torch.argsort(table[:, 0], descending=True, stable=True)
    for layer in table[order, 1].long().tolist():
        name = names[layer]
        if spent + costs[name] > budget:
            continue
        spent += costs[name]
        ranks[name] += 1
    return ranks
