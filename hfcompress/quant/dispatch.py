"""Which kernel a ``QuantLinear`` forward runs, and the CPU fast paths.

Paths, in order of preference:

* ``triton``: CUDA tensors, 4-bit weights: the W4A16 Triton kernels in ``hfcompress_triton``.
* ``cpu_int4``: CPU tensors, 4-bit weights: ``aten._weight_int4pack_mm_for_cpu``. It needs
  N a multiple of 16, K a multiple of its group size (32, 64, 128 or 256) and bfloat16
  activations (its float32 path is an order of magnitude slower on the CPUs we measured), so
  the weight is repacked once (rows and columns zero-padded) and the activation is cast to
  bfloat16; accumulation is float32 inside the op.
* ``cpu_int8``: CPU tensors, 8-bit per-channel weights: ``aten._weight_int8pack_mm`` with
  bfloat16 activations; an asymmetric zero point becomes a rank-one correction. The op
  crashes (torch 2.13) when K is not a multiple of 16, so K is zero-padded to one.
* ``reference``: dequantize to the activation dtype and ``F.linear``. Exact up to float
  rounding; used everywhere else, and everywhere when ``HFCOMPRESS_FORCE_REFERENCE=1``.

The repacked CPU weights are cached on the layer and rebuilt when its buffers change.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from hfcompress.quant.affine import num_groups

if TYPE_CHECKING:
    from hfcompress.quant.linear import QuantLinear

__all__ = ["FORCE_REFERENCE_ENV", "quant_linear_forward", "reference_forward", "select_path"]

logger = logging.getLogger(__name__)

FORCE_REFERENCE_ENV = "HFCOMPRESS_FORCE_REFERENCE"
_CPU_INT4_GROUP_SIZES = (256, 128, 64, 32)
_INT4_INNER_K_TILES = 2


def _force_reference() -> bool:
    return os.environ.get(FORCE_REFERENCE_ENV, "0") not in ("", "0", "false", "False")


def _cpu_int4_group_size(layer: QuantLinear) -> int | None:
    """The op's group size for ``layer``, or None when none tiles its groups.

    A block of the op must lie inside one of our groups: its size must divide our group size
    (per channel, any size does). Among those, the largest that also divides K is preferred,
    since then the activation needs no padding on every call (SmolLM2: K = 576, group 128
    -> blocks of 64).
    """
    per_channel = num_groups(layer.in_features, layer.group_size) == 1
    fitting = [q for q in _CPU_INT4_GROUP_SIZES if per_channel or layer.group_size % q == 0]
    if not fitting:
        return None
    unpadded = [q for q in fitting if layer.in_features % q == 0]
    return (unpadded or fitting)[0]


def select_path(layer: QuantLinear, x: torch.Tensor) -> str:
    """Name of the path ``layer(x)`` takes: triton, cpu_int4, cpu_int8 or reference."""
    if _force_reference():
        return "reference"
    if x.is_cuda and layer.bits == 4:
        from hfcompress.quant import triton_bridge

        return "triton" if triton_bridge.available() else "reference"
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
        if layer.bits == 4 and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            if _cpu_int4_group_size(layer) is not None:
                return "cpu_int4"
        if layer.bits == 8 and layer.scales.shape[1] == 1 and hasattr(torch.ops.aten, "_weight_int8pack_mm"):
            return "cpu_int8"
    return "reference"


def reference_forward(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """``x @ dequantize(W).T + b`` in the activation dtype."""
    return F.linear(x, layer.dequantize(x.dtype), layer.bias)


@dataclass(frozen=True)
class _Int4Pack:
    weight: torch.Tensor  # op-specific packed layout of [Np, Kp]
    scale_zero: torch.Tensor  # [Kp / qgs, Np, 2] bfloat16
    group_size: int
    padded_k: int


@dataclass(frozen=True)
class _Int8Pack:
    weight: torch.Tensor  # [N, Kp] int8, codes - 128, K zero-padded to a multiple of 16
    scales: torch.Tensor  # [N] bfloat16
    correction: torch.Tensor | None  # [N] float32, (z - 128) * s; None when symmetric
    padded_k: int


def _buffers_key(layer: QuantLinear) -> tuple:
    # In-place writes (load_state_dict, copy_) bump `_version`; assigning a new tensor changes
    # its id. Read through `_buffers` directly: Module.__getattr__ costs more than the check.
    buffers = layer._buffers
    names = ("qweight", "scales") if layer.symmetric else ("qweight", "scales", "zeros")
    return tuple((id(buffers[n]), buffers[n]._version) for n in names)


def _cached(layer: QuantLinear, name: str, build):
    key = _buffers_key(layer)
    entry = layer._kernel_cache.get(name)
    if entry is None or entry[0] != key:
        entry = (key, build(layer))
        layer._kernel_cache[name] = entry
    return entry[1]


def _build_int4(layer: QuantLinear) -> _Int4Pack:
    qgs = _cpu_int4_group_size(layer)
    n, k = layer.out_features, layer.in_features
    padded_n, padded_k = -(-n // 16) * 16, -(-k // qgs) * qgs
    codes = F.pad(layer.codes().to(torch.int32), (0, padded_k - k, 0, padded_n - n))
    weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, _INT4_INNER_K_TILES)
    # The op computes (q - 8) * s + m per block; ours is (q - z) * s, so m = (8 - z) * s.
    group = torch.arange(padded_k // qgs) * qgs
    group = torch.clamp(group // layer.group_size, max=layer.scales.shape[1] - 1)
    s = layer.scales.float()[:, group]  # [N, Kp / qgs]
    m = (8.0 - layer.zero_points().float()[:, group]) * s
    scale_zero = torch.stack([s, m], dim=-1).transpose(0, 1)  # [Kp / qgs, N, 2]
    scale_zero = F.pad(scale_zero, (0, 0, 0, padded_n - n), value=1.0)
    return _Int4Pack(weight, scale_zero.to(torch.bfloat16).contiguous(), qgs, padded_k)


def _cpu_int4_forward(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    pack = _cached(layer, "cpu_int4", _build_int4)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, layer.in_features).to(torch.bfloat16)
    if pack.padded_k != layer.in_features:
        x2 = F.pad(x2, (0, pack.padded_k - layer.in_features))
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, pack.weight, pack.group_size, pack.scale_zero)
    if y.shape[1] != layer.out_features:
        y = y[:, : layer.out_features]
    y = y.to(x.dtype).reshape(*lead, layer.out_features)
    return y if layer.bias is None else y + layer.bias.to(x.dtype)


def _build_int8(layer: QuantLinear) -> _Int8Pack:
    padded_k = -(-layer.in_features // 16) * 16
    weight = (layer.codes().to(torch.int16) - 128).to(torch.int8)
    weight = F.pad(weight, (0, padded_k - layer.in_features))
    s = layer.scales.float()[:, 0]
    correction = None if layer.symmetric else (layer.zeros.float()[:, 0] - 128.0) * s
    return _Int8Pack(weight.contiguous(), s.to(torch.bfloat16), correction, padded_k)


def _cpu_int8_forward(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    pack = _cached(layer, "cpu_int8", _build_int8)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, layer.in_features).to(torch.bfloat16)
    if pack.padded_k != layer.in_features:
        x2 = F.pad(x2, (0, pack.padded_k - layer.in_features))
    y = torch.ops.aten._weight_int8pack_mm(x2, pack.weight, pack.scales).float()
    if pack.correction is not None:
        # (q - z) * s = (q - 128) * s - (z - 128) * s: the second term is rank one.
        y = y - x2.float().sum(dim=-1, keepdim=True) * pack.correction
    y = y.to(x.dtype).reshape(*lead, layer.out_features)
    return y if layer.bias is None else y + layer.bias.to(x.dtype)


def _triton_forward(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    from hfcompress.quant import triton_bridge

    return triton_bridge.w4a16_linear(layer, x)


_PATHS = {
    "reference": reference_forward,
    "cpu_int4": _cpu_int4_forward,
    "cpu_int8": _cpu_int8_forward,
    "triton": _triton_forward,
}


class _DenseState(threading.local):
    def __init__(self) -> None:
        self.active = False
        self.layers: list[QuantLinear] = []


_DENSE = _DenseState()


@contextlib.contextmanager
def dense_weights() -> Iterator[None]:
    """Inside this context, ``QuantLinear`` layers compute with their dequantized weight,
    dequantized once per layer and dropped on exit.

    For the large-M forward passes of layerwise calibration (thousands of tokens per call) a
    dense matmul, bfloat16 under autocast, beats the packed CPU kernels, which are built for
    decoding; it costs one float copy of each layer used, only while the context lasts.
    """
    outer = _DENSE.active
    _DENSE.active = True
    try:
        yield
    finally:
        _DENSE.active = outer
        if not outer:
            for layer in _DENSE.layers:
                layer._kernel_cache.pop("dense", None)
            _DENSE.layers.clear()


def _dense_forward(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    if "dense" not in layer._kernel_cache:
        _DENSE.layers.append(layer)
    weight = _cached(layer, "dense", lambda m: m.dequantize(torch.float32))
    return F.linear(x, weight.to(x.dtype) if not torch.is_autocast_enabled() else weight, layer.bias)


def quant_linear_forward(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """Run ``layer`` on ``x: [..., K]`` through the path :func:`select_path` picks.

    The choice is remembered per (device type, dtype, forced reference) on the layer: decoding
    calls every layer once per token, and re-deciding each time cost a measurable share of it.
    """
    if _DENSE.active:
        return _dense_forward(layer, x)
    key = (x.device.type, x.dtype, _force_reference())
    path = layer._path_cache.get(key)
    if path is None:
        path = layer._path_cache[key] = select_path(layer, x)
    return _PATHS[path](layer, x)
