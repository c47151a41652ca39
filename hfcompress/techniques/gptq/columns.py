"""GPTQ's column loop (Algorithm 1, lines 5-9 of the GPTQ paper) over a run of columns of one
lazy block: :func:`quantize_columns` runs it in C on CPU (``hfcompress/quant/gptq_cpu.c``,
each thread taking whole rows, which are independent), :func:`quantize_columns_ref` in torch,
one column at a time for all rows. Same signature, same float32 operations in the same order.

The torch loop costs a dozen tensor operations per column whatever the layer's size: on
SmolLM2-135M (150k columns over its 210 Linear layers) it was most of GPTQ's time.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

__all__ = ["quantize_columns", "quantize_columns_ref"]

_NATIVE_SOURCE = Path(__file__).parents[2] / "quant" / "gptq_cpu.c"  # beside the other C kernels


def quantize_columns_ref(
    W1: torch.Tensor,
    Hinv1: torch.Tensor,
    c0: int,
    c1: int,
    s: torch.Tensor,
    z: torch.Tensor,
    maxq: int,
    Q: torch.Tensor,
    unrounded: torch.Tensor,
    j0: int,
    Err1: torch.Tensor,
) -> None:
    """Quantize columns ``c0 .. c1 - 1`` of the lazy block ``W1``, spreading each column's error
    over the block's later columns, in place.

    Args:
        W1: ``[N, width]`` float32, the block's columns as earlier blocks' updates left them;
            updated in place.
        Hinv1: ``[width, width]`` float32, the block's part of the upper Cholesky factor of
            ``H^-1``.
        c0, c1: The columns to quantize, ``0 <= c0 < c1 <= width``.
        s, z: ``[N, c1 - c0]`` float32 scale and zero point of each column (a column stride of 0
            where the columns share a group's).
        maxq: The largest code, ``2**bits - 1``.
        Q: ``[N, K]`` uint8; column ``j0 + c - c0`` receives column ``c``'s codes.
        unrounded: ``[N, K]`` float32; the same column receives ``c`` before rounding.
        j0: Where the run's first column goes in ``Q`` and ``unrounded``.
        Err1: ``[N, width]`` float32; column ``c`` receives ``(w - q) / Hinv[c, c]``.
    """
    for c in range(c0, c1):
        j = j0 + c - c0
        w = W1[:, c]
        sc, zc = s[:, c - c0], z[:, c - c0]
        unrounded[:, j] = w
        q = torch.clamp(torch.round(w / sc + zc), 0, maxq)
        Q[:, j] = q.to(torch.uint8)
        err = (w - (q - zc) * sc) / Hinv1[c, c]  # Algorithm 1: E = (W - Q) / [H^-1]_jj
        W1[:, c:].addr_(err, Hinv1[c, c:], alpha=-1)
        Err1[:, c] = err


@functools.cache
def _native_library() -> ctypes.CDLL | None:
    from hfcompress.quant import native

    lib = native.load(_NATIVE_SOURCE, "GPTQ's C column loop (GPTQ runs its torch loop)")
    if lib is not None:
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.gptq_columns.argtypes = [ptr, i64, i64, i64, ptr, i64, i64, i64, ptr, ptr, i64, i64, ctypes.c_float,
                                     ptr, ptr, i64, i64, ptr, i64, ctypes.c_int]  # fmt: skip
        lib.gptq_columns.restype = None
    return lib


def _native_applies(
    W1: torch.Tensor, Hinv1: torch.Tensor, Q: torch.Tensor, unrounded: torch.Tensor, Err1: torch.Tensor
) -> bool:
    """Whether the C loop takes these tensors: float32 on CPU, rows of contiguous values, codes
    and unrounded values laid out alike."""
    floats = (W1, unrounded, Err1)
    return (
        Hinv1.device.type == "cpu"
        and Hinv1.dtype == torch.float32
        and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.stride(-1) == 1 for t in floats)
        and Q.device.type == "cpu"
        and Q.dtype == torch.uint8
        and Q.stride() == unrounded.stride()
    )


def quantize_columns(
    W1: torch.Tensor,
    Hinv1: torch.Tensor,
    c0: int,
    c1: int,
    s: torch.Tensor,
    z: torch.Tensor,
    maxq: int,
    Q: torch.Tensor,
    unrounded: torch.Tensor,
    j0: int,
    Err1: torch.Tensor,
) -> None:
    """:func:`quantize_columns_ref` in C where it applies (CPU float32 tensors and a C compiler),
    else that function."""
    n, width = W1.shape
    if not 0 <= c0 < c1 <= width or s.shape != (n, c1 - c0) or z.shape != s.shape:
        raise ValueError(f"columns {c0}..{c1} of a [{n}, {width}] block with scales {tuple(s.shape)}")
    lib = _native_library() if _native_applies(W1, Hinv1, Q, unrounded, Err1) else None
    if lib is None:
        quantize_columns_ref(W1, Hinv1, c0, c1, s, z, maxq, Q, unrounded, j0, Err1)
        return
    Hinv1 = Hinv1 if Hinv1.stride(-1) == 1 else Hinv1.contiguous()  # cholesky_inverse's is column-major
    s, z = s.float(), z.float()
    if z.stride() != s.stride():  # the C loop reads both with one pair of strides
        s, z = s.contiguous(), z.contiguous()
    lib.gptq_columns(
        W1.data_ptr(), n, width, W1.stride(0), Hinv1.data_ptr(), Hinv1.stride(0), c0, c1,
        s.data_ptr(), z.data_ptr(), s.stride(0), s.stride(1), float(maxq),
        Q.data_ptr(), unrounded.data_ptr(), Q.stride(0), j0, Err1.data_ptr(), Err1.stride(0),
        torch.get_num_threads(),
    )  # fmt: skip
