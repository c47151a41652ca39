"""The CPU weight-only kernels: PyTorch's packed int4 and int8 matmuls, our decode kernel (2,
3, 4 and 8 bits) and our AMX bfloat16 kernel.

* ``cpu_int4``: 4-bit weights, ``aten._weight_int4pack_mm_for_cpu``. It needs N a multiple of
  16, K a multiple of its block size (32, 64, 128 or 256) and bfloat16 activations and
  scales (its float32 and float16 paths run 15-70x slower on the CPUs we measured), so the
  weight is repacked once (rows and columns zero-padded) and the activation is cast to
  bfloat16; accumulation is float32 inside the op, the output bfloat16. The op computes
  ``(q - 8) * s + m`` per block, and ``m = (8 - z) * s`` rounded to bfloat16 is off by up to
  ``|8 - z| * 2^-9`` of a scale step. For calls of at least ``EXACT_OFFSET_MIN_ROWS`` rows
  (prefill, evaluation) we give the op ``m = 0`` and add ``sum_g (sum of x over group g) *
  (8 - z) * s`` ourselves in float32 (a [T, groups] x [groups, N] product). For fewer rows
  (decoding, where the decode kernel below does not serve) the three extra small ops would
  cost about 20% of SmolLM2's decode speed, so the op takes the rounded ``m`` there. What
  stays rounded either way: the activations and the scales (bfloat16, 2^-9 relative) and the
  op's output (bfloat16); benchmarks/bench_cpu_precision.py measures both paths.
* ``cpu_int8``: 8-bit per-channel weights, ``aten._weight_int8pack_mm``, bfloat16
  activations. The op takes bfloat16 scales; the output is then multiplied by
  ``s / bfloat16(s)`` in float32, which undoes the scale rounding exactly (per channel). On
  SmolLM2 this beat giving the op unit scales and applying ``s`` after it (0.19% vs 0.27%
  relative error: the op's bfloat16 output of the unscaled sums lost more on the layers with
  the largest activations). An asymmetric zero point becomes a rank-one correction. The op
  crashes (torch 2.13) when K is not a multiple of 16, so K is zero-padded. On CPUs with
  AVX-512 BF16, calls the AMX kernel below does not take (fewer than ``AMX_BF16_MIN_ROWS``
  rows, or fewer than ``AMX_MIN_ROWS`` without AMX) run ``decode_cpu.c``'s decode kernel instead,
  in float32: each code minus 128 is an exact float32 and the inputs are not rounded, so its
  float32 sums are the only rounding.
* ``cpu_lowbit``: 2- and 3-bit weights whose group size the decode kernel below takes (32, 64,
  a multiple of 128, or per channel), where it is built (AVX-512 BF16 and VBMI): calls of fewer
  than ``AMX_BF16_MIN_ROWS`` rows run the kernel (fewer than ``AMX_MIN_ROWS`` without AMX);
  larger ones the AMX bfloat16 kernel below (its pack two codes a byte: 4/3 of a 3-bit layer's
  own bytes, twice a 2-bit one's), or without AMX the reference computation (dequantize,
  ``F.linear``), which before served every call: SmolLM2 W3 g128 decoded at 3.2 tokens/s
  against float32's 29.2, and prefilled 512 tokens at 0.58x its speed.

Torch's two ops are decoding kernels: at 512 rows they took 10-16x the time of a bfloat16
matmul of the same shape (2-core Sapphire Rapids VM). On CPUs with AMX, calls of at least
``AMX_BF16_MIN_ROWS`` rows (prefill, evaluation, batched decoding) whose K and group size are
multiples of 32 go instead to ``w8a8_cpu.c``'s AMX bfloat16 kernel
(:func:`hfcompress.quant.cpu_w8a8.amx_bf16_linear`): the codes widened to bfloat16 (exact),
float32 sums, each group's float32 scale and zero point applied to its sums. The bfloat16
inputs are then the only rounding: on SmolLM2's W8 prefill 0.179% relative error against the
op's 0.188%, where the floor of bfloat16 inputs is 0.179% (benchmarks/bench_cpu_precision.py).

On CPUs with AVX-512 BF16, ``cpu_int4``'s other calls of fewer than ``AMX_MIN_ROWS`` rows
(decoding) whose group size is a multiple of 128 (or one group per channel) go to
``decode_cpu.c``'s decode kernel instead (:func:`hfcompress.quant.cpu_decode.decode_forward`):
it reads the layer's own packed codes (torch's op needs a repacked copy of them, not built
then), takes float32 scales and zero points and rounds only the activations to bfloat16, so
decoding no longer runs on the rounded offset ``m``. On SmolLM2's decode its layers took
3-8% less time than the op's in ad-hoc timings. Both are bound by arithmetic there, not by
memory (a layer took the same time read from L2 as from the last-level cache): on that VM a
``vdpbf16ps`` took about 0.55 ns in a throughput loop, three times a float32 FMA's 0.19 ns.

On CPUs without AMX, weight-only calls of many rows go to neither: from
``cpu_decode.DENSE_MIN_ROWS`` rows (4 and 8 bits; 2 and 3 bits, where their decode kernel
exists, from ``AMX_MIN_ROWS``, where it stops) the weight is dequantized in one C pass and
multiplied by it (:func:`hfcompress.quant.cpu_decode.dense_forward`), in bfloat16 where
oneDNN's bfloat16 matmul is clearly faster than float32 on this CPU (measured once per
process: AMD Zen 4), else in float32 (an Intel Xeon VM with AVX-512 BF16 but no AMX, where it
is slower; CPUs without AVX-512 BF16). In bfloat16, on SmolLM2's shapes about 2x faster than
torch's ops at 512 rows, at a bfloat16 model's rounding (0.198% relative error on SmolLM2's W4
g128 prefill against the op's 0.166%; 0.209% against 0.188% for W8); in float32, exact up to
summation order, and 2.6x faster than the ops on that Xeon, 2.1-2.3x with it held to AVX2.

All three serve weight-only schemes. A layer with quantized input activations goes to the integer
matmuls of ``cpu_w8a8`` when its weights allow one (per channel); grouped 4-bit weights with
int8 inputs (W4A8 g128) go to ``cpu_int4_a8``: the inputs fake-quantized (the reference's
``fq(x)``, in one C pass where ``w8a8_cpu.c`` is vectorized, and once for the layers that read
one tensor), then ``cpu_int4``, at the weight-only op's speed instead of the reference's, which
dequantizes the whole weight on every call. On CPUs with AMX, its calls of ``AMX_MIN_ROWS``
rows or more whose K and group size are multiples of 64 run ``w8a8_cpu.c``'s AMX int8 kernel
(:func:`hfcompress.quant.cpu_w8a8.amx_int8_forward`): the int8 codes of the inputs times the
4-bit codes, exact int32 sums per group, each group's scale and zero point in float32, the
row's scale last; on SmolLM2's inputs it is the float32 reference up to 3.5e-7 relative error
per layer, where the bfloat16 path is 1.5-2.1e-3 off. On CPUs without AMX but with AVX-512
VNNI, ``w8a8_cpu.c``'s VNNI kernel does the same computation at every row count
(:func:`hfcompress.quant.cpu_w8a8.vnni_int8_forward`; decoding in one C call, the rows
quantized there): on SmolLM2's layers it took 0.2-0.5x the fake-quantized path's time from 1 to
64 rows and 0.4-0.5x at 512, and it is 3e-8 from the exact result, where the float32 dense path
of that route is 2e-7 off (2-core Xeon VM without AMX; RESULTS.md stop 63).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from hfcompress.quant import cpu_decode, cpu_w8a8
from hfcompress.quant.affine import num_groups
from hfcompress.quant.dispatch import Kernel, cached, reference_forward, register_kernel

if TYPE_CHECKING:
    from hfcompress.quant.linear import QuantLinear

__all__ = ["EXACT_OFFSET_MIN_ROWS", "INT4_BLOCK_SIZES"]

INT4_BLOCK_SIZES = (256, 128, 64, 32)
EXACT_OFFSET_MIN_ROWS = 16
_INT4_INNER_K_TILES = 2
_FLOAT_INPUTS = (torch.float32, torch.bfloat16, torch.float16)


def _cpu_weight_only(layer: QuantLinear, x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in _FLOAT_INPUTS and layer.scheme.input_activations is None


def _int4_block_size(layer: QuantLinear) -> int | None:
    """The op's block size for ``layer``, or None when none tiles its groups.

    A block of the op must lie inside one of our groups: its size must divide our group size
    (per channel, any size does). Among those, the largest that also divides K is preferred,
    since then the activation needs no padding on every call (SmolLM2: K = 576, group 128
    -> blocks of 64).
    """
    per_channel = num_groups(layer.in_features, layer.group_size) == 1
    fitting = [q for q in INT4_BLOCK_SIZES if per_channel or layer.group_size % q == 0]
    if not fitting:
        return None
    unpadded = [q for q in fitting if layer.in_features % q == 0]
    return (unpadded or fitting)[0]


@dataclass(frozen=True)
class _Int4Pack:
    weight: torch.Tensor  # op-specific packed layout of [Np, Kp]
    scale_zero: torch.Tensor  # [Kp / qgs, Np, 2] bfloat16: our scales, and 0 for the op's offset
    scale_offset: torch.Tensor  # the same with the offset (8 - z) * s, rounded: for few rows
    group_size: int  # the op's block size
    padded_k: int
    offsets: torch.Tensor  # [N, G] float32: (8 - z) * s, one per group of ours
    ours: int  # our group size (K when per channel)


@dataclass(frozen=True)
class _Int8Pack:
    weight: torch.Tensor  # [N, Kp] int8, codes - 128, K zero-padded to a multiple of 16
    op_scales: torch.Tensor  # [N] bfloat16: the layer's scales, rounded, for the op
    rescale: torch.Tensor  # [N] float32, s / bfloat16(s): applied to the op's output
    correction: torch.Tensor | None  # [N] float32, (z - 128) * s; None when symmetric
    padded_k: int


def _int4_op_fits(layer: QuantLinear, x: torch.Tensor) -> bool:
    """Whether the int4 op can take ``layer``'s weights and ``x`` (whatever the input scheme)."""
    return (
        x.device.type == "cpu"
        and x.dtype in _FLOAT_INPUTS
        and layer.bits == 4
        and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
        and _int4_block_size(layer) is not None
    )


def _supports_int4(layer: QuantLinear, x: torch.Tensor) -> bool:
    return layer.scheme.input_activations is None and _int4_op_fits(layer, x)


def _build_int4(layer: QuantLinear) -> _Int4Pack:
    qgs = _int4_block_size(layer)
    n, k = layer.out_features, layer.in_features
    padded_n, padded_k = -(-n // 16) * 16, -(-k // qgs) * qgs
    codes = F.pad(layer.codes().to(torch.int32), (0, padded_k - k, 0, padded_n - n))
    weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, _INT4_INNER_K_TILES)
    group = torch.arange(padded_k // qgs) * qgs
    group = torch.clamp(group // layer.group_size, max=layer.scales.shape[1] - 1)
    s = layer.scales.float()[:, group]  # [N, Kp / qgs]
    # The op computes (q - 8) * s + m per block; ours is (q - z) * s = (q - 8) * s + (8 - z) * s.
    # The second term goes outside the op in float32, or into m (see the module docstring).
    m = (8.0 - layer.zero_points().float()[:, group]) * s

    def pack(offset: torch.Tensor) -> torch.Tensor:
        scale_zero = torch.stack([s, offset], dim=-1).transpose(0, 1)  # [Kp / qgs, N, 2]
        return F.pad(scale_zero, (0, 0, 0, padded_n - n), value=1.0).to(torch.bfloat16).contiguous()

    offsets = (8.0 - layer.zero_points().float()) * layer.scales.float()  # [N, G]
    ours = min(layer.group_size, k)
    return _Int4Pack(weight, pack(torch.zeros_like(s)), pack(m), qgs, padded_k, offsets, ours)


def _cpu_int4_forward(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    y = _our_kernels(layer, x)
    if y is not None:
        return y
    k = layer.in_features
    x1 = x.reshape(-1, k)
    # The op needs a contiguous A; a bfloat16 slice (a BERT pooler's [CLS] rows) stays a view.
    x2 = x1.to(torch.bfloat16).contiguous()
    pack = cached(layer, "cpu_int4", _build_int4)  # built on first use: prefill alone on AMX never needs it
    exact = x1.shape[0] >= EXACT_OFFSET_MIN_ROWS
    if pack.padded_k != k:
        x2 = F.pad(x2, (0, pack.padded_k - k))
    scale_zero = pack.scale_zero if exact else pack.scale_offset
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, pack.weight, pack.group_size, scale_zero)
    if y.shape[1] != layer.out_features:
        y = y[:, : layer.out_features]
    if exact:
        groups = pack.offsets.shape[1]
        sums = F.pad(x1.float(), (0, groups * pack.ours - k)).view(-1, groups, pack.ours).sum(-1)  # [T, G]
        y = torch.addmm(y.float(), sums, pack.offsets.T)
    return _output(layer, x, y.to(x.dtype))


def _supports_int8(layer: QuantLinear, x: torch.Tensor) -> bool:
    return (
        _cpu_weight_only(layer, x)
        and layer.bits == 8
        and layer.scales.shape[1] == 1
        and hasattr(torch.ops.aten, "_weight_int8pack_mm")
    )


def _build_int8(layer: QuantLinear) -> _Int8Pack:
    padded_k = -(-layer.in_features // 16) * 16
    weight = (layer.codes().to(torch.int16) - 128).to(torch.int8)
    weight = F.pad(weight, (0, padded_k - layer.in_features))
    s = layer.scales.float()[:, 0]
    correction = None if layer.symmetric else (layer.zeros.float()[:, 0] - 128.0) * s
    op_scales = s.to(torch.bfloat16)
    return _Int8Pack(weight.contiguous(), op_scales, s / op_scales.float(), correction, padded_k)


def _add_bias(layer: QuantLinear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A kernel's ``y`` (no bias) with the bias added in ``x``'s dtype, as torch adds it."""
    bias = layer._parameters["bias"]  # not Module.__getattr__: decoding calls this for every layer
    return y if bias is None else y + bias.to(x.dtype)


def _output(layer: QuantLinear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A kernel's ``y: [T, N]`` (no bias) for ``x: [..., K]``: shaped ``[..., N]``, the bias added."""
    return _add_bias(layer, x, y.reshape(*x.shape[:-1], layer.out_features))


def _amx_bf16_forward(layer: QuantLinear, x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    return _output(layer, x, cpu_w8a8.amx_bf16_linear(layer, x2.contiguous(), x.dtype).to(x.dtype))


def _our_kernels(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor | None:
    """A weight-only layer on our C kernels: ``w8a8_cpu.c``'s AMX bfloat16 kernel from
    ``AMX_BF16_MIN_ROWS`` rows, else ``decode_cpu.c``'s decode kernel (None where neither
    serves; the caller's op or the reference then does)."""
    rows = x.numel() // layer.in_features
    if rows >= cpu_w8a8.AMX_BF16_MIN_ROWS and cpu_w8a8.amx_bf16_serves(layer, rows):  # decoding skips the call
        return _amx_bf16_forward(layer, x, x.reshape(-1, layer.in_features).to(torch.bfloat16))
    y = cpu_decode.decode_forward(layer, x)
    if y is None:  # many rows without AMX: dequantize, then a matmul
        y = cpu_decode.dense_forward(layer, x)
    return None if y is None else _add_bias(layer, x, y)


def _cpu_int8_forward(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    y = _our_kernels(layer, x)  # decoding: float32 products, exact inputs, unlike the op's bfloat16
    if y is not None:
        return y
    x2 = x.reshape(-1, layer.in_features).to(torch.bfloat16).contiguous()
    pack = cached(layer, "cpu_int8", _build_int8)
    if pack.padded_k != layer.in_features:
        x2 = F.pad(x2, (0, pack.padded_k - layer.in_features))
    # The op returns x @ ((q - 128) * bfloat16(s))^T in bfloat16; the rescale undoes the rounding of s.
    y = torch.ops.aten._weight_int8pack_mm(x2, pack.weight, pack.op_scales).float() * pack.rescale
    if pack.correction is not None:
        # (q - z) * s = (q - 128) * s - (z - 128) * s: the second term is rank one.
        y = y - x2.float().sum(dim=-1, keepdim=True) * pack.correction
    return _output(layer, x, y.to(x.dtype))


def _supports_int4_a8(layer: QuantLinear, x: torch.Tensor) -> bool:
    return layer.scheme.input_activations is not None and _int4_op_fits(layer, x)


def _cpu_int4_a8_forward(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    if cpu_w8a8.amx_int8_serves(layer, x):  # int8 inputs times the 4-bit codes, per group, exact
        return cpu_w8a8.amx_int8_forward(layer, x)
    if cpu_w8a8.vnni_int8_serves(layer, x):  # the same without AMX, on AVX-512 VNNI
        return cpu_w8a8.vnni_int8_forward(layer, x)
    return _cpu_int4_forward(layer, cpu_w8a8.fake_quantized_input(layer, x))


def _supports_lowbit(layer: QuantLinear, x: torch.Tensor) -> bool:
    return _cpu_weight_only(layer, x) and layer.bits in (2, 3) and cpu_decode.decode_fits(layer)


def _cpu_lowbit_forward(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    y = _our_kernels(layer, x)
    # None: AMX_MIN_ROWS rows or more without AMX (or K not a multiple of 32), or float16 inputs
    return reference_forward(layer, x) if y is None else y


register_kernel(Kernel("cpu_int4", _supports_int4, _cpu_int4_forward, priority=20))
register_kernel(Kernel("cpu_lowbit", _supports_lowbit, _cpu_lowbit_forward, priority=20))
# Below cpu_int_mm (20): a per-channel W4A8 layer keeps its integer matmul.
register_kernel(Kernel("cpu_int4_a8", _supports_int4_a8, _cpu_int4_a8_forward, priority=10))
register_kernel(Kernel("cpu_int8", _supports_int8, _cpu_int8_forward, priority=20))
