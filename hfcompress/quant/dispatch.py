"""Which kernel a ``QuantLinear`` forward runs: a registry of kernels chosen by capability.

Each kernel is a :class:`Kernel`: a name, a ``supports(layer, x)`` check and a
``forward(layer, x)``, with a priority. A layer's forward runs the highest-priority kernel
whose check accepts the layer and the input; the pure-torch ``reference`` kernel accepts
everything and is the fallback. A new kernel (an int8 GEMM for ``W8A8``, a KV-cache kernel)
is one :func:`register_kernel` call beside its code; nothing here changes.

Built in (see their modules for what each needs):

* ``triton_w4a16`` (:mod:`hfcompress.quant.triton_bridge`): CUDA, 4-bit weight-only.
* ``cpu_int4`` / ``cpu_int8`` / ``cpu_lowbit`` (:mod:`hfcompress.quant.cpu_kernels`):
  PyTorch's packed CPU ops and our C decode kernel, weight-only.
* ``reference``: quantize the input activations when the scheme says so, dequantize the
  weight to the activation dtype, ``F.linear``. Exact up to float rounding; used everywhere
  when ``HFCOMPRESS_FORCE_REFERENCE=1``.

Kernels may cache repacked weights on the layer with :func:`cached`; the cache is rebuilt
when the layer's buffers change.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from hfcompress.quant.activations import fake_quantize_activations

if TYPE_CHECKING:
    from hfcompress.quant.linear import QuantLinear

__all__ = [
    "FORCE_REFERENCE_ENV",
    "Kernel",
    "cached",
    "check_input_shape",
    "dense_weights",
    "quant_linear_forward",
    "reference_forward",
    "reference_path",
    "register_kernel",
    "registered_kernels",
    "select_kernel",
    "select_path",
]

logger = logging.getLogger(__name__)

FORCE_REFERENCE_ENV = "HFCOMPRESS_FORCE_REFERENCE"


@dataclass(frozen=True)
class Kernel:
    """One way to run a ``QuantLinear``.

    Attributes:
        name: Unique name (what :func:`select_path` returns).
        supports: ``(layer, x) -> bool``: can this kernel run ``layer`` on ``x`` exactly as
            the reference would (same scheme, up to its documented rounding)?
        forward: ``(layer, x: [..., K]) -> [..., N]`` in ``x``'s dtype.
        priority: Higher runs first among the kernels that support a call.
    """

    name: str
    supports: Callable[[QuantLinear, torch.Tensor], bool]
    forward: Callable[[QuantLinear, torch.Tensor], torch.Tensor]
    priority: int = 0


_KERNELS: dict[str, Kernel] = {}


def register_kernel(kernel: Kernel) -> Kernel:
    """Add ``kernel`` to the registry; a duplicate name raises ``ValueError``."""
    if kernel.name in _KERNELS:
        raise ValueError(f"kernel {kernel.name!r} is already registered")
    _KERNELS[kernel.name] = kernel
    return kernel


def registered_kernels() -> list[Kernel]:
    """The registered kernels, highest priority first."""
    _ensure_builtin_kernels()
    return sorted(_KERNELS.values(), key=lambda k: -k.priority)


# os.environ.get of a variable that is not set raises and catches a KeyError inside: 0.66 us,
# against 0.04 us for a look in the mapping's own dict (CPython's os.environ keeps one), and
# every decoding call of every layer asks. The public API still reads the value when it is set.
# Both or neither: a dict without its key encoding would answer "not set" for ever.
_ENVIRON_DATA = getattr(os.environ, "_data", None) if hasattr(os.environ, "encodekey") else None
_FORCE_KEY = os.environ.encodekey(FORCE_REFERENCE_ENV) if _ENVIRON_DATA is not None else None


def _force_reference() -> bool:
    if _ENVIRON_DATA is not None and _FORCE_KEY not in _ENVIRON_DATA:
        return False
    return os.environ.get(FORCE_REFERENCE_ENV, "0") not in ("", "0", "false", "False")


@contextlib.contextmanager
def reference_path() -> Iterator[None]:
    """Inside this context every ``QuantLinear`` runs the float ``reference`` kernel (as with
    ``HFCOMPRESS_FORCE_REFERENCE=1``); the previous setting comes back on exit."""
    previous = os.environ.get(FORCE_REFERENCE_ENV)
    os.environ[FORCE_REFERENCE_ENV] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(FORCE_REFERENCE_ENV, None)
        else:
            os.environ[FORCE_REFERENCE_ENV] = previous


def fake_quantize_inputs(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """``fq(x)``: ``x`` on the int8 grid of ``layer``'s input scheme, in ``x``'s dtype (``x``
    itself for weight-only schemes)."""
    act = layer.scheme.input_activations
    return x if act is None else fake_quantize_activations(x, act, getattr(layer, "input_scale", None))


def reference_forward(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """``fq(x) @ dequantize(W).T + b`` in the activation dtype, ``fq`` the input quantization
    of the scheme (identity for weight-only schemes)."""
    x = fake_quantize_inputs(layer, x)
    return F.linear(x, layer.dequantize(x.dtype), layer.bias)


REFERENCE = register_kernel(Kernel("reference", lambda layer, x: True, reference_forward, priority=-1000))


def select_kernel(layer: QuantLinear, x: torch.Tensor) -> Kernel:
    """The kernel ``layer(x)`` runs: the highest-priority one that supports the call."""
    if _force_reference():
        return REFERENCE
    return next(k for k in registered_kernels() if k.supports(layer, x))


def select_path(layer: QuantLinear, x: torch.Tensor) -> str:
    """Name of the kernel ``layer(x)`` runs."""
    return select_kernel(layer, x).name


def _buffers_key(layer: QuantLinear) -> tuple:
    try:
        return _versions_key(layer)
    except RuntimeError:  # a buffer made under torch.inference_mode() has no version counter
        _normal_buffers(layer)
        return _versions_key(layer)


def _normal_buffers(layer: QuantLinear) -> None:
    """Replace ``layer``'s inference tensors (buffers made under ``torch.inference_mode()``:
    compressing, loading or ``.to()`` inside it) by normal copies, whose in-place writes bump a
    version counter as the kernel cache needs; an inference tensor written in place inside
    inference mode would leave a stale pack behind, undetected."""
    with torch.inference_mode(False):
        for name, t in list(layer._buffers.items()):
            if t is not None and t.is_inference():
                layer._buffers[name] = t.clone()


def _versions_key(layer: QuantLinear) -> tuple:
    # In-place writes (load_state_dict, copy_) bump `_version`; assigning a new tensor changes
    # its id. Read through `_buffers` directly: Module.__getattr__ costs more than the check,
    # and a flat tuple less than one built by a generator (decoding checks it on every call).
    buffers = layer._buffers
    q, s, a = buffers["qweight"], buffers["scales"], buffers.get("input_scale")
    # A static input scale is read by address (cpu_w8a8's decode plan), so only a new tensor
    # counts: its value may change in place (calibration) without rebuilding any pack.
    scale = () if a is None else (id(a),)
    if layer.symmetric:
        return (id(q), q._version, id(s), s._version, *scale)
    z = buffers["zeros"]
    return (id(q), q._version, id(s), s._version, id(z), z._version, *scale)


def cached(layer: QuantLinear, name: str, build: Callable[[QuantLinear], Any]) -> Any:
    """``build(layer)``, computed once and kept on the layer until its buffers change."""
    key = _buffers_key(layer)
    entry = layer._kernel_cache.get(name)
    if entry is None or entry[0] != key:
        entry = (key, build(layer))
        layer._kernel_cache[name] = entry
    return entry[1]


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
    weight = cached(layer, "dense", lambda m: m.dequantize(torch.float32))
    x = fake_quantize_inputs(layer, x)
    return F.linear(x, weight.to(x.dtype) if not torch.is_autocast_enabled() else weight, layer.bias)


def _trainable_forward(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """The reference computation, differentiable in ``x`` (for adapters trained on a frozen
    quantized model): the weight is dequantized in ``x``'s dtype, and int8 input rounding
    passes the gradient straight through."""
    if layer.scheme.input_activations is not None:
        x = x + (fake_quantize_inputs(layer, x.detach()) - x).detach()
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    return F.linear(x, layer.dequantize(dtype), layer.bias)


def check_input_shape(layer: QuantLinear, x: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``x``'s last dimension is ``layer.in_features`` (the C
    kernels read rows of ``in_features`` values by address)."""
    if x.shape[-1] != layer.in_features:
        raise ValueError(
            f"this quantized layer takes inputs whose last dimension is its in_features={layer.in_features}; "
            f"got an input of shape {tuple(x.shape)}"
        )


def quant_linear_forward(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """Run ``layer`` on ``x: [..., K]`` through the kernel :func:`select_kernel` picks, or,
    when ``x`` needs a gradient, through the differentiable reference computation (the packed
    kernels have no backward).

    The choice is remembered per (device type, dtype, forced reference) on the layer: decoding
    calls every layer once per token, and re-deciding each time cost a measurable share of it.
    """
    if x.shape[-1] != layer.in_features:
        check_input_shape(layer, x)  # raises
    if x.requires_grad and torch.is_grad_enabled():
        return _trainable_forward(layer, x)
    if _DENSE.active:
        return _dense_forward(layer, x)
    key = (x.device.type, x.dtype, _force_reference())
    kernel = layer._path_cache.get(key)
    if kernel is None:
        kernel = layer._path_cache[key] = select_kernel(layer, x)
    return kernel.forward(layer, x)


def _ensure_builtin_kernels() -> None:
    # The built-in kernels register when their modules are imported (neither imports Triton).
    import hfcompress.quant.cpu_kernels
    import hfcompress.quant.cpu_w8a8
    import hfcompress.quant.triton_bridge  # noqa: F401
