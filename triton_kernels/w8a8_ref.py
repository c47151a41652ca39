"""Pure-torch twins of the W8A8 Triton kernels (:mod:`hfcompress_triton.w8a8`), with the same
parameter names.

* ``per_token_quant``: ``x: [M, K]`` float to int8 codes and one float32 scale per row,
  ``s = absmax(row) / 127``, ``x_q = clamp(round(x / s), -128, 127)``; with ``scale=`` (a
  static ``[1]`` scale) every row uses that scale instead.
* ``int8_gemm``: ``y = (x_q @ w_q^T) * x_scale * w_scale + bias`` for ``x_q: [M, K]`` and
  ``w_q: [N, K]`` int8, accumulated exactly in int32, the epilogue in float32, the result in
  ``out_dtype``; ``x_scale: [M, 1]`` (per token) or ``[1]`` (per tensor), ``w_scale: [N]``.
"""

from __future__ import annotations

import torch

__all__ = ["int8_gemm_ref", "int8_matmul_int32_ref", "per_token_quant_ref"]

_TINY = torch.finfo(torch.float32).tiny


def per_token_quant_ref(x: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_q: [M, K] int8, scale: [M, 1] float32)``; a static ``scale: [1]`` is used for every
    row and returned per row (float32). A row holding a NaN or an infinity gets the scale NaN:
    an int8 code cannot hold either, so the scale carries it into the output row."""
    xf = x.float()
    if scale is None:
        # Divided by a tensor, not a Python number: CUDA multiplies by the reciprocal of a
        # scalar divisor, one ulp off the kernel's IEEE division (and the CPU's).
        amax = xf.abs().amax(dim=-1, keepdim=True)
        scale = (amax / amax.new_tensor(127.0)).clamp(min=_TINY)
    else:
        scale = scale.float().reshape(1, 1).expand(x.shape[0], 1)
    q = torch.clamp(torch.round(xf / scale), -128, 127).to(torch.int8)
    return q, scale.masked_fill(~xf.isfinite().all(dim=-1, keepdim=True), float("nan"))


def int8_matmul_int32_ref(x_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """``x_q @ w_q^T`` in exact int32 arithmetic: ``[M, N]`` int32."""
    if x_q.is_cuda:  # CUDA has no int64 matmul; float64 is exact here (|sum| <= 2**14 K < 2**53)
        return (x_q.double() @ w_q.double().t()).to(torch.int32)
    return (x_q.to(torch.int64) @ w_q.to(torch.int64).t()).to(torch.int32)


def int8_gemm_ref(
    x_q: torch.Tensor,
    w_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """``[M, N]`` in ``out_dtype``: the exact int32 product, scaled in float32, plus ``bias``."""
    acc = int8_matmul_int32_ref(x_q, w_q).float()
    y = acc * x_scale.float().reshape(-1, 1) * w_scale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)
