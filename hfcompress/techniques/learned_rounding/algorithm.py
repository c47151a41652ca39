"""Learned rounding as tensors and a trainable stand-in layer.

A weight ``W: [N, K]`` quantized with per-group scale ``s`` and zero point ``z`` is rounded
from a starting point ``B`` (``W`` itself for RTN, GPTQ's error-compensated weights for GPTQ)::

    q = clamp(round(B / s' + z' + v), 0, 2**bits - 1)        W_hat = (q - z') * s'

``v`` (one per weight, in ``[-0.5, 0.5]``) moves a weight to the other side of a rounding
boundary; ``s'`` and ``z'`` come from the group's range ``[-z s, (2**bits - 1 - z) s]`` with
its low end scaled by ``lo`` and its high end by ``hi`` (one each per group, in
``[0.5, 1.5]``; a symmetric grid scales both ends by ``hi``). Rounding passes gradients
straight through. With ``v = 0`` and ``lo = hi = 1``, ``W_hat`` is exactly the starting
quantization.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hfcompress.quant.affine import QuantizedWeight, expand_groups

__all__ = ["RANGE_LIMITS", "RoundingLinear", "signed_step"]

RANGE_LIMITS = (0.5, 1.5)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def _cast_ste(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` rounded to ``dtype`` (kept float32) forward, identity backward."""
    return x + (x.to(dtype).float() - x).detach()


class RoundingLinear(nn.Module):
    """A linear layer whose weight is a quantization with trainable rounding; stands in for
    a layer while its block is tuned, then :meth:`quantized` gives the codes.

    Args:
        base: ``[N, K]`` starting point ``B`` of the rounding.
        start: The starting quantization (its scales and zero points; codes unused).
        bias: The layer's bias, or None.
        symmetric: The grid is symmetric (its zero point fixed).
        float_zero: Zero points are floats (not rounded to integers).
        learn_range: Train ``lo`` and ``hi``; otherwise only ``v``.
    """

    def __init__(
        self,
        base: torch.Tensor,
        start: QuantizedWeight,
        bias: torch.Tensor | None,
        *,
        symmetric: bool,
        float_zero: bool,
        learn_range: bool,
    ) -> None:
        super().__init__()
        self.bits, self.group_size = start.bits, start.group_size
        self.symmetric, self.float_zero = symmetric, float_zero
        self.scale_dtype, self.zero_dtype = start.scales.dtype, start.zeros.dtype
        self.register_buffer("base", base.detach().float().clone())
        self.register_buffer("scales", start.scales.float())
        self.register_buffer("zeros", start.zeros.float())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.offset = nn.Parameter(torch.zeros_like(self.base))
        groups = start.scales.shape
        self.lo = nn.Parameter(torch.ones(groups, device=base.device), requires_grad=learn_range)
        self.hi = nn.Parameter(torch.ones(groups, device=base.device), requires_grad=learn_range)

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in (self.offset, self.lo, self.hi) if p.requires_grad]

    def _grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-group ``(s', z')`` from the range factors."""
        maxq = 2**self.bits - 1
        s, z = self.scales, self.zeros
        if self.symmetric:
            return _cast_ste(s * self.hi, self.scale_dtype), z
        # Range [-z s lo, (maxq - z) s hi]; at lo = hi = 1 this is exactly (s, z). Scales (and
        # float zero points) are rounded to their storage dtype, so training sees what is stored.
        scale = _cast_ste(s * (self.hi * (maxq - z) + self.lo * z) / maxq, self.scale_dtype)
        zero = z * self.lo * s / scale
        if self.float_zero:
            return scale, _cast_ste(zero, self.zero_dtype)
        return scale, torch.clamp(_round_ste(zero), 0, maxq)

    def weight(self) -> torch.Tensor:
        k = self.base.shape[1]
        scale, zero = self._grid()
        s = expand_groups(scale, self.group_size, k)
        z = expand_groups(zero, self.group_size, k)
        q = torch.clamp(_round_ste(self.base / s + z + self.offset), 0, 2**self.bits - 1)
        return (q - z) * s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight().to(x.dtype), self.bias)

    @torch.no_grad()
    def quantized(self) -> QuantizedWeight:
        """The codes, scales and zero points now chosen: they dequantize to :meth:`weight`."""
        k = self.base.shape[1]
        scale, zero = self._grid()
        scale, zero = scale.to(self.scale_dtype), zero.to(self.zero_dtype)
        s = expand_groups(scale.float(), self.group_size, k)
        z = expand_groups(zero.float(), self.group_size, k)
        q = torch.clamp(torch.round(self.base / s + z + self.offset), 0, 2**self.bits - 1).to(torch.uint8)
        return QuantizedWeight(q=q, scales=scale, zeros=zero, bits=self.bits, group_size=self.group_size)


@torch.no_grad()
def signed_step(layers: list[RoundingLinear], lr: float) -> None:
    """One signed-gradient step on every layer's trainable tensors, then clamp them back
    into their ranges; gradients are cleared."""
    low, high = RANGE_LIMITS
    for layer in layers:
        for p in layer.trainable():
            if p.grad is not None:
                p.sub_(lr * torch.sign(p.grad))
                p.grad = None
        layer.offset.clamp_(-0.5, 0.5)
        layer.lo.clamp_(low, high)
        layer.hi.clamp_(low, high)
