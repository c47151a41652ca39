"""Norm layers' gains, as the techniques that fold scales into them (SmoothQuant, AWQ, rotation)
need them: most norms scale by ``weight``, Gemma's RMSNorms by ``1 + weight``."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["norm_gain", "norm_offset", "set_norm_gain"]


@torch.no_grad()
def norm_offset(norm: nn.Module) -> float:
    """``a`` in the norm's per-channel gain ``a + weight`` (0 for Llama's RMSNorm and
    LayerNorm, 1 for Gemma's), measured on a fixed input with the weight at 0 and at 1 (the
    bias, if any, at 0).

    Raises:
        ValueError: the norm's output is not its normalized input times ``a + weight``.
    """
    weight = norm.weight
    bias = getattr(norm, "bias", None)
    saved = [(t, t.detach().clone()) for t in (weight, bias) if isinstance(t, torch.Tensor)]
    x = torch.randn(4, weight.numel(), generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)
    try:
        if isinstance(bias, torch.Tensor):
            bias.zero_()
        weight.zero_()
        at_zero = norm(x).double()
        weight.fill_(1.0)
        unit = norm(x).double() - at_zero  # the normalized input
    finally:
        for tensor, copy in saved:
            tensor.copy_(copy)
    offset = float((at_zero * unit).sum() / (unit * unit).sum().clamp(min=1e-30))
    tol = 1e-2 if weight.dtype in (torch.float16, torch.bfloat16) else 1e-5
    if float((at_zero - offset * unit).norm()) > tol * max(float(at_zero.norm()), float(unit.norm())):
        raise ValueError(f"{type(norm).__name__}'s output is not its normalized input times a per-channel gain")
    return round(offset) if abs(offset - round(offset)) < tol else offset


def norm_gain(norm: nn.Module) -> torch.Tensor:
    """The norm's per-channel gain ``a + weight``, float64."""
    return norm.weight.detach().double() + norm_offset(norm)


@torch.no_grad()
def set_norm_gain(norm: nn.Module, gain: torch.Tensor, offset: float | None = None) -> None:
    """Make the norm's per-channel gain ``gain`` (``offset``: :func:`norm_offset`, if known)."""
    offset = norm_offset(norm) if offset is None else offset
    norm.weight.copy_((gain.double() - offset).to(norm.weight.dtype))
