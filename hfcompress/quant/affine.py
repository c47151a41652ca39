"""Affine (uniform) quantization of weight matrices: per channel or per group along K.

A weight ``W: [N, K]`` is cut along its input dimension K into groups of ``group_size``
columns; the last group is partial when ``group_size`` does not divide K (SmolLM2's
``K = 576`` with ``group_size = 128`` gives four full groups and one of 64). Each row and group
gets a scale ``s`` and a zero point ``z``; codes are unsigned, ``q in [0, 2**bits - 1]``::

    q = clamp(round(W / s + z), 0, 2**bits - 1)        W_hat = (q - z) * s

Three kinds of range:

* symmetric: ``z = 2**(bits - 1)`` fixed, ``s = absmax / ((2**bits - 1) / 2)`` (every code used);
* asymmetric, integer zero point (GPTQ's): the range ``[min(W, 0), max(W, 0)]`` with ``z``
  rounded to an integer and stored as uint8, so 0.0 is exactly representable;
* asymmetric, float zero point: the range ``[min(W), max(W)]`` exactly, ``z = -min / s``
  stored like the scales. The grid then lands on both ends of the range (as in GGUF's Q4_1
  and HQQ), which loses less than a grid shifted to an integer zero point.

Scales and float zero points are rounded to their storage dtype *before* the codes are
computed, so the stored model dequantizes to exactly what was chosen here. Scales are
clamped to the storage dtype's smallest normal value, so none rounds to 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "QuantizedWeight",
    "compute_qparams",
    "dequantize",
    "expand_groups",
    "group_view",
    "num_groups",
    "qparams_from_range",
    "quantize",
    "quantize_rtn",
    "resolve_group_size",
]


@dataclass(frozen=True)
class QuantizedWeight:
    """Integer codes and their parameters.

    Attributes:
        q: ``[N, K]`` uint8 codes in ``[0, 2**bits - 1]``.
        scales: ``[N, G]`` scales, in the storage dtype.
        zeros: ``[N, G]`` zero points: uint8 integers, or floats in the scales' dtype.
        bits: Bits per code.
        group_size: Columns per group, resolved (``K`` for per channel).
    """

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``[N, K]`` weight these codes stand for."""
        return dequantize(self.q, self.scales, self.zeros, self.group_size, dtype=dtype)


MIN_GROUP_SIZE = 8  # smaller groups cost more in scales than they save in error


def resolve_group_size(group_size: int, in_features: int) -> int:
    """``-1`` means per channel: one group spanning all ``in_features`` columns."""
    return in_features if group_size == -1 else group_size


def num_groups(in_features: int, group_size: int) -> int:
    """Groups along K, counting a partial last group."""
    return -(-in_features // resolve_group_size(group_size, in_features))


def expand_groups(params: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """Repeat per-group parameters ``[N, G]`` to per-column ``[N, K]``."""
    return params.repeat_interleave(group_size, dim=1)[:, :in_features]


def group_view(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[N, K] -> [N, G, group_size]``, padding a partial last group by repeating its last
    column (which changes neither its min nor its max)."""
    n, k = w.shape
    pad = num_groups(k, group_size) * group_size - k
    if pad:
        w = F.pad(w.unsqueeze(0), (0, pad), mode="replicate").squeeze(0)
    return w.reshape(n, -1, group_size)


def compute_qparams(
    w: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    symmetric: bool,
    scale_dtype: torch.dtype = torch.float16,
    float_zero: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scales and zero points for each row and group.

    Args:
        w: ``[N, K]`` float weight.
        bits: Bits per code, 2 to 8.
        group_size: Columns per group, or -1 for per channel.
        symmetric: Fix the zero point at ``2**(bits-1)`` and use a range symmetric around 0.
        scale_dtype: Storage dtype of the scales (and of float zero points); rounded to it here.
        float_zero: Asymmetric only: exact min-max range with a float zero point, instead of
            an integer zero point.

    Returns:
        ``scales [N, G]`` in ``scale_dtype`` and ``zeros [N, G]``: uint8, or ``scale_dtype``
        when ``float_zero``.
    """
    group_size = resolve_group_size(group_size, w.shape[1])
    g = group_view(w.float(), group_size)
    return qparams_from_range(
        g.amin(dim=-1), g.amax(dim=-1), bits=bits, symmetric=symmetric, scale_dtype=scale_dtype, float_zero=float_zero
    )


def qparams_from_range(
    w_min: torch.Tensor,
    w_max: torch.Tensor,
    *,
    bits: int,
    symmetric: bool,
    scale_dtype: torch.dtype = torch.float16,
    float_zero: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`compute_qparams` given each group's range, ``w_min, w_max: [N, G]`` float32 (a
    range search shrinks it without reading the weight again)."""
    maxq = 2**bits - 1
    if not float_zero or symmetric:
        w_min, w_max = w_min.clamp(max=0), w_max.clamp(min=0)
    if symmetric:
        scale = torch.maximum(-w_min, w_max) / (maxq / 2)
    else:
        scale = (w_max - w_min) / maxq
    # A scale must survive storage: a group with a tiny (or no) range would round to a scale
    # of 0 in float16 (which then fails to reload) or to a subnormal. Clamp to the storage
    # dtype's smallest normal value; a constant group is still represented exactly.
    finfo = torch.finfo(scale_dtype)
    floor = torch.full_like(scale, finfo.tiny)
    if float_zero and not symmetric:
        # The float zero point -min / s is stored in the same dtype: keep it finite there.
        floor = torch.maximum(floor, w_min.abs() / (finfo.max / 2))
    scale = torch.maximum(scale, floor).to(scale_dtype)
    if symmetric:
        return scale, torch.full_like(scale, 2 ** (bits - 1), dtype=torch.uint8)
    zero = -w_min / scale.float()
    if float_zero:
        return scale, zero.to(scale_dtype)
    return scale, torch.round(zero).clamp(0, maxq).to(torch.uint8)


def quantize(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, *, bits: int, group_size: int) -> torch.Tensor:
    """Codes ``[N, K]`` uint8 of ``w [N, K]`` under the given per-group parameters."""
    k = w.shape[1]
    group_size = resolve_group_size(group_size, k)
    s = expand_groups(scales.float(), group_size, k)
    z = expand_groups(zeros.float(), group_size, k)
    return torch.clamp(torch.round(w.float() / s + z), 0, 2**bits - 1).to(torch.uint8)


def dequantize(
    q: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``W_hat = (q - z) * s`` as ``[N, K]`` in ``dtype``, computed in float32."""
    k = q.shape[1]
    group_size = resolve_group_size(group_size, k)
    s = expand_groups(scales.float(), group_size, k)
    z = expand_groups(zeros.float(), group_size, k)
    return ((q.float() - z) * s).to(dtype)


def quantize_rtn(
    w: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    symmetric: bool,
    scale_dtype: torch.dtype = torch.float16,
    float_zero: bool = False,
) -> QuantizedWeight:
    """Round-to-nearest quantization of ``w: [N, K]`` with min-max parameters."""
    group_size = resolve_group_size(group_size, w.shape[1])
    scales, zeros = compute_qparams(
        w, bits=bits, group_size=group_size, symmetric=symmetric, scale_dtype=scale_dtype, float_zero=float_zero
    )
    q = quantize(w, scales, zeros, bits=bits, group_size=group_size)
    return QuantizedWeight(q=q, scales=scales, zeros=zeros, bits=bits, group_size=group_size)
