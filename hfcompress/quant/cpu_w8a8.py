"""``cpu_int_mm``: layers with 8-bit input activations (``W8A8``, ``W4A8``) on CPU, through
PyTorch's int8 x int8 -> int32 matmul (``torch._int_mm``).

It serves per-channel weights (one scale per output row) of 4 or 8 bits, symmetric or not:

    y = s_x * s_w * (x_q @ (q - o)^T - (z - o) * sum(x_q))  + b

with ``x_q`` the int8 activation codes and ``s_x`` their scale (per token or per tensor, see
:mod:`hfcompress.quant.activations`), ``q`` the weight codes, ``z`` their zero point and
``o = 2^(bits-1)`` the offset that makes ``q - o`` fit int8. The int32 accumulation is exact,
so the result equals the reference kernel's ``fq(x) @ dequantize(W)^T`` up to float32
rounding of the epilogue. Grouped weights (one scale per group of columns) are left to the
reference kernel: their scales cannot be applied after a single integer matmul.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from hfcompress.quant.activations import activation_scales, quantize_activations
from hfcompress.quant.dispatch import Kernel, cached, register_kernel

if TYPE_CHECKING:
    from hfcompress.quant.linear import QuantLinear

__all__: list[str] = []


@dataclass(frozen=True)
class _IntMMPack:
    weight: torch.Tensor  # [K, N] int8, q - o (column-major view of [N, K])
    scales: torch.Tensor  # [N] float32
    correction: torch.Tensor | None  # [N] float32, z - o; None when symmetric


def _supports(layer: QuantLinear, x: torch.Tensor) -> bool:
    act = layer.scheme.input_activations
    return (
        act is not None
        and act.num_bits == 8
        and act.strategy in ("token", "tensor")
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and layer.bits in (4, 8)
        and layer.scales.shape[1] == 1
        and hasattr(torch, "_int_mm")
    )


def _build(layer: QuantLinear) -> _IntMMPack:
    offset = 2 ** (layer.bits - 1)
    weight = (layer.codes().to(torch.int16) - offset).to(torch.int8)
    correction = None if layer.symmetric else layer.zero_points().float()[:, 0] - offset
    return _IntMMPack(weight.t(), layer.scales.float()[:, 0], correction)


def _forward(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    pack = cached(layer, "cpu_int_mm", _build)
    act = layer.scheme.input_activations
    lead = x.shape[:-1]
    x2 = x.reshape(-1, layer.in_features)
    sx = activation_scales(x2, act, getattr(layer, "input_scale", None))  # [T, 1] or [1]
    xq = quantize_activations(x2, sx, act.num_bits)
    acc = torch._int_mm(xq, pack.weight).float()  # [T, N], exact
    if pack.correction is not None:
        acc = acc - xq.sum(dim=-1, keepdim=True, dtype=torch.int32).float() * pack.correction
    y = (acc * sx * pack.scales).to(x.dtype).reshape(*lead, layer.out_features)
    return y if layer.bias is None else y + layer.bias.to(x.dtype)


register_kernel(Kernel("cpu_int_mm", _supports, _forward, priority=20))
