"""``cpu_int_mm``: layers with 8-bit input activations (``W8A8``, ``W4A8``) on CPU, on int8
matmuls, for per-channel weights (one scale per output row) of 4 or 8 bits.

With ``x_q`` the int8 activation codes and ``s_x`` their scale (per token or per tensor, see
:mod:`hfcompress.quant.activations`), ``q`` the weight codes, ``z`` their zero point and
``o = 2^(bits-1)`` the offset that makes ``q - o`` fit int8::

    y = s_x * s_w * (x_q @ (q - o)^T - (z - o) * sum(x_q))  + b

Three int8 matmuls serve it, chosen per call:

* on CPUs with AMX, for calls of at least ``AMX_MIN_ROWS`` rows with symmetric weights and
  K a multiple of 64, ``w8a8_cpu.c``'s AMX kernel (:func:`amx_available`,
  :func:`amx_int8_forward`): tile matmuls (``tdpbssd``) with the whole epilogue, per-token
  scale included, applied as each 32 x 32 block of the output leaves the tiles. It is bit for
  bit the ``torch._int_mm`` path below. On SmolLM2's 512-row shapes a layer took 0.68-0.85x
  the time it took with oneDNN's op plus its rescale pass, the activations' quantization
  included in both (``bench_act.py --sections layers``, 2-core Sapphire Rapids VM). The same kernel
  serves grouped 4-bit weights with int8 inputs (W4A8 g128) for ``cpu_int4_a8``, each
  group's int32 sums scaled in float32; and, with bfloat16 activations, weight-only prefill
  for ``cpu_int4`` and ``cpu_int8`` (:func:`amx_bf16_linear`).
* oneDNN's ``qlinear_pointwise`` (the op inductor's x86 int8 path uses; AMX or VNNI where the
  CPU has them) for calls of at least ``ONEDNN_MIN_ROWS`` rows with symmetric weights: the
  weight is prepacked once, the per-channel scales, a per-tensor activation scale, the bias
  and the output dtype are applied inside the op. A per-token scale cannot be given to the
  op, so it gets ``s_x = 1`` and the rows are scaled afterwards (bias added then). On the
  2-core dev VM (Sapphire Rapids class, AMX) it ran SmolLM2's four 512-row matmul shapes in
  0.52-0.64x the time of a bfloat16 matmul, where ``torch._int_mm`` took 0.55-1.6x (two
  runs of the same micro-benchmark).
* for fewer than ``ONEDNN_MIN_ROWS`` rows (decoding), one call of a C kernel
  (``w8a8_cpu.c``, compiled on first use by :mod:`hfcompress.quant.native`) that quantizes
  the rows, takes the int8 dot products (AVX-512 VNNI, else AVX2 multiply-adds) and applies
  the epilogue in one pass. Through torch the same work is about a dozen small operator calls
  per layer, which at one row cost more than the matmul; the kernel's float operations are
  torch's, in the same order, so its float32 result is bit-identical. Its fixed arguments
  are prepared once per layer and passed as one array (``w8a8_planned``), and with AVX-512 it
  quantizes the row sixteen lanes at a time: a one-row call on SmolLM2's four layer shapes
  took 11.6-19.7 us, against 21.6-34.3 us before (AMD EPYC VM, alternating runs). On AVX-512 CPUs the same
  library also quantizes the rows of larger calls, in one vectorized pass per row with rows in
  parallel, bit for bit torch's operations (on a 2-core Sapphire Rapids VM, 2-4x faster than
  torch's five operator calls for 512 rows).
* ``torch._int_mm`` (int8 x int8 -> int32) otherwise: decoding without a C compiler or with
  float16 inputs, asymmetric weights (the ``(z - o) * sum(x_q)`` term is applied after it),
  CPUs or builds without oneDNN, CPUs where oneDNN's op is not exact (:func:`onednn_works`
  probes it once: without VNNI its 16-bit pair sums saturate) and CPUs where it is slower than
  ``torch._int_mm`` (:func:`onednn_available` times both once: on a 2-core AMD EPYC VM the
  oneDNN op took over 1000x longer).

The int32 accumulation is exact, so the result equals the reference kernel's
``fq(x) @ dequantize(W)^T`` up to float rounding of the epilogue (bfloat16 output rounding
for bfloat16 inputs on the oneDNN path). Grouped weights (one scale per group of columns)
are left to the reference kernel: their scales cannot be applied after one integer matmul.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hfcompress.matmul_speed import best_seconds
from hfcompress.quant import compiled, native
from hfcompress.quant.activations import activation_scales, nonfinite_rows_nan, quantize_activations
from hfcompress.quant.dispatch import Kernel, cached, register_kernel

if TYPE_CHECKING:
    from hfcompress.quant.linear import QuantLinear

__all__ = [
    "AMX_BF16_MIN_ROWS",
    "AMX_MIN_ROWS",
    "NATIVE_X_DTYPES",
    "NO_AMX_ENV",
    "ONEDNN_MIN_ROWS",
    "amx_available",
    "amx_bf16_linear",
    "amx_bf16_serves",
    "amx_int8_forward",
    "amx_int8_serves",
    "fake_quantized_input",
    "group_scales",
    "layer_group",
    "onednn_available",
    "onednn_works",
    "row_view",
    "vnni_available",
    "vnni_int8_forward",
    "vnni_int8_serves",
]

logger = logging.getLogger(__name__)

ONEDNN_MIN_ROWS = 16
# From this many rows the AMX int8 kernel serves a call with int8 inputs.
AMX_MIN_ROWS = 16
# From this many rows the AMX bfloat16 kernel serves a weight-only call: from 3 rows it beat the
# decode kernel (2-, 3- and 4-bit codes) and torch's int8 op on SmolLM2's shapes, up to 5x at 15
# rows (batched or speculative decoding), as its time hardly grows below 16 rows; at 1 row they
# take 0.55-0.9x its time, at 2 about the same (2-core Sapphire Rapids VM).
AMX_BF16_MIN_ROWS = 3
NO_AMX_ENV = "HFCOMPRESS_NO_AMX"
# oneDNN is used where it is at most this many times slower than torch._int_mm in the
# one-off timing of `onednn_available` (a margin for timing noise; the slow case is 1000x).
ONEDNN_MAX_SLOWDOWN = 4.0
_NATIVE_SOURCE = Path(__file__).with_name("w8a8_cpu.c")
# The input dtypes w8a8_cpu.c's kernels read, and their codes there.
NATIVE_X_DTYPES = {torch.bfloat16: 1, torch.float32: 2}


@dataclass(frozen=True)
class _IntMMPack:
    weight: torch.Tensor  # [K, N] int8, q - o (column-major view of [N, K])
    scales: torch.Tensor  # [N] float32
    correction: torch.Tensor | None  # [N] float32, z - o; None when symmetric
    weight_sum: torch.Tensor  # [N] int32, the sum of each output row's codes (the C kernel's VNNI dot)


@dataclass(frozen=True)
class _AMXPack:
    weight: torch.Tensor  # codes - 2^(bits-1) in the AMX tile layout (w8a8_cpu.c): int8, or two 4-bit codes a byte
    nibbles: bool  # 4-bit codes, two a byte
    scales: torch.Tensor  # [G, N] float32
    group: int  # inputs per scale (K when per channel)
    offsets: torch.Tensor | None  # [G, N] float32, (2^(bits-1) - z) * s; None when symmetric


@dataclass(frozen=True)
class _OneDNNPack:
    weight: torch.Tensor  # opaque prepacked int8 weight
    scales: torch.Tensor  # [N] float32
    zeros: torch.Tensor  # [N] int64 zeros (symmetric weights)


@functools.cache
def onednn_works() -> bool:
    """True when this torch build runs oneDNN's int8 linear on this CPU exactly (tried once).

    The probe takes full-range int8 values, extremes included, and asks for the exact int32
    sums. On CPUs without VNNI (AVX2 only) oneDNN adds pairs of 8-bit products in 16 bits with
    saturation (``vpmaddubsw``), so large activations times large weights come out wrong; on a
    2-core AVX2 EPYC VM a tenth of a test layer's outputs were off by up to 20. There W8A8
    layers use ``torch._int_mm``."""
    op = getattr(torch.ops.onednn, "qlinear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return False
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-127, 128, (32, 64), generator=g, dtype=torch.int8)
    x = torch.randint(-128, 128, (16, 64), generator=g, dtype=torch.int8)
    w[0], x[0] = 127, 127  # the largest sums of pairs: saturate 16-bit accumulation
    x[1] = -128
    expected = x.double() @ w.double().t()  # |sums| < 2**24: exact in float32 too
    try:
        packed = torch.ops.onednn.qlinear_prepack(w, None)
        y = op(x, 1.0, 0, packed, torch.ones(32), torch.zeros(32, dtype=torch.long), None, 1.0, 0,
               torch.float32, "none", [], "")  # fmt: skip
    except (RuntimeError, NotImplementedError) as exc:
        logger.info("oneDNN int8 linear unavailable (%s); W8A8 layers use torch._int_mm", exc)
        return False
    if not torch.equal(y.double(), expected):
        logger.info(
            "oneDNN int8 linear is not exact on this CPU (largest error %.3g; no VNNI?); W8A8 layers use torch._int_mm",
            (y.double() - expected).abs().max().item(),
        )
        return False
    return True


@functools.cache
def onednn_available() -> bool:
    """True when oneDNN's int8 linear works here and is not far slower than ``torch._int_mm``
    (at most ``ONEDNN_MAX_SLOWDOWN`` times its time, measured once per process on a
    64 x 512 x 256 matmul: microseconds where oneDNN has a fast kernel, about 0.4 s where it
    has not). On a 2-core AMD EPYC VM (AVX-512 VNNI, no AMX) with torch 2.13, oneDNN ran a
    512 x 1536 x 576 matmul in 6.5 s against 3 ms for ``torch._int_mm``; on the Sapphire
    Rapids VM the two were within 3x of each other, oneDNN usually ahead."""
    if not onednn_works():
        return False
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-127, 128, (256, 512), generator=g, dtype=torch.int8)
    x = torch.randint(-127, 128, (64, 512), generator=g, dtype=torch.int8)
    packed = torch.ops.onednn.qlinear_prepack(w, None)
    scales, zeros = torch.ones(256), torch.zeros(256, dtype=torch.long)

    def run_onednn() -> None:
        torch.ops.onednn.qlinear_pointwise(x, 1.0, 0, packed, scales, zeros, None, 1.0, 0, torch.float32,
                                           "none", [], "")  # fmt: skip

    w_t = w.t()
    onednn_s = best_seconds(run_onednn)
    int_mm_s = best_seconds(lambda: torch._int_mm(x, w_t))
    if onednn_s > ONEDNN_MAX_SLOWDOWN * int_mm_s:
        logger.info(
            "oneDNN int8 linear is far slower than torch._int_mm on this CPU (%.2g s against %.2g s); W8A8 layers use "
            "torch._int_mm",
            onednn_s,
            int_mm_s,
        )
        return False
    return True


@functools.cache
def amx_available() -> bool:
    """True when ``w8a8_cpu.c`` was built with its AMX kernels (a compiler and CPU with AMX-INT8
    and AMX-BF16), Linux gave this process the tile state, and both kernels are exact on a
    probe that covers a row tail, padded channels and the extreme codes (checked once per
    process): the int8 one reproduces ``torch._int_mm``'s path bit for bit, the bfloat16 one
    (weight-only prefill, see :mod:`hfcompress.quant.cpu_kernels`) gives the exact sums of
    small integers. ``HFCOMPRESS_NO_AMX=1`` switches them off (torch's ops and oneDNN serve, as
    on CPUs without AMX)."""
    if os.environ.get(NO_AMX_ENV, "") not in ("", "0"):
        logger.info("%s is set: the AMX kernels are not used", NO_AMX_ENV)
        return False
    lib = _native_library()
    if lib is None or not lib.w8a8_amx_init():
        return False
    g = torch.Generator().manual_seed(0)
    t, k, n = 37, 128, 48
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    x = torch.randint(-128, 128, (t, k), generator=g, dtype=torch.int8)
    w[0], x[0], x[1] = 127, 127, -128
    sx, sw = torch.rand(t, 1, generator=g), torch.rand(n, generator=g)
    y = torch.empty(t, n)
    f32 = NATIVE_X_DTYPES[torch.float32]
    packed = _amx_pack(w, _INT8_STEP)  # held by a name: the kernel reads it after data_ptr() returns
    failed = lib.w8a8_amx_linear(x.data_ptr(), sx.data_ptr(), 1, t, k, packed.data_ptr(), 0, sw.data_ptr(), k, None,
                                 None, n, y.data_ptr(), f32, torch.get_num_threads())  # fmt: skip
    expected = torch._int_mm(x, w.t().contiguous()).float().mul_(sx).mul_(sw)
    if failed or not torch.equal(y, expected):
        logger.info("the AMX int8 kernel did not reproduce torch._int_mm on this CPU; the AMX kernels are not used")
        return False
    # The bfloat16 kernel on small integers, whose float32 sums are exact in any order: 8-bit
    # codes on two row tiles and a tail, 4-bit codes (two a byte) on the one-tile path of up to
    # 16 rows.
    xb = torch.randint(-8, 9, (t, k), generator=g).to(torch.bfloat16)
    w4 = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    w4[0, :2] = torch.tensor([-8, 7], dtype=torch.int8)
    for codes, rows, nibbles in ((w, t, False), (w4, 5, True)):
        packed = _amx_pack(codes, _BF16_STEP, nibbles)
        failed = lib.w8a8_amx_bf16_linear(xb.data_ptr(), rows, k, packed.data_ptr(), int(nibbles), sw.data_ptr(), k,
                                          None, None, n, y.data_ptr(), f32, torch.get_num_threads())  # fmt: skip
        expected = (xb[:rows].double() @ codes.double().t()).float().mul_(sw)
        if failed or not torch.equal(y[:rows], expected):
            logger.info(
                "the AMX bfloat16 kernel did not reproduce exact sums on this CPU; the AMX kernels are not used"
            )
            return False
    return True


# Inputs per k step of the two AMX kernels: the int8 one (tdpbssd), the bfloat16 one (tdpbf16ps).
_INT8_STEP, _BF16_STEP = 64, 32


def _amx_pack(codes: torch.Tensor, step: int, nibbles: bool = False) -> torch.Tensor:
    """``codes: [N, K]`` int8 in the AMX tile layout for k steps of ``step`` inputs
    (``w8a8_amx_pack``; ``nibbles``: 4-bit codes two to a byte), channels zero-padded to a
    multiple of 32."""
    n, k = codes.shape
    size = (n + 31) // 32 * 32 * k
    packed = torch.empty(size // 2 if nibbles else size, dtype=torch.int8)
    codes = codes.contiguous()  # a name holds it while C reads it
    _native_library().w8a8_amx_pack(codes.data_ptr(), n, k, step, int(nibbles), packed.data_ptr())
    return packed


def layer_group(layer: QuantLinear) -> int:
    """The layer's group size, ``in_features`` for one scale per channel."""
    return layer.in_features if layer.scales.shape[1] == 1 else layer.group_size


def group_scales(layer: QuantLinear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer's scales ``[G, N]`` float32 and offsets ``[G, N]`` float32, ``(o - z) * s``
    with ``o = 2^(bits-1)`` (None when symmetric): what the C kernels take."""
    offsets = None
    if not layer.symmetric:
        offsets = ((2 ** (layer.bits - 1) - layer.zero_points().float()) * layer.scales.float()).t().contiguous()
    return layer.scales.float().t().contiguous(), offsets


def _build_amx_pack(layer: QuantLinear, step: int) -> _AMXPack:
    nibbles = layer.bits <= 4  # two codes a byte: for 4 bits as small as the layer's own codes
    weight = _amx_pack(layer.signed_codes(), step, nibbles)
    scales, offsets = group_scales(layer)
    return _AMXPack(weight, nibbles, scales, layer_group(layer), offsets)


def _amx_fits(
    layer: QuantLinear, rows: int, step: int, widths: tuple[int, ...] = (4, 8), min_rows: int = AMX_MIN_ROWS
) -> bool:
    return (
        rows >= min_rows
        and layer.bits in widths
        and layer.in_features % step == 0
        and layer_group(layer) % step == 0
        and amx_available()
    )


def amx_bf16_serves(layer: QuantLinear, rows: int) -> bool:
    """Whether :func:`amx_bf16_linear` takes ``rows`` rows of this weight-only layer: AMX here,
    at least ``AMX_BF16_MIN_ROWS`` rows (fewer go to the decoding kernels), 2-, 3-, 4- or 8-bit
    codes (the narrower ones packed two to a byte), K and the group size multiples of 32."""
    return _amx_fits(layer, rows, _BF16_STEP, (2, 3, 4, 8), AMX_BF16_MIN_ROWS)


def amx_bf16_linear(layer: QuantLinear, x2: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``x2 @ dequantize(W)^T`` for a weight-only layer that :func:`amx_bf16_serves` and ``x2:
    [T, K]`` bfloat16, contiguous, by ``w8a8_cpu.c``'s AMX bfloat16 kernel: float32 sums of the
    exact codes, each group's float32 scale applied to its sums and, for asymmetric weights,
    ``(o - z) * s`` times the row's float32 sum over the group (``(q - z) * s = (q - o) * s +
    (o - z) * s``, ``o = 2^(bits-1)``). In ``out_dtype`` where that is float32 or bfloat16,
    else float32. No bias."""
    pack = cached(layer, "cpu_amx_bf16", functools.partial(_build_amx_pack, step=_BF16_STEP))
    t, k = x2.shape
    y = torch.empty(t, layer.out_features, dtype=out_dtype if out_dtype in NATIVE_X_DTYPES else torch.float32)
    failed = _native_library().w8a8_amx_bf16_linear(
        x2.data_ptr(), t, k, pack.weight.data_ptr(), int(pack.nibbles), pack.scales.data_ptr(), pack.group,
        None if pack.offsets is None else pack.offsets.data_ptr(), None, layer.out_features, y.data_ptr(),
        NATIVE_X_DTYPES[y.dtype], torch.get_num_threads(),
    )  # fmt: skip
    if failed:
        raise MemoryError("the CPU AMX bfloat16 kernel could not allocate its scratch memory")
    return y


def amx_int8_serves(layer: QuantLinear, x: torch.Tensor) -> bool:
    """Whether :func:`amx_int8_forward` takes ``x`` for this layer with 8-bit input activations
    (per token or per tensor): AMX here, at least ``AMX_MIN_ROWS`` rows, float32 or bfloat16
    inputs, 4- or 8-bit codes, K and the group size multiples of 64."""
    act = layer.scheme.input_activations
    return (
        act is not None
        and act.num_bits == 8
        and act.strategy in ("token", "tensor")
        and x.dtype in NATIVE_X_DTYPES
        and _amx_fits(layer, x.numel() // layer.in_features, _INT8_STEP)
    )


def _int8_operands(
    layer: QuantLinear, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """What the int8 kernels (AMX, VNNI) take for ``x: [..., K]``: the rows' int8 codes ``[T, K]``
    and float32 scales (:func:`_quantized_input`), contiguous; the bias rounded to ``x``'s dtype,
    as float32 (None without one); and the output ``[T, N]`` in ``x``'s dtype, to be written."""
    xq, sx = _quantized_input(layer, x)
    bias = None if layer.bias is None else layer.bias.to(x.dtype).float().contiguous()
    y = torch.empty(xq.shape[0], layer.out_features, dtype=x.dtype)
    return xq.contiguous(), sx.float().contiguous(), bias, y


def amx_int8_forward(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """The layer on ``x`` (8-bit input activations) by ``w8a8_cpu.c``'s AMX int8 kernel: the
    activations quantized (:func:`_quantized_input`), exact int32 sums per group, each group's
    float32 scale applied to its sums and, for asymmetric weights, ``(o - z) * s`` times the
    row's sum of codes over the group, then the row's scale. For symmetric per-channel weights
    it is bit for bit the ``torch._int_mm`` path's result (one epilogue, torch's order)."""
    xq, sx, bias, y = _int8_operands(layer, x)
    pack = cached(layer, "cpu_amx", functools.partial(_build_amx_pack, step=_INT8_STEP))
    t, n = y.shape
    failed = _native_library().w8a8_amx_linear(
        xq.data_ptr(), sx.data_ptr(), int(sx.numel() != 1), t, layer.in_features, pack.weight.data_ptr(),
        int(pack.nibbles), pack.scales.data_ptr(), pack.group,
        None if pack.offsets is None else pack.offsets.data_ptr(), None if bias is None else bias.data_ptr(), n,
        y.data_ptr(), NATIVE_X_DTYPES[x.dtype], torch.get_num_threads(),
    )  # fmt: skip
    if failed:
        raise MemoryError("the CPU AMX int8 kernel could not allocate its scratch memory")
    return y.reshape(*x.shape[:-1], n)


@dataclass(frozen=True)
class _VNNIPack:
    weight: torch.Tensor  # the 4-bit codes in w8a8_vnni_linear's layout, two a byte
    scales: torch.Tensor  # [G, N] float32
    offsets: torch.Tensor | None  # [G, N] float32, (8 - z) * s; None when symmetric


def _vnni_pack(codes: torch.Tensor) -> torch.Tensor:
    """``codes: [N, K]`` (0 .. 15, K a multiple of 8) in ``w8a8_vnni_linear``'s layout: for each
    block of 16 channels (zero-padded to a multiple of 32) and run of 8 inputs, 64 bytes, channel
    n's byte j holding input j in its low nibble and input 4 + j in its high one."""
    n, k = codes.shape
    padded = torch.nn.functional.pad(codes.to(torch.uint8), (0, 0, 0, (-n) % 32))
    runs = padded.view(-1, 16, k // 8, 2, 4).permute(0, 2, 1, 4, 3)  # [blocks, runs, channel, j, half]
    return (runs[..., 0] | (runs[..., 1] << 4)).contiguous().view(-1)


def _build_vnni_pack(layer: QuantLinear) -> _VNNIPack:
    scales, offsets = group_scales(layer)
    return _VNNIPack(_vnni_pack(layer.codes()), scales, offsets)


@functools.cache
def vnni_available() -> bool:
    """True when ``w8a8_cpu.c`` was built with ``w8a8_vnni_linear`` (AVX-512 VNNI) and it gives
    the exact result on a probe of small integers (checked once per process): a row tail, padded
    channels, a last group shorter than the others, the extreme codes, offsets and bias."""
    lib = _native_library()
    if lib is None or not lib.w8a8_vnni_built():
        return False
    g = torch.Generator().manual_seed(0)
    t, k, n, group = 7, 200, 40, 64
    groups = -(-k // group)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    x = torch.randint(-128, 128, (t, k), generator=g, dtype=torch.int8)
    codes[0], x[0], x[1] = 15, 127, -128
    scales = torch.randint(1, 5, (groups, n), generator=g).float()  # small integers: every float step exact
    offsets = torch.randint(-3, 4, (groups, n), generator=g).float()
    sx, bias = torch.randint(1, 3, (t, 1), generator=g).float(), torch.randint(-4, 5, (n,), generator=g).float()
    packed = _vnni_pack(codes)
    y = torch.empty(t, n)
    failed = lib.w8a8_vnni_linear(x.data_ptr(), sx.data_ptr(), 1, t, k, packed.data_ptr(), scales.data_ptr(), group,
                                  offsets.data_ptr(), bias.data_ptr(), n, y.data_ptr(), NATIVE_X_DTYPES[torch.float32],
                                  torch.get_num_threads())  # fmt: skip
    pad = groups * group - k
    xg = torch.nn.functional.pad(x.double(), (0, pad)).view(t, groups, group)
    wg = torch.nn.functional.pad(codes.double() - 8, (0, pad)).view(n, groups, group)
    sums = torch.einsum("tgk,ngk->tgn", xg, wg)  # [T, G, N]
    expected = ((sums * scales.double() + xg.sum(-1, keepdim=True) * offsets.double()).sum(1) * sx + bias).float()
    if failed or not torch.equal(y, expected):
        logger.info("the VNNI int8 kernel did not reproduce exact sums on this CPU; grouped W4A8 stays in float")
        return False
    return True


def vnni_int8_serves(layer: QuantLinear, x: torch.Tensor) -> bool:
    """Whether :func:`vnni_int8_forward` takes ``x`` for this layer: 4-bit codes with several
    groups a row (one scale per channel goes to ``torch._int_mm``), 8-bit input activations per
    token or per tensor, float32 or bfloat16 inputs, K and the group size multiples of 8, and the
    kernel here (:func:`vnni_available`), on a CPU without AMX. Any number of rows: on SmolLM2's
    shapes it took 0.2-0.5x the time of the float path it replaces from 1 row to 64 and 0.4-0.5x
    at 512 (2-core Xeon, AVX-512 VNNI, no AMX; benchmarks/RESULTS.md, stop 63). On AMX CPUs the
    calls the AMX int8 kernel does not take (fewer than ``AMX_MIN_ROWS`` rows) keep the float path
    and its AMX bfloat16 kernel from 3 rows, as measured there; the VNNI kernel has not been timed
    on one."""
    act = layer.scheme.input_activations
    k = layer.in_features
    return (
        act is not None
        and act.num_bits == 8
        and act.strategy in ("token", "tensor")
        and layer.bits == 4
        and layer.scales.shape[1] > 1
        and k % 8 == 0
        and layer.group_size % 8 == 0
        and x.dtype in NATIVE_X_DTYPES
        and vnni_available()
        and not amx_available()
    )


@dataclass(frozen=True)
class _VNNIPlan:
    pack: _VNNIPack  # held: the kernel reads its tensors by address
    static: torch.Tensor | None  # the layer's input_scale buffer (static per-tensor), read by address
    array: torch.Tensor  # int64: w8a8_vnni_planned's plan
    address: int  # array's


def _vnni_plan(layer: QuantLinear) -> _VNNIPlan:
    pack = cached(layer, "cpu_vnni", _build_vnni_pack)
    static = None if layer.scheme.input_activations.dynamic else layer._buffers["input_scale"]
    array = torch.tensor(
        [pack.weight.data_ptr(), pack.scales.data_ptr(), layer.group_size,
         0 if pack.offsets is None else pack.offsets.data_ptr(), int(static is None),
         0 if static is None else static.data_ptr(), layer.in_features, layer.out_features],
        dtype=torch.int64,
    )  # fmt: skip
    return _VNNIPlan(pack, static, array, array.data_ptr())


def _check_vnni_call(failed: int, entry: str, layer: QuantLinear) -> None:
    """Raise for a VNNI kernel call's nonzero return: 1, out of memory; otherwise a layer that
    :func:`vnni_int8_serves` let through and the C kernel refuses (a bug, not a user error)."""
    if failed == 1:
        raise MemoryError("the CPU VNNI int8 kernel could not allocate its scratch memory")
    if failed:
        raise RuntimeError(f"{entry} refused a layer with K={layer.in_features}, group {layer.group_size}")


def _vnni_one_call(layer: QuantLinear, x: torch.Tensor, lib: ctypes.CDLL) -> torch.Tensor:
    """:func:`vnni_int8_forward` for a few rows, in one C call (``w8a8_vnni_planned``: the rows
    quantized there, as ``w8a8_quantize_rows`` does, then the kernel), the call's fixed arguments
    prepared once per layer."""
    plan = cached(layer, "cpu_vnni_plan", _vnni_plan)  # rebuilt for a new input_scale tensor
    _held, rows, address, stride = row_view(x, layer.in_features)  # _held: alive through the call
    bias = layer._parameters["bias"]
    if bias is not None and not (x.dtype == bias.dtype == torch.float32 and bias.is_contiguous()):
        bias = bias.to(x.dtype).float().contiguous()  # added as torch adds it, after the rounding
    out = x.new_empty((*x.shape[:-1], layer.out_features))
    dtype = NATIVE_X_DTYPES[x.dtype]
    bias_address = None if bias is None else bias.data_ptr()
    failed = lib.w8a8_vnni_planned(plan.address, address, dtype, rows, stride, bias_address, out.data_ptr(), dtype,
                                   torch.get_num_threads())  # fmt: skip
    _check_vnni_call(failed, "w8a8_vnni_planned", layer)
    return out


def vnni_int8_forward(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """The layer on ``x`` (8-bit input activations, grouped 4-bit weights) by ``w8a8_cpu.c``'s
    VNNI kernel, for CPUs without AMX: :func:`amx_int8_forward`'s computation, operation for
    operation (exact int32 sums per group, then its float32 epilogue), so the two agree bit for
    bit. Calls of fewer than
    ``ONEDNN_MIN_ROWS`` rows (decoding) with per-token or static per-tensor scales are one C call;
    more rows quantize once for the layers reading the same tensor (q, k and v; gate and up)."""
    if x.numel() < ONEDNN_MIN_ROWS * layer.in_features and _scale_per_row(layer.scheme.input_activations):
        return _vnni_one_call(layer, x, _native_library())
    xq, sx, bias, y = _int8_operands(layer, x)
    pack = cached(layer, "cpu_vnni", _build_vnni_pack)
    t, n = y.shape
    failed = _native_library().w8a8_vnni_linear(
        xq.data_ptr(), sx.data_ptr(), int(sx.numel() != 1), t, layer.in_features, pack.weight.data_ptr(),
        pack.scales.data_ptr(), layer.group_size, None if pack.offsets is None else pack.offsets.data_ptr(),
        None if bias is None else bias.data_ptr(), n, y.data_ptr(), NATIVE_X_DTYPES[x.dtype], torch.get_num_threads(),
    )  # fmt: skip
    _check_vnni_call(failed, "w8a8_vnni_linear", layer)
    return y.reshape(*x.shape[:-1], n)


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
    correction = None if layer.symmetric else layer.zero_points().float()[:, 0] - 2 ** (layer.bits - 1)
    scales = layer.scales.float()[:, 0].contiguous()
    codes = layer.signed_codes().contiguous()
    return _IntMMPack(codes.t(), scales, correction, codes.sum(dim=1, dtype=torch.int32))


def _build_onednn(layer: QuantLinear) -> _OneDNNPack:
    packed = torch.ops.onednn.qlinear_prepack(layer.signed_codes().contiguous(), None)
    return _OneDNNPack(
        packed, layer.scales.float()[:, 0].contiguous(), torch.zeros(layer.out_features, dtype=torch.long)
    )


def _onednn(layer: QuantLinear, xq: torch.Tensor, sx: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    pack = cached(layer, "cpu_onednn", _build_onednn)
    per_tensor = sx.numel() == 1
    bias = layer.bias.float() if layer.bias is not None and per_tensor else None
    y = torch.ops.onednn.qlinear_pointwise(
        xq, float(sx) if per_tensor else 1.0, 0, pack.weight, pack.scales, pack.zeros, bias, 1.0, 0, out_dtype,
        "none", [], "",
    )  # fmt: skip
    if not per_tensor:
        # In the output dtype: for bfloat16 the scale's rounding (2^-9) matches the output's.
        y.mul_(sx.to(out_dtype))
        if layer.bias is not None:
            y.add_(layer.bias.to(out_dtype))
    return y


class _Slot:
    """One remembered result and the key of the input it was made from (:func:`_remembered`)."""

    __slots__ = ("key", "value")

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.value = None


class _LastInput(threading.local):
    """The last quantized input: q, k and v (gate and up) are called with the very same
    tensor, so it is quantized once for all of them (SmolLM2: 4 quantizations per block
    instead of 7). Holds the last input's codes and its fake quantization alive until the next
    call."""

    def __init__(self) -> None:
        self.codes = _Slot()  # _quantized_input's (x_q, s_x)
        self.fq = _Slot()  # fake_quantized_input's fq(x)


_LAST = _LastInput()


def _remembered(slot: _Slot, layer: QuantLinear, x: torch.Tensor, compute):
    """``compute(layer, x, act, static)``, or ``slot``'s value when ``x`` is the input it was
    made from (:func:`_input_key`); the result is remembered in ``slot``."""
    act = layer.scheme.input_activations
    static = layer._buffers.get("input_scale")
    key = _input_key(x, act, static)
    if _same_input(slot.key, key):
        return slot.value
    value = compute(layer, x, act, static)
    slot.key, slot.value = (key, value) if key is not None else (None, None)
    return value


def _input_key(x: torch.Tensor, act, static: torch.Tensor | None) -> tuple | None:
    """What makes a layer's quantized input reusable by the next layer: the very tensor ``x``
    (unchanged since: its version), the input scheme and a static scale's value; None when it
    cannot be reused."""
    # An inference-mode tensor has no version counter (asking raises, at about 10 us a call:
    # under torch.inference_mode() that was every layer's call), and compiled code may rewrite a
    # buffer it handed to the op without bumping its version: neither is reused.
    if x.is_inference() or compiled.in_op():
        return None
    return (x, x._version, act, None if static is None else tuple(static.tolist()))


def _same_input(last: tuple | None, key: tuple | None) -> bool:
    return key is not None and last is not None and last[0] is key[0] and last[1:] == key[1:]


def _scale_per_row(act) -> bool:
    """Whether each row of an input is quantized on a scale of its own making or a fixed one,
    as ``w8a8_cpu.c`` quantizes rows: per token (dynamic), or one static per-tensor scale. A
    dynamic per-tensor scale spans all rows of a call, and per-channel scales are not per row."""
    return (act.strategy == "token" and act.dynamic) or (act.strategy == "tensor" and not act.dynamic)


def _native_rows(x2: torch.Tensor, act, static: torch.Tensor | None) -> tuple[ctypes.CDLL, int, float] | None:
    """``(library, dynamic, static scale)`` for ``w8a8_cpu.c``'s row quantization of ``x2: [T,
    K]`` (rows in parallel, AVX-512), or None where it does not apply (no compiler, no AVX-512,
    where torch's ops are faster; float16; a dynamic per-tensor or per-channel scale)."""
    per_token = act.strategy == "token" and act.dynamic
    if not _scale_per_row(act) or (not per_token and (static is None or static.numel() != 1)):
        return None
    if x2.dtype not in NATIVE_X_DTYPES or x2.stride(-1) != 1:
        return None
    lib = _vectorized_library()
    if lib is None:
        return None
    return lib, int(per_token), 0.0 if per_token else float(static)


def _vectorized_library() -> ctypes.CDLL | None:
    """``w8a8_cpu.c`` where its row quantization is vectorized (AVX-512), else None."""
    lib = _native_library()
    return lib if lib is not None and _is_vectorized(lib) else None


@functools.cache
def _is_vectorized(lib: ctypes.CDLL) -> bool:
    return bool(lib.w8a8_quantize_is_vectorized())  # asked once: decoding asks for every layer


def _native_quantize(x2: torch.Tensor, act, static: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``w8a8_cpu.c``'s row quantization of ``x2: [T, K]``, bit for bit the torch path's result;
    None where it does not apply (:func:`_native_rows`)."""
    native_rows = _native_rows(x2, act, static)
    if native_rows is None:
        return None
    lib, dynamic, static_scale = native_rows
    t, k = x2.shape
    q = torch.empty(t, k, dtype=torch.int8)
    scales = torch.empty(t, 1)
    failed = lib.w8a8_quantize_rows(
        x2.data_ptr(), NATIVE_X_DTYPES[x2.dtype], t, k, x2.stride(0), dynamic, static_scale, q.data_ptr(),
        scales.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if failed:  # only a build without AVX-512 refuses, and it was asked above
        raise RuntimeError(f"w8a8_quantize_rows returned {failed}")
    # A static scale stays one number, unless a row held a NaN or an infinity: its scale is NaN.
    return q, (scales if dynamic or scales.isnan().any() else static.float())


def _quantized_input(layer: QuantLinear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_q: [T, K] int8, s_x: [T, 1] or [1] float32)`` for ``x: [..., K]``."""
    return _remembered(_LAST.codes, layer, x, _quantize_input)


def _quantize_input(layer: QuantLinear, x: torch.Tensor, act, static: torch.Tensor | None):
    x2 = x.reshape(-1, layer.in_features)
    value = _native_quantize(x2, act, static) if act.num_bits == 8 else None
    if value is None:
        sx = activation_scales(x2, act, static)  # [T, 1] or [1]
        value = (quantize_activations(x2, sx, act.num_bits), nonfinite_rows_nan(x2, sx, act))
    return value


def fake_quantized_input(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """``fq(x)`` (:func:`hfcompress.quant.dispatch.fake_quantize_inputs`) bit for bit: in one C
    pass where it applies (``w8a8_fake_quantize_rows``: the codes of :func:`_native_quantize`
    times their scales, in ``x``'s dtype), else from the codes :func:`_quantized_input` makes;
    once for the layers that read the same tensor (q, k and v; gate and up)."""
    return _remembered(_LAST.fq, layer, x, _fake_quantize_input)


def _fake_quantize_input(layer: QuantLinear, x: torch.Tensor, act, static: torch.Tensor | None) -> torch.Tensor:
    x2 = x.reshape(-1, layer.in_features)
    native_rows = _native_rows(x2, act, static) if act.num_bits == 8 else None
    if native_rows is None:
        xq, sx = _quantized_input(layer, x)
        return (xq.float() * sx).to(x.dtype).reshape(x.shape)
    lib, dynamic, static_scale = native_rows
    fq = torch.empty(x2.shape, dtype=x.dtype)
    failed = lib.w8a8_fake_quantize_rows(
        x2.data_ptr(), NATIVE_X_DTYPES[x2.dtype], x2.shape[0], x2.shape[1], x2.stride(0), dynamic, static_scale,
        fq.data_ptr(), NATIVE_X_DTYPES[x.dtype], torch.get_num_threads(),
    )  # fmt: skip
    if failed == 1:
        raise MemoryError("w8a8_fake_quantize_rows could not allocate its scratch memory")
    if failed:  # only a build without AVX-512 refuses, and it was asked above
        raise RuntimeError(f"w8a8_fake_quantize_rows returned {failed}")
    return fq.reshape(x.shape)


@functools.cache
def _native_library() -> ctypes.CDLL | None:
    lib = native.load(_NATIVE_SOURCE, "the CPU W8A8 decode kernel (decoding uses torch._int_mm)")
    if lib is not None:
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.w8a8_linear.argtypes = [ptr, ctypes.c_int, i64, i64, i64, ptr, ptr, i64, ptr, ptr, ptr, ctypes.c_int,
                                    ctypes.c_float, ptr, ctypes.c_int, ctypes.c_int]  # fmt: skip
        lib.w8a8_linear.restype = ctypes.c_int
        lib.w8a8_planned.argtypes = [ptr, ptr, ctypes.c_int, i64, i64, ptr, ptr, ctypes.c_int, ctypes.c_int]
        lib.w8a8_planned.restype = ctypes.c_int
        lib.w8a8_quantize_rows.argtypes = [ptr, ctypes.c_int, i64, i64, i64, ctypes.c_int, ctypes.c_float, ptr, ptr,
                                           ctypes.c_int]  # fmt: skip
        lib.w8a8_quantize_rows.restype = ctypes.c_int
        lib.w8a8_fake_quantize_rows.argtypes = [ptr, ctypes.c_int, i64, i64, i64, ctypes.c_int, ctypes.c_float, ptr,
                                                ctypes.c_int, ctypes.c_int]  # fmt: skip
        lib.w8a8_fake_quantize_rows.restype = ctypes.c_int
        lib.w8a8_quantize_is_vectorized.restype = ctypes.c_int
        lib.w8a8_amx_init.restype = ctypes.c_int
        lib.w8a8_amx_pack.argtypes = [ptr, i64, i64, i64, ctypes.c_int, ptr]
        lib.w8a8_amx_pack.restype = None
        lib.w8a8_amx_linear.argtypes = [ptr, ptr, ctypes.c_int, i64, i64, ptr, ctypes.c_int, ptr, i64, ptr, ptr, i64,
                                        ptr, ctypes.c_int, ctypes.c_int]  # fmt: skip
        lib.w8a8_amx_linear.restype = ctypes.c_int
        lib.w8a8_amx_bf16_linear.argtypes = [ptr, i64, i64, ptr, ctypes.c_int, ptr, i64, ptr, ptr, i64, ptr,
                                             ctypes.c_int, ctypes.c_int]  # fmt: skip
        lib.w8a8_amx_bf16_linear.restype = ctypes.c_int
        lib.w8a8_vnni_built.restype = ctypes.c_int
        lib.w8a8_vnni_linear.argtypes = [ptr, ptr, ctypes.c_int, i64, i64, ptr, ptr, i64, ptr, ptr, i64, ptr,
                                         ctypes.c_int, ctypes.c_int]  # fmt: skip
        lib.w8a8_vnni_linear.restype = ctypes.c_int
        lib.w8a8_vnni_planned.argtypes = [ptr, ptr, ctypes.c_int, i64, i64, ptr, ptr, ctypes.c_int, ctypes.c_int]
        lib.w8a8_vnni_planned.restype = ctypes.c_int
    return lib


def row_view(x: torch.Tensor, k: int) -> tuple[torch.Tensor, int, int, int]:
    """``x: [..., k]`` as rows for a C kernel: ``(held, rows, address, row stride)``, ``held``
    the tensor whose memory ``address`` points into (keep it alive through the call); a copy
    only when the last dimension is strided."""
    if x.is_contiguous():  # decoding's case: no view to make
        return x, x.numel() // k, x.data_ptr(), k
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2, x2.shape[0], x2.data_ptr(), x2.stride(0)


@dataclass(frozen=True)
class _NativePlan:
    pack: _IntMMPack  # held: the kernel reads its tensors by address
    weight: torch.Tensor  # [N, K] int8, contiguous
    static: torch.Tensor | None  # the layer's input_scale buffer (static schemes), read by address
    array: torch.Tensor  # int64: w8a8_planned's plan
    address: int  # array's


def _native_plan(layer: QuantLinear) -> _NativePlan:
    pack = cached(layer, "cpu_int_mm", _build)
    weight = pack.weight.t()  # [N, K], contiguous
    act = layer.scheme.input_activations
    static = None if act.dynamic else layer._buffers["input_scale"]
    array = torch.tensor(
        [weight.data_ptr(), pack.weight_sum.data_ptr(), layer.out_features, pack.scales.data_ptr(),
         0 if pack.correction is None else pack.correction.data_ptr(), int(static is None),
         0 if static is None else static.data_ptr(), layer.in_features],
        dtype=torch.int64,
    )  # fmt: skip
    return _NativePlan(pack, weight, static, array, array.data_ptr())


def _native_forward(layer: QuantLinear, x: torch.Tensor, lib: ctypes.CDLL) -> torch.Tensor:
    """``w8a8_cpu.c`` on the rows of ``x``: the result of the ``torch._int_mm`` path below. The
    call's fixed arguments are prepared once per layer and passed as one array."""
    plan = cached(layer, "cpu_w8a8_native", _native_plan)  # rebuilt for a new input_scale tensor
    k, n = layer.in_features, layer.out_features
    _held, rows, address, stride = row_view(x, k)  # _held: alive through the call
    # torch adds the bias after casting to the input dtype: in float32, the kernel can do it.
    bias = layer._parameters["bias"]
    kernel_bias = bias is not None and x.dtype == torch.float32 and bias.dtype == torch.float32 and bias.is_contiguous()
    out = x.new_empty((*x.shape[:-1], n))  # written in x's dtype (a bfloat16 one rounded as torch rounds)
    bias_address = bias.data_ptr() if kernel_bias else None
    dtype = NATIVE_X_DTYPES[x.dtype]
    failed = lib.w8a8_planned(plan.address, address, dtype, rows, stride, bias_address, out.data_ptr(), dtype,
                              torch.get_num_threads())  # fmt: skip
    if failed:
        raise MemoryError("the CPU W8A8 kernel could not allocate its scratch memory")
    return out if bias is None or kernel_bias else out + bias.to(x.dtype)


def _forward(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    lead = x.shape[:-1]
    rows = x.numel() // layer.in_features
    # One C call quantizes each row on its own scale; a dynamic per-tensor scale spans the rows
    # (the torch path below).
    if rows < ONEDNN_MIN_ROWS and x.dtype in NATIVE_X_DTYPES and _scale_per_row(layer.scheme.input_activations):
        lib = _native_library()
        if lib is not None:
            return _native_forward(layer, x, lib)
    if layer.symmetric and amx_int8_serves(layer, x):
        return amx_int8_forward(layer, x)
    xq, sx = _quantized_input(layer, x)
    if layer.symmetric and xq.shape[0] >= ONEDNN_MIN_ROWS and onednn_available():
        out_dtype = x.dtype if x.dtype in (torch.float32, torch.bfloat16) else torch.float32
        return _onednn(layer, xq, sx, out_dtype).to(x.dtype).reshape(*lead, layer.out_features)
    pack = cached(layer, "cpu_int_mm", _build)
    y = torch._int_mm(xq, pack.weight).float()  # [T, N], exact
    if pack.correction is not None:
        y.sub_(xq.sum(dim=-1, keepdim=True, dtype=torch.int32).float() * pack.correction)
    y = y.mul_(sx).mul_(pack.scales).to(x.dtype).reshape(*lead, layer.out_features)
    return y if layer.bias is None else y + layer.bias.to(x.dtype)


register_kernel(Kernel("cpu_int_mm", _supports, _forward, priority=20))
