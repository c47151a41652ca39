"""The one place hfcompress reaches the Triton kernels: the ``triton_w4a16`` (CUDA, 4-bit
weight-only) and ``triton_w8a8`` (CUDA, 8-bit input activations) kernels of the dispatch
registry. Triton itself is imported only on the first CUDA call."""

from __future__ import annotations

import functools
import importlib.util
import logging
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from hfcompress.quant.activations import activation_scales
from hfcompress.quant.dispatch import Kernel, cached, register_kernel

if TYPE_CHECKING:
    from hfcompress.quant.linear import QuantLinear

__all__ = ["GEMV_MAX_M", "available", "w4a16_linear", "w8a8_linear"]

logger = logging.getLogger(__name__)

# Up to this many rows of x the fused GEMV runs (decoding). Above it, the weight is
# dequantized once by a Triton kernel into a transient [N, K] matrix in x's dtype and cuBLAS
# multiplies: on an H200 that beat our fused tiled GEMM at every M measured (16, 128, 2048)
# (benchmarks/bench_w4a16.py, RESULTS.md), at the cost of the transient's memory.
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
    if x2.shape[0] <= GEMV_MAX_M:
        y = w4a16.w4a16_gemv(x2, layer.qweight, layer.scales, zeros, layer.group_size)
        y = y if layer.bias is None else y + layer.bias.to(y.dtype)
    else:
        w = w4a16.w4_dequantize(layer.qweight, layer.scales, zeros, layer.group_size, layer.in_features, x2.dtype)
        y = F.linear(x2, w, None if layer.bias is None else layer.bias.to(x2.dtype))
    return y.reshape(*lead, layer.out_features)


def _supports(layer: QuantLinear, x: torch.Tensor) -> bool:
    return x.is_cuda and layer.bits == 4 and layer.scheme.input_activations is None and available()


register_kernel(Kernel("triton_w4a16", _supports, w4a16_linear, priority=30))


def _int8_weight(layer: QuantLinear) -> tuple[torch.Tensor, torch.Tensor]:
    # Symmetric codes minus their offset 2**(bits-1), [N, K] int8, and the scales [N].
    return layer.signed_codes().contiguous(), layer.scales.float()[:, 0].contiguous()


def w8a8_linear(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` through the fused per-token quantize and the int8 GEMM; ``x: [..., K]``."""
    from hfcompress_triton import w8a8

    lead = x.shape[:-1]
    x2 = x.reshape(-1, layer.in_features).contiguous()
    w_q, w_scale = cached(layer, "triton_w8a8", _int8_weight)
    act = layer.scheme.input_activations
    # Per token: the kernel finds each row's scale; per tensor: the one scale, stored (static)
    # or taken from the whole input (dynamic), is given to it.
    scale = None if act.strategy == "token" else activation_scales(x2, act, getattr(layer, "input_scale", None))
    x_q, x_scale = w8a8.per_token_quant(x2, scale)
    y = w8a8.int8_gemm(x_q, w_q, x_scale, w_scale, layer.bias, x2.dtype)
    return y.reshape(*lead, layer.out_features)


def _supports_w8a8(layer: QuantLinear, x: torch.Tensor) -> bool:
    act = layer.scheme.input_activations
    return (
        x.is_cuda
        and act is not None
        and act.strategy in ("token", "tensor")
        and layer.bits in (4, 8)
        and layer.symmetric
        and layer.scales.shape[1] == 1
        and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and available()
    )


register_kernel(Kernel("triton_w8a8", _supports_w8a8, w8a8_linear, priority=30))
