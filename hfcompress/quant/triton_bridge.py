"""The one place hfcompress reaches the Triton kernels (imported only for CUDA tensors)."""

from __future__ import annotations

import functools
import importlib.util
import logging
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from hfcompress.quant.linear import QuantLinear

__all__ = ["GEMV_MAX_M", "available", "w4a16_linear"]

logger = logging.getLogger(__name__)

# Up to this many rows the per-row GEMV beats the tiled GEMM's wasted tile rows.
GEMV_MAX_M = 4


@functools.cache
def available() -> bool:
    """True when Triton and a CUDA device are usable; logs once why not otherwise."""
    if importlib.util.find_spec("triton") is None:
        logger.warning("Triton is not installed: 4-bit layers on CUDA use the slower reference path")
        return False
    return torch.cuda.is_available()


def w4a16_linear(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` through the W4A16 kernels; ``x: [..., K]``."""
    from hfcompress_triton import w4a16

    lead = x.shape[:-1]
    x2 = x.reshape(-1, layer.in_features)
    zeros = None if layer.symmetric else layer.zeros
    kernel = w4a16.w4a16_gemv if x2.shape[0] <= GEMV_MAX_M else w4a16.w4a16_gemm
    y = kernel(x2, layer.qweight, layer.scales, zeros, layer.group_size)
    y = y.reshape(*lead, layer.out_features)
    return y if layer.bias is None else y + layer.bias.to(y.dtype)
