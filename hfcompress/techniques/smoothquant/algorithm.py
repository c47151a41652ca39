"""SmoothQuant (Xiao et al., 2023) as pure functions on tensors.

For a linear layer ``y = x W^T`` whose input channels ``j`` carry outliers, divide the input
by a per-channel factor ``s_j`` and multiply the weight's column ``j`` by it: the product is
unchanged, ``y = (x diag(s)^-1)(W diag(s))^T``, and the division is folded into whatever
produced ``x`` (a norm's weight and bias, or the output rows of the linear before). The
paper's factor (its Eq. 4) balances the two ranges with a migration strength ``alpha``::

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

with ``max|W_j|`` over every layer that reads ``x`` (q, k and v share one ``s``).
"""

from __future__ import annotations

import torch

__all__ = ["fake_quantize_weight_per_channel", "smoothing_scales"]


def smoothing_scales(
    act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float, eps: float = 1e-5
) -> torch.Tensor:
    """The factors ``s: [K]`` (float32) of the paper's Eq. 4.

    Args:
        act_absmax: ``[K]`` largest ``|x_j|`` seen on calibration data.
        weight_absmax: ``[K]`` largest ``|W_ij|`` of column ``j`` over every reading layer.
        alpha: Migration strength in [0, 1]: 0 leaves the activations alone, 1 moves all of
            their range into the weights.
        eps: Floor of both ranges, so dead channels get a finite factor.
    """
    a = act_absmax.float().clamp(min=eps)
    w = weight_absmax.float().clamp(min=eps)
    s = a.pow(alpha) / w.pow(1 - alpha)
    # A channel no calibration token used keeps its scale: there is nothing to balance.
    return torch.where(act_absmax.float() > 0, s, torch.ones_like(s)).clamp(min=eps)


def fake_quantize_weight_per_channel(w: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """``W: [N, K]`` rounded to a symmetric per-row grid of ``bits`` bits, in ``W``'s dtype
    (what the alpha search scores each candidate with)."""
    qmax = 2 ** (bits - 1) - 1
    s = (w.detach().float().abs().amax(dim=1, keepdim=True) / qmax).clamp(min=torch.finfo(torch.float32).tiny)
    return (torch.clamp(torch.round(w.float() / s), -qmax - 1, qmax) * s).to(w.dtype)
