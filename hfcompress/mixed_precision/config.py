"""The ``budget`` section of a weight-quantization stage: mixed precision under a size budget."""

from __future__ import annotations

import dataclasses
from typing import Literal

from hfcompress.config import ConfigSection, invalid
from hfcompress.quant.affine import MIN_GROUP_SIZE
from hfcompress.quant.packing import SUPPORTED_BITS

__all__ = ["BitsBudget"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class BitsBudget(ConfigSection):
    """Choose bits and group size per layer so that the targeted layers fit a size budget.

    Each layer gets one of the candidates ``bits x group_sizes``. The stored size counts
    everything a ``QuantLinear`` keeps: packed codes, scales and zero points (biases aside).
    Give exactly one of ``bits_per_weight`` and ``total_bytes``.

    Args:
        bits_per_weight: Average stored bits per weight over the targeted layers, scales and
            zero points included (W4 g128 with fp16 scales and uint8 zeros is 4.1875).
        total_bytes: The same budget in bytes of the targeted layers.
        bits: Candidate bit widths (2, 3, 4, 8).
        group_sizes: Candidate group sizes; ``-1`` for one scale per output channel.
        strategy: ``"sensitivity"``: estimate how much the loss grows when each layer is
            quantized at each candidate (diagonal Fisher information times the squared
            rounding error) and pick the plan of least total growth within the budget (a
            multiple-choice knapsack). ``"layer_order"``: no measurement; the layers in model
            order get the largest candidate that still leaves room for the smallest one on
            every later layer (the baseline a sensitivity plan has to beat).
        samples: Calibration sequences whose gradients estimate the Fisher information (one
            forward and backward pass each, through the whole model: about 4 s per 512 tokens
            for SmolLM2-135M on two CPU cores).
    """

    bits_per_weight: float | None = None
    total_bytes: int | None = None
    bits: tuple[int, ...] = (2, 3, 4, 8)
    group_sizes: tuple[int, ...] = (64, 128)
    strategy: Literal["sensitivity", "layer_order"] = "sensitivity"
    samples: int = 8

    def _validate(self) -> None:
        if (self.bits_per_weight is None) == (self.total_bytes is None):
            raise invalid("budget", self.to_dict(), "exactly one of bits_per_weight (e.g. 3.5) and total_bytes")
        if self.bits_per_weight is not None and self.bits_per_weight <= 0:
            raise invalid("bits_per_weight", self.bits_per_weight, "a positive number of bits")
        if self.total_bytes is not None and self.total_bytes <= 0:
            raise invalid("total_bytes", self.total_bytes, "a positive number of bytes")
        if not self.bits or any(b not in SUPPORTED_BITS for b in self.bits):
            raise invalid("bits", list(self.bits), f"a non-empty list drawn from {list(SUPPORTED_BITS)}")
        if not self.group_sizes or any(g != -1 and g < MIN_GROUP_SIZE for g in self.group_sizes):
            raise invalid(
                "group_sizes", list(self.group_sizes), f"a non-empty list of -1 or integers >= {MIN_GROUP_SIZE}"
            )
        if self.samples < 1:
            raise invalid("samples", self.samples, "an integer >= 1")
