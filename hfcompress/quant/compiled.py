"""``QuantLinear`` under ``torch.compile``: the whole quantized linear as one operator.

The kernels behind a ``QuantLinear`` are C functions called through ``ctypes`` and Triton
launchers with Python around them. Dynamo cannot trace those: without this module every
quantized layer broke the graph, and a compiled model decoded slower than the eager one.
Under ``torch.compile`` (and only there) ``QuantLinear.forward`` calls
``torch.ops.hfcompress.quant_linear(x, handle, out_features)`` instead: an opaque op whose
eager implementation is the usual dispatch (:func:`hfcompress.quant.dispatch.quant_linear_forward`)
on the layer registered under ``handle``, and whose fake implementation only gives the output's
shape. A decoder then compiles into one graph: the Python between the layers (norms, rotary
embeddings, attention glue) runs as compiled code, the linears on our kernels.

The op is used for inference only: a call that needs a gradient, or runs under autocast,
traces the eager path as before (graph breaks, but the same numbers). A handle names a layer
of this process only: a program exported with the op in it (``torch.export``) runs in the
process whose layers it names.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from typing import TYPE_CHECKING

import torch

from hfcompress.quant import dispatch

if TYPE_CHECKING:
    from hfcompress.quant.linear import QuantLinear

__all__ = ["Registry", "compiled_forward", "in_op", "register_layer", "uses_op"]


class Registry:
    """Objects of this process under integer handles, held weakly: how an opaque operator names
    the stateful object it works on (an operator's arguments are tensors and numbers only).

    Args:
        what: The objects' kind, for the error message.
        op: The operator that looks them up, for the error message.
    """

    def __init__(self, what: str, op: str) -> None:
        self._items: weakref.WeakValueDictionary[int, object] = weakref.WeakValueDictionary()
        self._next = itertools.count(1)
        self._lock = threading.Lock()
        self._what, self._op = what, op

    def add(self, obj: object) -> int:
        """A new handle for ``obj`` (each object, copies included, gets its own)."""
        with self._lock:
            handle = next(self._next)
            self._items[handle] = obj
        return handle

    def get(self, handle: int):
        """The object under ``handle``.

        Raises:
            RuntimeError: It was deleted (a compiled program outlived it).
        """
        obj = self._items.get(handle)
        if obj is None:
            raise RuntimeError(
                f"{self._op}: no {self._what} is registered under handle {handle} (it was deleted); recompile the model"
            )
        return obj


_LAYERS = Registry("QuantLinear", "hfcompress::quant_linear")


class _OpState(threading.local):
    def __init__(self) -> None:
        self.active = False


_STATE = _OpState()


def register_layer(layer: QuantLinear) -> int:
    """A new handle for ``layer`` (each layer, copies included, gets its own)."""
    return _LAYERS.add(layer)


def in_op() -> bool:
    """Whether the current thread runs inside the compiled op. Compiled code may hand the op an
    input whose buffer it later rewrites in place without bumping the tensor's version, so
    caches keyed on an input tensor's identity must not be reused there."""
    return _STATE.active


def _quant_linear(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    layer = _LAYERS.get(handle)
    outer = _STATE.active
    _STATE.active = True
    try:
        y = dispatch.quant_linear_forward(layer, x)
    finally:
        _STATE.active = outer
    return y if y.dtype == x.dtype else y.to(x.dtype)


def _fake(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


# A plain operator library, not torch.library.custom_op: its Python wrapper cost about 9 us a
# call, where decoding SmolLM2 calls 210 layers a token; through the dispatcher directly, 1.5 us.
_LIBRARY = torch.library.Library("hfcompress", "DEF")
_LIBRARY.define("quant_linear(Tensor x, int handle, int out_features) -> Tensor")
_LIBRARY.impl("quant_linear", _quant_linear, "CompositeExplicitAutograd")
torch.library.register_fake("hfcompress::quant_linear", _fake, lib=_LIBRARY)


def uses_op(x: torch.Tensor) -> bool:
    """Whether a ``QuantLinear`` call on ``x`` goes through the op: while Dynamo traces, for
    inference calls without autocast."""
    return (
        torch.compiler.is_compiling()
        and not (x.requires_grad and torch.is_grad_enabled())
        and not torch.is_autocast_enabled(x.device.type)
    )


def compiled_forward(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` through the operator (shape checked here, where Dynamo can see it)."""
    dispatch.check_input_shape(layer, x)
    return torch.ops.hfcompress.quant_linear(x, layer._handle, layer.out_features)
