"""Run a model's compression in float32 when its own dtype has no fast matrix multiply here.

A float16 model on a CPU without AVX-512-FP16 or AMX-FP16 (most of them), or a bfloat16 one on
an AVX2-only CPU, runs every calibration pass and training step several to tens of times slower
than in float32 (a float16 SmoothQuant recipe on SmolLM2-135M: 447 s against 152 s); on CPUs
that have such a path but whose half-precision matmul is not clearly faster than float32's
(measured, :mod:`hfcompress.matmul_speed`: an Intel Xeon VM without AMX), somewhat slower (a
float16 GPTQ recipe 37-40 s against 32-34 s there). The
stages' work is the same in float32, and more precise, so :func:`float32_while` casts the
model's tensors of such a dtype to float32 for the stages and back afterwards: the model comes
out in the dtype it went in, and its compressed layers are what compressing a float32 copy and
casting it would give.

Casting back follows the tensors' names, since the stages replace layers: a tensor at a name
that held one of the cast tensors gets that tensor's dtype; a parameter the stages added (a
quantized layer's bias, a low-rank factor, a fused norm's weight) gets the dtype of the
nearest enclosing layer the model had, as the stages give it when they run in the model's
dtype, and so does the output dtype a new module records (a quantized embedding's). Buffers the
stages added (scales, statistics) keep the dtype the stages chose.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Iterator

import torch
from torch import nn

from hfcompress.layerwise import offloads, slow_dtypes

__all__ = ["float32_while"]

logger = logging.getLogger(__name__)

# At most this share of the memory available may go to the float32 copy; above it the stages
# run in the model's dtype (slowly, with a warning), since they need memory of their own.
MEMORY_SHARE = 0.5


def _tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """(qualified name, tensor, is a parameter) of every parameter and buffer, a tensor shared
    by several modules (tied weights) at each of its names."""
    for name, tensor in model.named_parameters(remove_duplicate=False):
        yield name, tensor, True
    for name, tensor in model.named_buffers(remove_duplicate=False):
        yield name, tensor, False


def _available_memory(device: torch.device) -> int | None:
    """Bytes free on ``device``: host memory for the CPU, the GPU's own for CUDA; None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        import psutil
    except ImportError:  # accelerate depends on it; without it, no guard
        return None
    return int(psutil.virtual_memory().available)


def _why_not(model: nn.Module, dtypes: list[torch.dtype]) -> str | None:
    """Why the model's tensors of ``dtypes`` cannot be cast to float32 for the stages, or None."""
    if any(offloads(m) for m in model.modules()):
        return "the model is offloaded (device_map), so its blocks load in their own dtype"
    seen: set[int] = set()
    extra: dict[torch.device, int] = {}  # bytes the copy adds, on each device the tensors are on
    for _, tensor, _ in _tensors(model):
        if tensor.dtype in dtypes and id(tensor) not in seen:
            seen.add(id(tensor))
            extra[tensor.device] = extra.get(tensor.device, 0) + tensor.numel() * (4 - tensor.element_size())
    for device, needed in extra.items():
        available = _available_memory(device)
        if available is not None and needed > MEMORY_SHARE * available:
            return (
                f"a float32 copy needs {needed / 2**30:.1f} GiB more memory on {device.type} and "
                f"{available / 2**30:.1f} GiB is available (at most {MEMORY_SHARE:.0%} of it goes to the copy)"
            )
    return None


@contextlib.contextmanager
def float32_while(model: nn.Module, device: torch.device, stages: list[str]) -> Iterator[None]:
    """Within the block, ``model``'s tensors of a dtype without a fast matrix multiply on
    ``device`` (:func:`slow_dtypes`) are float32, if any of ``stages`` (those that calibrate or
    train in the model's dtype) runs and the copy fits in memory; on leaving, even by an
    exception, they are cast back (module docstring). Where they cannot be cast, a warning
    names the stages that will run slowly and why."""
    dtypes = slow_dtypes(model, device)
    if not dtypes or not stages:
        yield
        return
    names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
    why = _why_not(model, dtypes)
    if why is not None:
        logger.warning(
            "the model is %s, and this %s has no fast %s matrix multiply, so the calibration passes and training "
            "steps of stage %s run slower than in float32 (%s). To compress faster, load the model "
            "in float32 (torch_dtype=torch.float32), compress it, then cast the result with model.to(torch.%s)",
            names,
            device.type,
            names,
            ", ".join(map(repr, stages)),
            why,
            str(dtypes[0]).removeprefix("torch."),
        )
        yield
        return
    logger.info(
        "the model is %s, which has no fast matrix multiply on this %s: stage %s run in float32, and the model is "
        "cast back to %s afterwards",
        names,
        device.type,
        ", ".join(map(repr, stages)),
        names,
    )
    cast: dict[str, torch.dtype] = {}  # qualified tensor name -> its dtype before
    # qualified name of each module that holds tensors -> the dtype its cast ones had (None: none)
    layers: dict[str, torch.dtype | None] = {}
    tensors = list(_tensors(model))
    for name, tensor, _ in tensors:
        layer = name.rpartition(".")[0]
        layers.setdefault(layer, None)
        if tensor.dtype in dtypes:
            cast[name] = tensor.dtype
            layers[layer] = tensor.dtype
    for _, tensor, _ in tensors:
        if tensor.dtype in dtypes:  # a tied tensor, float32 already at its second name, is passed over
            tensor.data = tensor.data.float()
    before = weakref.WeakSet(model.modules())  # weak: a replaced layer is freed when it is replaced
    try:
        yield
    finally:
        _cast_back(model, cast, layers, before)


def _cast_back(
    model: nn.Module,
    cast: dict[str, torch.dtype],
    layers: dict[str, torch.dtype | None],
    before: weakref.WeakSet[nn.Module],
) -> None:
    for name, module in model.named_modules():
        # a module the stages added that records the dtype of its outputs (a quantized embedding)
        if module not in before and module.__dict__.get("dtype") == torch.float32:
            dtype = _enclosing(name, layers)
            if dtype is not None:
                module.dtype = dtype
    for name, tensor, parameter in _tensors(model):
        if tensor.dtype != torch.float32:
            continue
        dtype = cast.get(name)
        if dtype is None and parameter:
            dtype = _enclosing(name.rpartition(".")[0], layers)
        if dtype is not None:
            tensor.data = tensor.data.to(dtype)


def _enclosing(module: str, layers: dict[str, torch.dtype | None]) -> torch.dtype | None:
    """The dtype the cast tensors of the nearest module at or above ``module`` that held
    tensors had (None: it held none that were cast, or there is no such module)."""
    while True:
        if module in layers:
            return layers[module]
        if not module:
            return None
        module = module.rpartition(".")[0]
