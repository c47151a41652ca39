"""The CPU decode kernel of weight-only layers (``W2A16`` to ``W8A16``): ``decode_cpu.c``'s
``decode_linear``, for calls of fewer than ``AMX_MIN_ROWS`` rows (decoding).

On CPUs with AVX-512 BF16 (and VBMI for 2 and 3 bits) it reads the layer's own packed codes and
sums them against the rows in float32, each group's scale and zero point applied to its sums:
see :func:`decode_forward`. :mod:`hfcompress.quant.cpu_kernels` routes weight-only calls here
for a few rows; calls it does not serve (:func:`decode_fits`, or None from
:func:`decode_forward`) go to AMX, torch's int4 and int8 ops or the reference kernel. The kernel
takes the scale layout of :mod:`hfcompress.quant.cpu_w8a8`'s AMX kernels
(:func:`~hfcompress.quant.cpu_w8a8.group_scales`).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hfcompress import matmul_speed
from hfcompress.quant import native
from hfcompress.quant.cpu_w8a8 import AMX_MIN_ROWS, NATIVE_X_DTYPES, group_scales, layer_group, row_view
from hfcompress.quant.dispatch import FORCE_REFERENCE_ENV, cached
from hfcompress.quant.packing import pack

if TYPE_CHECKING:
    from hfcompress.quant.linear import QuantLinear

__all__ = [
    "DENSE_DTYPE_ENV",
    "DENSE_MIN_ROWS",
    "decode_bits",
    "decode_fits",
    "decode_forward",
    "dense_dtype",
    "dense_forward",
    "dequantize_dense",
]

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("decode_cpu.c")


@functools.cache
def _native_library() -> ctypes.CDLL | None:
    """``decode_cpu.c``, built on first use (None without a C compiler)."""
    lib = native.load(_SOURCE, "the CPU weight-only decode kernel (decoding uses torch's int4 and int8 ops)")
    if lib is not None:
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.decode_bits_built.restype = ctypes.c_int
        lib.decode_linear.argtypes = [ptr, ctypes.c_int, i64, i64, i64, ptr, ctypes.c_int, i64, i64, ptr, i64, ptr,
                                      ptr, ptr, ctypes.c_int, ctypes.c_int]  # fmt: skip
        lib.decode_linear.restype = ctypes.c_int
        lib.decode_planned.argtypes = [ptr, ptr, ctypes.c_int, i64, i64, ptr, ctypes.c_int]
        lib.decode_planned.restype = ctypes.c_int
        lib.dequantize_weight.argtypes = [ptr, ctypes.c_int, i64, i64, i64, ptr, ptr, i64, ptr, ctypes.c_int,
                                          ctypes.c_int]  # fmt: skip
        lib.dequantize_weight.restype = ctypes.c_int
    return lib


# The kernel's k step: groups must be multiples of it, cover K, or (2 and 3 bits) be one of
# _FINE_GROUPS, which it scales lane by lane.
_DECODE_STEP = 128
_FINE_GROUPS = (32, 64)


@functools.cache
def decode_bits() -> frozenset[int]:
    """The weight widths (of 2, 3, 4 and 8 bits) ``decode_cpu.c``'s kernel takes here: built
    (a compiler and CPU with AVX-512 BF16, and VBMI for 2 and 3 bits) and giving the exact sums
    of small integers on a probe per width, one scale per channel and (below 8 bits) groups of
    32 and 64 with their own scales, that covers a partial step and group, a channel block past
    N and the extreme codes (checked once per process)."""
    lib = _native_library()
    if lib is None:
        return frozenset()
    built = lib.decode_bits_built()
    exact = set()
    g = torch.Generator().manual_seed(0)
    t, k, n = 3, 200, 7
    f32 = NATIVE_X_DTYPES[torch.float32]
    for bits in (2, 3, 4, 8):
        if not built & (1 << bits):
            continue
        codes = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8)
        codes[0, :2] = torch.tensor([0, 2**bits - 1], dtype=torch.uint8)
        packed = pack(codes, bits)
        x = torch.randint(-8, 9, (t, k), generator=g).float()
        ok = True
        for group in (k, 32, 64) if bits < 8 else (k,):  # 8 bits: one scale per channel only
            groups = -(-k // group)
            scales = torch.randint(1, 5, (n, groups), generator=g).float()  # small integers: exact sums
            offsets = torch.randint(-3, 4, (n, groups), generator=g).float()
            weight = (codes.double() - 2 ** (bits - 1)) * scales.double().repeat_interleave(group, 1)[:, :k]
            sums = torch.nn.functional.pad(x.double(), (0, groups * group - k)).view(t, groups, group).sum(-1)
            expected = (x.double() @ weight.t() + sums @ offsets.double().t()).float()
            y = torch.empty(t, n)
            scales_t, offsets_t = scales.t().contiguous(), offsets.t().contiguous()
            failed = lib.decode_linear(x.data_ptr(), f32, t, k, k, packed.data_ptr(), bits, packed.shape[1], n,
                                       scales_t.data_ptr(), group, offsets_t.data_ptr(), scales.data_ptr(),
                                       y.data_ptr(), f32, 1)  # fmt: skip
            ok = ok and not failed and torch.equal(y, expected)
        if not ok:
            logger.info("the %d-bit decode kernel did not reproduce exact sums on this CPU; it is not used", bits)
            continue
        exact.add(bits)
    return frozenset(exact)


@dataclass(frozen=True)
class _DecodePlan:
    fits: bool  # a 2-, 3-, 4- or 8-bit layer whose group size the kernel takes, and the kernel is here
    qweight: torch.Tensor  # the layer's packed codes: held, as the kernel reads them by address
    scales: torch.Tensor  # [G, N] float32
    offsets: torch.Tensor | None  # [G, N] float32, (o - z) * s; None when symmetric
    scale_rows: torch.Tensor | None  # [N, G] float32, for groups of 32 and 64; else None
    array: torch.Tensor  # int64: decode_planned's plan (the addresses of the tensors above, widths)
    address: int  # array's


def decode_fits(layer: QuantLinear) -> bool:
    """Whether the decode kernel takes this layer's weights: a width it has here and a group
    size that is a multiple of 128 or covers K, or for 2 and 3 bits also 32 or 64; 8 bits take
    one scale per channel only. (4-bit layers with groups of 32 or 64 stay on torch's int4 op:
    on SmolLM2 it decoded 3-6% faster than the kernel's lane-by-lane scaling; 2 and 3 bits have
    no op.)"""
    group = layer_group(layer)
    if layer.bits == 8:
        return group == layer.in_features and 8 in decode_bits()
    fine = group in _FINE_GROUPS and layer.bits < 4
    return (group == layer.in_features or group % _DECODE_STEP == 0 or fine) and layer.bits in decode_bits()


def _decode_plan(layer: QuantLinear) -> _DecodePlan:
    group = layer_group(layer)
    fits = decode_fits(layer)
    scales, offsets = group_scales(layer) if fits else (layer.scales, None)
    scale_rows = layer.scales.float().contiguous() if fits and group in _FINE_GROUPS else None
    qweight = layer.qweight
    pointers = [0 if tensor is None else tensor.data_ptr() for tensor in (offsets, scale_rows)]
    array = torch.tensor(
        [qweight.data_ptr(), layer.bits, qweight.stride(0), layer.out_features, scales.data_ptr(), group, *pointers,
         layer.in_features],
        dtype=torch.int64,
    )  # fmt: skip
    return _DecodePlan(fits, qweight, scales, offsets, scale_rows, array, array.data_ptr())


def decode_forward(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor | None:
    """``x @ dequantize(W)^T`` for a 2-, 3-, 4- or 8-bit weight-only layer and ``x: [..., K]``,
    as ``[..., N]`` in ``x``'s dtype, no bias, by ``decode_cpu.c``'s kernel; None where it
    does not serve: ``AMX_MIN_ROWS`` rows or more, inputs other than float32 or bfloat16, group
    sizes other than 32, 64, multiples of 128 or one group per channel (8 bits: per channel
    only), or no kernel for the width here (:func:`decode_bits`). Below 8 bits ``x`` is rounded
    to bfloat16 (``vdpbf16ps``); 8-bit layers multiply in float32, so there the sums are the only
    rounding. The layer's packed codes are read as they are; float32 sums per group, each group's
    float32 scale applied to its sums and ``(o - z) * s`` times the row's sum over the group
    (``o = 2^(bits-1)``): for 4 bits the AMX bfloat16 kernel's result up to summation order. The
    call's fixed arguments are prepared once per layer and passed as one array, as at one row
    the Python around the kernel cost as much as the kernel."""
    dtype = NATIVE_X_DTYPES.get(x.dtype)
    k = layer.in_features
    if dtype is None or x.numel() >= AMX_MIN_ROWS * k:
        return None
    plan = cached(layer, "cpu_decode", _decode_plan)
    if not plan.fits:
        return None
    _held, rows, address, stride = row_view(x, k)  # _held: alive through the call
    y = x.new_empty((*x.shape[:-1], layer.out_features))  # 0.4 us less than torch.empty here
    failed = _native_library().decode_planned(plan.address, address, dtype, rows, stride, y.data_ptr(),
                                              torch.get_num_threads())  # fmt: skip
    if failed == 1:
        raise MemoryError("the CPU low-bit decode kernel could not allocate its scratch memory")
    if failed:  # decode_fits let through a layer the C kernel refuses: a bug, not a user error
        raise RuntimeError(
            f"decode_cpu.c's decode_linear refused a {layer.bits}-bit layer with group size {layer_group(layer)} "
            f"(code {failed}); set {FORCE_REFERENCE_ENV}=1 to run the reference kernel meanwhile"
        )
    return y


# -- many rows without AMX: dequantize, then a matmul ---------------------------------------------

# Rows from which a 4- or 8-bit weight-only call that AMX does not take dequantizes its weight
# and multiplies by it (oneDNN or MKL), rather than running torch's int4 or int8 op: on
# SmolLM2's layer shapes (AMD EPYC with AVX-512 BF16, 2 threads, RESULTS.md stop 51) the two
# took about the same time from 24 to 64 rows in bfloat16, and the matmul 1.3x-1.5x less from
# 96 and about 2x less at 512. 2- and 3-bit layers have no such op: their calls of AMX_MIN_ROWS
# rows or more, too many for the decode kernel, took the reference kernel, 3x-12x slower.
DENSE_MIN_ROWS = 64

# The dtype of that matmul: bfloat16 where it is clearly faster than float32 here (AMD EPYC with
# AVX-512 BF16: 2.2-2.7x), float32 elsewhere (an Intel Xeon VM with AVX-512 BF16 and no AMX:
# 0.55-0.65x; without AVX-512 BF16, where the decode kernel is absent too, 2.1-2.3x less time
# than torch's ops at 128-512 rows with this VM held to AVX2; RESULTS.md stop 62), which is
# also exact for a float32 model.
DENSE_DTYPE_ENV = "HFCOMPRESS_DENSE_DTYPE"
_DENSE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def _dense_min_rows(layer: QuantLinear) -> int:
    return DENSE_MIN_ROWS if layer.bits in (4, 8) else AMX_MIN_ROWS


@dataclass(frozen=True)
class _DensePlan:
    qweight: torch.Tensor  # the layer's packed codes, read by address
    scales: torch.Tensor  # [N, G] float32
    zeros: torch.Tensor | None  # [N, G] float32; None when symmetric


def _dense_plan(layer: QuantLinear) -> _DensePlan:
    zeros = None if layer.symmetric else layer.zeros.float().contiguous()
    return _DensePlan(layer.qweight, layer.scales.float().contiguous(), zeros)


def dequantize_dense(layer: QuantLinear, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor | None:
    """The layer's weight ``[N, K]`` in ``dtype`` (bfloat16 or float32), from its packed codes in
    one pass of ``decode_cpu.c``'s ``dequantize_weight``: bit for bit ``layer.dequantize(dtype)``
    ((q - z) * s in float32, for bfloat16 rounded to nearest even), at a fraction of its time.
    None without the C code, or for a layer on another device than the CPU."""
    if dtype not in _DENSE_DTYPES.values():
        raise ValueError(f"dequantize_dense writes bfloat16 or float32, not {dtype}")
    lib = _native_library()
    if lib is None or layer.qweight.device.type != "cpu":
        return None
    plan = cached(layer, "cpu_dense", _dense_plan)
    n, k = layer.out_features, layer.in_features
    w = torch.empty(n, k, dtype=dtype)
    zeros = 0 if plan.zeros is None else plan.zeros.data_ptr()
    failed = lib.dequantize_weight(plan.qweight.data_ptr(), layer.bits, plan.qweight.stride(0), n, k,
                                   plan.scales.data_ptr(), zeros, layer_group(layer), w.data_ptr(),
                                   int(dtype == torch.float32), torch.get_num_threads())  # fmt: skip
    if failed == 1:
        raise MemoryError("decode_cpu.c's dequantize_weight could not allocate its scratch memory")
    if failed:
        raise RuntimeError(f"decode_cpu.c's dequantize_weight refused a {layer.bits}-bit layer (code {failed})")
    return w


@functools.cache
def dense_dtype() -> torch.dtype | None:
    """The dtype in which weight-only calls of many rows without AMX multiply (see
    :func:`dense_forward`): bfloat16 where its matmul is clearly faster than float32's here
    (:func:`hfcompress.matmul_speed.half_matmul_pays`, measured once per process), else
    float32; ``HFCOMPRESS_DENSE_DTYPE=bfloat16`` or ``float32`` sets it instead. None (torch's
    ops serve those calls) without the C code."""
    if _native_library() is None:
        return None
    forced = os.environ.get(DENSE_DTYPE_ENV, "").strip()
    if forced:
        if forced not in _DENSE_DTYPES:
            raise ValueError(f"{DENSE_DTYPE_ENV}={forced!r}: set it to bfloat16 or float32, or unset it")
        return _DENSE_DTYPES[forced]
    dtype = torch.bfloat16 if matmul_speed.half_matmul_pays(torch.bfloat16) else torch.float32
    logger.info("weight-only calls of many rows multiply in %s", str(dtype).removeprefix("torch."))
    return dtype


def dense_available() -> bool:
    """Whether weight-only calls of many rows without AMX dequantize and multiply here
    (:func:`dense_dtype` is not None)."""
    return dense_dtype() is not None


def dense_forward(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor | None:
    """``x @ dequantize(W)^T`` for a weight-only layer and ``x: [..., K]`` of many rows
    (``DENSE_MIN_ROWS`` for 4 and 8 bits, ``AMX_MIN_ROWS`` for 2 and 3), as ``[..., N]`` in
    ``x``'s dtype, no bias: the weight dequantized to :func:`dense_dtype` (:func:`dequantize_dense`,
    a temporary of that dtype the size of the weight) and multiplied by ``x`` in that dtype. In
    bfloat16 the rounding is a bfloat16 model's (inputs, weights and outputs in bfloat16, float32
    sums inside oneDNN); in float32, the reference's up to summation order. None where it does
    not serve: fewer rows, or no :func:`dense_dtype` here."""
    k = layer.in_features
    if x.numel() < _dense_min_rows(layer) * k:
        return None
    dtype = dense_dtype()
    if dtype is None:
        return None
    w = dequantize_dense(layer, dtype)
    if w is None:
        return None
    return torch.nn.functional.linear(x.to(dtype), w).to(x.dtype)
