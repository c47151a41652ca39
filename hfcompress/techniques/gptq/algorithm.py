"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers") as pure functions on tensors.

Notation follows the paper: ``W: [N, K]`` a Linear weight (rows are independent), ``H = 2 X X^T
/ n: [K, K]`` the Hessian of the layer's squared output error w.r.t. one row, ``Hinv`` the
upper Cholesky factor of ``H^-1``. Columns are quantized left to right; the error of each is
spread over the columns not yet quantized (Algorithm 1), in lazy blocks of ``block_size``
columns whose updates are applied to the rest of ``W`` at once (section 4, step 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hfcompress.input_stats import HessianAccumulator
from hfcompress.quant.affine import (
    QuantizedWeight,
    compute_qparams,
    group_view,
    qparams_from_range,
    resolve_group_size,
)
from hfcompress.techniques.gptq.columns import quantize_columns

__all__ = [
    "GPTQResult",
    "HessianAccumulator",
    "asymmetric_target",
    "cholesky_inverse_upper",
    "quantize_weight",
    "search_qparams",
]


@dataclass(frozen=True)
class GPTQResult:
    """Attributes:
    weight: The codes and their parameters, in the original column order.
    damp: The relative damping that made ``H`` positive definite (``>= damp`` asked for).
    loss: GPTQ's accumulated error, ``sum((w - w_hat)^2 / [H^-1]_jj^2) / 2`` over all columns.
    unrounded: ``[N, K]`` float32, each weight as GPTQ rounded it: the original weight plus
        the error feedback of the columns quantized before it, in the original column
        order. ``round(unrounded / s + z)`` gives the codes; learned rounding starts here.
    """

    weight: QuantizedWeight
    damp: float
    loss: float
    unrounded: torch.Tensor


def cholesky_inverse_upper(h: torch.Tensor, damp: float, max_damp: float = 1e3) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``.

    When the factorization fails (H singular or badly conditioned), ``damp`` grows tenfold
    until it succeeds. With bfloat16 ``x^T x`` products this happens on rank-deficient
    Hessians (grouped-query attention's ``o_proj``): rounding each product to bfloat16 leaves
    negative eigenvalues of a few percent of ``mean(diag H)``. Recollecting those layers with
    float32 products, so 1% damping holds, measured worse on SmolLM2 W4 g128 (perplexity
    34.74 against 34.06; benchmarks/RESULTS.md), so the escalation stays.

    Returns the factor and the damping used. Raises only if even ``max_damp`` fails, which
    needs a non-finite H.
    """
    k = h.shape[0]
    mean_diag = torch.mean(torch.diag(h)).item()
    scale = mean_diag if mean_diag > 0 else 1.0
    while True:
        damped = h + damp * scale * torch.eye(k, dtype=h.dtype, device=h.device)
        chol, info = torch.linalg.cholesky_ex(damped)
        if info.item() == 0:
            inv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if info.item() == 0 and torch.isfinite(upper).all():
                return upper, damp
        if damp >= max_damp:
            raise ValueError(f"H is not positive definite even with damp={damp}; is it finite?")
        damp *= 10


def asymmetric_target(
    w: torch.Tensor, h: torch.Tensor, d: torch.Tensor, damp: float, alpha: float = 1.0
) -> torch.Tensor:
    """GPTAQ (Li et al., 2025, "GPTAQ: Efficient Finetuning-Free Quantization for Asymmetric
    Calibration"): the weight ``W'`` whose GPTQ objective on the quantized model's inputs
    ``X`` is the error against the *float* model's output ``W X~``.

    ``||Q X - W X~||^2 = tr((Q - W') H (Q - W')^T) + const`` with ``H = X X^T`` and
    ``W' = W X~ X^T H^-1 = W + W D H^-1``, ``D = (X~ - X) X^T``; so quantizing ``W'`` with
    GPTQ on ``H`` minimises the asymmetric objective, the paper's result in closed form.

    Args:
        w: ``W: [N, K]``.
        h: ``H: [K, K]``, as :class:`HessianAccumulator` scales it.
        d: ``D: [K, K]``, scaled the same way (:class:`~hfcompress.input_stats.InputShiftHooks`).
        damp: Damping of ``H`` relative to the mean of its diagonal, as GPTQ's.
        alpha: Weight of the correction (``W + alpha W D H^-1``); the GPTAQ authors' code
            uses 0.25.

    Returns:
        ``W': [N, K]`` float32.
    """
    W = w.detach().float()
    H = h.detach().float().to(W.device)
    mean_diag = torch.mean(torch.diag(H)).item()
    damped = H + damp * (mean_diag if mean_diag > 0 else 1.0) * torch.eye(H.shape[0], device=W.device)
    # W D H^-1 = (H^-1 (W D)^T)^T, H symmetric.
    return W + alpha * torch.linalg.solve(damped, (W @ d.float().to(W.device)).t()).t()


def search_qparams(
    w: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    symmetric: bool,
    scale_dtype: torch.dtype,
    float_zero: bool,
    grid: int = 20,
    max_shrink: float = 0.2,
    norm: float = 2.4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group scales and zeros whose range is the min-max range shrunk by the factor in
    ``[1 - max_shrink, 1]`` (``grid`` steps) that minimises ``sum |w - w_hat|^norm`` per row
    and group (the MSE observer of GPTQ's reference code, with its ``norm = 2.4``)."""
    k = w.shape[1]
    group_size = resolve_group_size(group_size, k)
    groups = -(-k // group_size)
    pad = groups * group_size - k
    # A partial last group is padded with its last column (the range unchanged); the padding's
    # errors are masked out below.
    wg = group_view(w.float(), group_size)
    valid = (torch.arange(groups * group_size, device=w.device) < k).reshape(groups, group_size)
    # The range of w * shrink is the range of w times shrink (rounding is monotonic): read it once.
    w_min, w_max = wg.amin(dim=-1), wg.amax(dim=-1)
    maxq = 2**bits - 1
    best_err = torch.full((w.shape[0], groups), math.inf, device=w.device)
    best_s = best_z = None
    for step in range(grid + 1):
        shrink = 1.0 - max_shrink * step / grid
        s, z = qparams_from_range(
            w_min * shrink,
            w_max * shrink,
            bits=bits,
            symmetric=symmetric,
            scale_dtype=scale_dtype,
            float_zero=float_zero,
        )
        sf, zf = s.float()[..., None], z.float()[..., None]
        # |dequantize(quantize(w)) - w|^norm, in place: a dozen passes over the weight per step.
        e = wg / sf
        e.add_(zf).round_().clamp_(0, maxq).sub_(zf).mul_(sf).sub_(wg).abs_().pow_(norm)
        if pad:
            e.mul_(valid)
        err = e.sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = s if best_s is None else torch.where(better, s, best_s)
        best_z = z if best_z is None else torch.where(better, z, best_z)
    return best_s, best_z


def quantize_weight(
    w: torch.Tensor,
    h: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    symmetric: bool,
    scale_dtype: torch.dtype = torch.float16,
    float_zero: bool = False,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    clip_search: bool = False,
) -> GPTQResult:
    """Quantize ``w: [N, K]`` with GPTQ given ``h: [K, K]``.

    Args:
        w: Float weight.
        h: Hessian from :class:`HessianAccumulator`.
        bits, group_size, symmetric, scale_dtype, float_zero: The grid, as in
            :func:`hfcompress.quant.affine.compute_qparams`.
        block_size: Columns per lazy batch.
        damp: Damping relative to the mean of ``diag(H)``; escalated if needed.
        act_order: Quantize columns by decreasing ``diag(H)``. Group parameters are then
            computed up front from the original ``W`` ("static groups"), so the codes keep
            the natural column order and the packed layout stays contiguous.
        clip_search: Choose each group's range by :func:`search_qparams` instead of min-max.

    Returns:
        A :class:`GPTQResult` with codes in the original column order.
    """
    n, k = w.shape
    group_size = resolve_group_size(group_size, k)
    maxq = 2**bits - 1
    W = w.detach().float().clone()
    H = h.detach().float().clone().to(W.device)
    dead = torch.diag(H) == 0  # inputs that are always zero: their weights do not matter
    H[dead, dead] = 1
    W[:, dead] = 0

    def params(cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fn = search_qparams if clip_search else compute_qparams
        return fn(
            cols, bits=bits, group_size=group_size, symmetric=symmetric, scale_dtype=scale_dtype, float_zero=float_zero
        )

    groups = -(-k // group_size)
    scales = torch.empty(n, groups, dtype=scale_dtype, device=W.device)
    zeros = torch.empty(n, groups, dtype=torch.uint8 if not float_zero or symmetric else scale_dtype, device=W.device)
    static = act_order
    if static:
        scales, zeros = params(W)

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(k, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    Hinv, damp_used = cholesky_inverse_upper(H, damp)

    Q = torch.zeros(n, k, dtype=torch.uint8, device=W.device)
    unrounded = torch.empty(n, k, device=W.device)
    loss = 0.0
    # Per-column parameters, gathered once when they are static.
    col_scales = scales.float()[:, perm // group_size] if static else None
    col_zeros = zeros.float()[:, perm // group_size] if static else None
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        i = 0
        while i < i2 - i1:  # runs of columns that share how their parameters are found
            j = i1 + i
            if static:
                end = i2 - i1
                s, z = col_scales[:, j:i2], col_zeros[:, j:i2]
            else:
                g = j // group_size  # no act-order: column j is column j of the layer
                group_end = min((g + 1) * group_size, k)
                if j % group_size == 0:
                    # Dynamic groups: parameters from the group's columns as they are now,
                    # after earlier columns' updates.
                    current = W1[:, i : min(group_end, i2) - i1]
                    if group_end > i2:  # the group reaches past this block: apply its pending updates
                        ahead = W[:, i2:group_end] - Err1[:, :i] @ Hinv[i1:j, i2:group_end]
                        current = torch.cat([current, ahead], dim=1)
                    new_s, new_z = params(current)
                    scales[:, g], zeros[:, g] = new_s[:, 0], new_z[:, 0]
                end = min(group_end, i2) - i1
                s = scales[:, g].float()[:, None].expand(n, end - i)
                z = zeros[:, g].float()[:, None].expand(n, end - i)
            quantize_columns(W1, Hinv1, i, end, s, z, maxq, Q, unrounded, j, Err1)
            i = end
        loss += Err1.pow(2).sum().item() / 2
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy batch update of the remaining columns

    inv = torch.argsort(perm)
    Q = Q[:, inv]
    weight = QuantizedWeight(q=Q, scales=scales, zeros=zeros, bits=bits, group_size=group_size)
    return GPTQResult(weight=weight, damp=damp_used, loss=loss, unrounded=unrounded[:, inv])
