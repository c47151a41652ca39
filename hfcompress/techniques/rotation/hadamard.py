"""Orthogonal transforms of the ``rotate`` stage, as pure functions.

* :func:`hadamard_matrix`: the normalized Sylvester Hadamard matrix of a power-of-two order
  (symmetric and orthogonal: ``H @ H = I``).
* :func:`block_hadamard`: ``x @ blockdiag(H_b, ..., H_b)`` along the last dimension, computed
  as two small matmuls per block (``H_b = H_b1 kron H_b2``), so a block of 512 costs 2 x 16-32
  multiply-adds per value instead of 512. On CPU, for float32 and bfloat16 and blocks of 16 or
  more, a fast Walsh-Hadamard transform in C (``hfcompress/quant/hadamard_cpu.c``, built on first use by
  :mod:`hfcompress.quant.native`; log2(b) additions per value, one rounding) replaces them:
  on SmolLM2's W8A8 prefill the matmuls took about a tenth of the time.
* :func:`random_orthogonal`: a seeded Haar-random orthogonal matrix (QR of a Gaussian matrix
  with the signs fixed), for the residual stream, whose width (576 on SmolLM2) need not be a
  power of two.
"""

from __future__ import annotations

import ctypes
import functools
import math
from pathlib import Path

import torch

__all__ = ["block_hadamard", "ffn_block_size", "hadamard_matrix", "random_orthogonal"]

_CACHE: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}


def hadamard_matrix(
    n: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """The ``[n, n]`` Sylvester Hadamard matrix divided by ``sqrt(n)``; ``n`` a power of two."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard matrix here needs a power-of-two order, not {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).to(dtype=dtype, device=device)


def _cached(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (n, dtype, device)
    if key not in _CACHE:
        _CACHE[key] = hadamard_matrix(n, dtype=dtype, device=device)
    return _CACHE[key]


def ffn_block_size(width: int) -> int:
    """The largest power of two dividing ``width``: the Hadamard block of a layer input of that
    width (1536 -> 512, 11008 -> 256, 14336 -> 2048)."""
    if width < 1:
        raise ValueError(f"width must be positive, not {width}")
    return width & -width


_NATIVE_SOURCE = Path(__file__).parents[2] / "quant" / "hadamard_cpu.c"  # beside the other C kernels
_NATIVE_DTYPES = {torch.bfloat16: 1, torch.float32: 2}


@functools.cache
def _native_library() -> ctypes.CDLL | None:
    from hfcompress.quant import native

    lib = native.load(_NATIVE_SOURCE, "the CPU Hadamard transform (the rotation uses two matmuls)")
    if lib is not None:
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.hadamard_rows.argtypes = [ptr, ctypes.c_int, i64, i64, i64, i64, ptr, ctypes.c_int]
        lib.hadamard_rows.restype = ctypes.c_int
    return lib


def _native_block_hadamard(x: torch.Tensor, block: int) -> torch.Tensor | None:
    """``hadamard_cpu.c`` on ``x``, or None where it does not apply (not CPU, another dtype, a
    block under 16 or not a power of two, grad mode on a tensor that needs it, no compiler, or
    while ``torch.compile`` traces: there the two matmuls below compile into the graph, where
    a ``ctypes`` call would break it)."""
    if (
        torch.compiler.is_compiling()
        or x.device.type != "cpu"
        or x.dtype not in _NATIVE_DTYPES
        or block < 16
        or block & (block - 1)
        or (x.requires_grad and torch.is_grad_enabled())
    ):
        return None
    lib = _native_library()
    if lib is None:
        return None
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape, dtype=x.dtype)
    failed = lib.hadamard_rows(
        x2.data_ptr(), _NATIVE_DTYPES[x.dtype], x2.shape[0], k, x2.stride(0), block, y.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    if failed:
        raise MemoryError("the CPU Hadamard transform could not allocate its scratch memory")
    return y.reshape(x.shape)


def block_hadamard(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x @ blockdiag(H_block, ...)`` over the last dimension (a multiple of ``block``), in
    ``x``'s dtype. Its own inverse."""
    k = x.shape[-1]
    if block < 1 or k % block:
        raise ValueError(f"the last dimension ({k}) is not a multiple of the Hadamard block {block}")
    native = _native_block_hadamard(x, block) if x.numel() else None
    if native is not None:
        return native
    b1 = 1 << (block.bit_length() - 1) // 2
    b2 = block // b1
    # blockdiag(H_b1 kron H_b2): each block of b values, read as a [b1, b2] matrix X, maps to
    # H_b1 X H_b2 (both factors symmetric).
    y = x.reshape(*x.shape[:-1], k // block, b1, b2)
    y = torch.matmul(_cached(b1, x.dtype, x.device), y)
    y = torch.matmul(y, _cached(b2, x.dtype, x.device))
    return y.reshape(x.shape)


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A ``[n, n]`` float64 orthogonal matrix drawn from the Haar measure with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)
