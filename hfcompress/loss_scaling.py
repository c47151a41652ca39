"""Loss scaling for the backward passes our techniques run through a float16 model.

Learned rounding, the end-to-end scale tuning and the Fisher sensitivity of a size budget
differentiate a loss through the model's own activations. In a float16 model the gradients
there are float16, whose smallest normal number is 6e-5: a block-output MSE over 4 x 256 x 576
values gives each output a gradient near 2e-7 x its error, which float16 keeps as a subnormal
with a few bits, or as 0 below 6e-8. The more values a block outputs (batch, tokens, hidden
size), the smaller each gradient, so the steps of a large model work on blurred gradients or
none, silently. (On SmolLM2-135M the loss was blurred, not gone: benchmarks/RESULTS.md, stop
59.) Mixed-precision training has the same problem and the same cure (Micikevicius et al.
2018; ``torch.amp.GradScaler``): multiply the loss by a large factor before the backward pass,
divide the gradients by it after, and when a gradient overflows, halve the factor and drop
that step. bfloat16 and float32 have float32's exponent range and need none of it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from hfcompress.layerwise import has_float16

__all__ = ["LossScaler"]


class LossScaler:
    """Dynamic loss scaling, on only where a float16 tensor takes part in the backward pass.

    Args:
        module: The model or block the loss is computed through: scaling is on when any of
            its parameters is float16.
        init_scale: The first factor (``GradScaler``'s default).
        growth_interval: Finite steps in a row after which the factor doubles.

    Attributes:
        enabled: Whether the loss is scaled at all.
        scale: The current factor (1 when disabled).
        skipped: Backward passes whose gradients overflowed (their steps were dropped).
    """

    MIN_SCALE = 1.0

    def __init__(self, module: nn.Module, *, init_scale: float = 2.0**16, growth_interval: int = 200) -> None:
        self.enabled = has_float16(module)
        self.scale = init_scale if self.enabled else 1.0
        self.growth_interval = growth_interval
        self.skipped = 0
        self._finite_run = 0

    def backward(self, loss: torch.Tensor, params: Iterable[torch.Tensor]) -> bool:
        """Backward pass of ``loss`` scaled by :attr:`scale`. Returns True when every gradient
        of ``params`` is finite (they stay scaled: read them with :meth:`unscaled`); else
        clears them, halves the factor and returns False, and the step is to be dropped.

        Raises:
            FloatingPointError: if the gradients are not finite even at a factor of 1 (a NaN
                or Inf in the model or the loss, not an overflow).
        """
        if not self.enabled:
            loss.backward()
            return True
        params = list(params)
        (loss * self.scale).backward()
        grads = [p.grad for p in params if p.grad is not None]
        if all(bool(torch.isfinite(g).all()) for g in grads):
            self._finite_run += 1
            if self._finite_run % self.growth_interval == 0:
                self.scale *= 2
            return True
        for p in params:
            p.grad = None
        if self.scale <= self.MIN_SCALE:
            raise FloatingPointError(
                f"the gradients are not finite even with the loss unscaled (loss {loss.item():.4g}): the model or "
                "its calibration data holds a NaN or Inf"
            )
        self.scale = max(self.scale / 2, self.MIN_SCALE)
        self._finite_run = 0
        self.skipped += 1
        return False

    def unscaled(self, p: torch.Tensor) -> torch.Tensor:
        """``p``'s gradient divided by the factor, in float32 (a float16 gradient divided in
        float16 would underflow again)."""
        grad = p.grad.float()
        return grad / self.scale if self.enabled else grad

    def unscale_(self, params: Iterable[torch.Tensor]) -> None:
        """Divide the gradients of ``params`` by the factor in place (float32 parameters:
        what an optimizer then reads)."""
        if not self.enabled:
            return
        for p in params:
            if p.grad is not None:
                p.grad = self.unscaled(p).to(p.grad.dtype)
