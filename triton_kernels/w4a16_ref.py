"""Pure-torch twins of the W4A16 Triton kernels, with the same parameter names.

Layout shared with the kernels (and with :class:`hfcompress.quant.QuantLinear`):

* ``qweight: [N, ceil(K / 8) * 4]`` uint8: byte ``j`` of row ``n`` holds code ``2j`` in its low
  nibble and code ``2j + 1`` in its high nibble.
* ``scales: [N, G]`` float16/bfloat16/float32, ``G = ceil(K / group_size)`` (the last group may
  be partial).
* ``zeros: [N, G]`` zero points, uint8 or float in the scales' dtype, or ``None`` for
  symmetric weights (zero point 8).

``W[n, k] = (q[n, k] - zeros[n, k // group_size]) * scales[n, k // group_size]``.
"""

from __future__ import annotations

import torch

from hfcompress.quant.affine import dequantize
from hfcompress.quant.packing import unpack

__all__ = ["w4_dequantize_ref", "w4a16_gemm_ref", "w4a16_gemv_ref"]


def _zeros_or_default(zeros: torch.Tensor | None, scales: torch.Tensor) -> torch.Tensor:
    return torch.full_like(scales, 8, dtype=torch.uint8) if zeros is None else zeros


def w4_dequantize_ref(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    in_features: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dequantize packed 4-bit weights to ``[N, K]`` in ``dtype`` (computed in float32, rounded once)."""
    q = unpack(qweight, 4, in_features)
    return dequantize(q, scales, _zeros_or_default(zeros, scales), group_size, dtype=dtype)


def w4a16_gemm_ref(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor:
    """``y = x @ W.T`` for ``x: [M, K]``; float32 accumulation, result in ``x.dtype``: ``[M, N]``."""
    w = w4_dequantize_ref(qweight, scales, zeros, group_size, x.shape[-1])
    return (x.float() @ w.t()).to(x.dtype)


def w4a16_gemv_ref(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor:
    """The decode case of :func:`w4a16_gemm_ref`; ``x: [M, K]`` with M small (1 when decoding)."""
    return w4a16_gemm_ref(x, qweight, scales, zeros, group_size)
