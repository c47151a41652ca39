"""Input-activation quantization (the ``A8`` of ``W8A8`` / ``W4A8``), as pure functions.

Activations are quantized symmetrically to signed 8-bit codes, either per token (each row of
``x`` gets ``s = absmax(row) / 127``, computed on the fly), per tensor (one scale, computed
on the fly when dynamic, or calibrated once and stored with the layer when static) or per
input channel (static only: one calibrated scale per column of ``x``)::

    x_q = clamp(round(x / s), -128, 127)          x_hat = x_q * s
"""

from __future__ import annotations

import torch

from hfcompress.quant.scheme import QuantArgs

__all__ = ["activation_scales", "fake_quantize_activations", "nonfinite_rows_nan", "quantize_activations"]


def activation_scales(x: torch.Tensor, args: QuantArgs, static_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Scales for ``x: [..., K]``: ``[..., 1]`` per token, ``[1]`` per tensor, ``[K]`` per
    channel (float32).

    Args:
        x: Activations.
        args: The layer's input-activation args.
        static_scale: The stored scale of a static layer (``[1]`` or ``[K]``).
    """
    qmax = 2 ** (args.num_bits - 1) - 1
    if not args.dynamic:
        if static_scale is None:
            raise ValueError("a static activation scheme needs its stored scale (input_scale)")
        return static_scale.float()
    # abs().amax() measured faster than vector_norm(inf) and aminmax on CPU (3-13x); the max
    # is exact in any dtype, so it is taken before the cast to float32.
    if args.strategy == "token":
        absmax = x.detach().abs().amax(dim=-1, keepdim=True).float()
    else:
        absmax = x.detach().abs().amax().float().reshape(1)
    # An all-zero row quantizes to zeros under any positive scale.
    return (absmax / qmax).clamp(min=torch.finfo(torch.float32).tiny)


def quantize_activations(x: torch.Tensor, scales: torch.Tensor, num_bits: int = 8) -> torch.Tensor:
    """Signed integer codes of ``x`` (int8 for 8 bits) under ``scales`` from :func:`activation_scales`."""
    qmax = 2 ** (num_bits - 1) - 1
    x = x.detach()
    # float32 x: one division into a new tensor; other dtypes: a float32 copy divided in place
    # (a mixed-dtype division measured 5x slower on CPU). Rounding and clamping in place.
    q = torch.div(x, scales.float()) if x.dtype == torch.float32 else x.float().div_(scales.float())
    return q.round_().clamp_(-qmax - 1, qmax).to(torch.int8)


def nonfinite_rows_nan(x: torch.Tensor, scales: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """``scales`` with NaN for the rows of ``x: [T, K]`` that hold a NaN or an infinity.

    An int8 code cannot hold either, so an int8 kernel would turn it into a finite number and
    the layer's output row into a finite guess. Through the scale, the row's output is NaN, as
    the float layer's is not finite. A dynamic per-token scale is NaN or infinite there already;
    a static one gets ``[T, 1]`` scales, but only when some row needs it.
    """
    if args.dynamic and args.strategy == "token":
        return scales
    bad = ~x.isfinite().all(dim=-1, keepdim=True)
    if not bad.any():
        return scales
    return scales.expand(x.shape[0], scales.shape[-1]).masked_fill(bad, float("nan"))


def fake_quantize_activations(
    x: torch.Tensor, args: QuantArgs, static_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """``x`` rounded onto its 8-bit grid, in ``x``'s dtype: what an int8 kernel computes with.
    A NaN or an infinity stays as it is (an int8 code would make it a finite number)."""
    scales = activation_scales(x, args, static_scale)
    fq = (quantize_activations(x, scales, args.num_bits).float() * scales).to(x.dtype)
    # A dynamic scale is NaN or infinite wherever x is (it is x's absolute maximum): with every
    # scale finite nothing needs keeping, and the two passes over x below (a tenth of a
    # SmoothQuant alpha search's time) are skipped. Not while compiling: no data-dependent branch.
    if args.dynamic and not torch.compiler.is_compiling() and bool(scales.isfinite().all()):
        return fq
    return torch.where(x.isfinite(), fq, x)
