"""The layerwise runner every calibrated technique uses: one transformer block at a time.

The inputs of the first block are captured once (hidden states plus every keyword the block
is called with: attention mask, position ids, rotary embeddings, ...). Then, for each block
in turn, :class:`LayerwiseRunner` loads it if accelerate offloaded it, moves it to the
compute device, restores it from a per-block checkpoint or hands it to the technique's
``process(block)``, saves it, and runs it on the inputs to produce the next block's inputs,
so later blocks calibrate on what the already-processed blocks output (GPTQ's sequential
scheme). Only one block and its activations need to be on the compute device at a time.

``process`` may do anything to the block: collect statistics through hooks and swap layers
(GPTQ), rescale weights (SmoothQuant), or take gradient steps (learned rounding):
:meth:`Block.forward` runs the block with gradients when asked.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import functools
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from hfcompress.architectures import blocks_of, text_config
from hfcompress.errors import ModelError
from hfcompress.matmul_speed import half_matmul_pays, matmul_speedup, onednn_has
from hfcompress.quant.dispatch import dense_weights

if TYPE_CHECKING:
    from hfcompress.checkpointing import BlockCheckpoint

__all__ = [
    "Block",
    "BlockInputs",
    "LayerwiseRunner",
    "autocast",
    "autocast_dtype",
    "autocast_for",
    "bfloat16_or_warn",
    "block_kinds",
    "capture_block_inputs",
    "compute_device",
    "has_float16",
    "materialize_offloaded",
    "native_bfloat16",
    "native_float16",
    "offloaded_tensors",
    "offloads",
    "propagate",
    "release_memory",
    "run_block",
    "run_model",
    "slow_dtypes",
]

logger = logging.getLogger(__name__)


@dataclass
class BlockInputs:
    """One calibration batch as a block sees it: its positional and keyword arguments.

    In a model whose blocks are of several kinds (``config.layer_types``: Gemma 3's sliding-window
    and full-attention layers), each kind gets keyword arguments of its own (its attention mask,
    its rotary tables): ``by_kind`` holds them, and :meth:`for_kind` gives the inputs of a block of
    one kind."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    by_kind: dict[str, dict[str, Any]] | None = None

    def with_hidden(self, hidden: torch.Tensor) -> BlockInputs:
        return BlockInputs((hidden, *self.args[1:]), self.kwargs, self.by_kind)

    def for_kind(self, kind: str | None) -> BlockInputs:
        if kind is None or self.by_kind is None:
            return self
        return BlockInputs(self.args, self.by_kind[kind], self.by_kind)


def block_kinds(model: nn.Module, blocks: nn.ModuleList) -> list[str] | None:
    """Each block's kind where the model's blocks are of several (``layer_types``, one per block),
    else None: then every block takes the first block's keyword arguments."""
    types = getattr(text_config(model), "layer_types", None)
    if isinstance(types, (list, tuple)) and len(types) == len(blocks) and len(set(types)) > 1:
        return list(types)
    return None


def _offload_hooks(module: nn.Module) -> Iterator[tuple[nn.Module, Any]]:
    for sub in module.modules():
        hook = getattr(sub, "_hf_hook", None)
        if hook is not None:
            yield sub, hook


def offloads(module: nn.Module) -> bool:
    """Whether ``module`` carries an accelerate hook that offloads its tensors (they sit on the
    meta device, their values in the hook's CPU or disk weights map)."""
    return bool(getattr(getattr(module, "_hf_hook", None), "offload", False))


def offloaded_tensors(module: nn.Module) -> Iterator[tuple[nn.Module, str, torch.Tensor]]:
    """``(submodule, name, value)`` for each tensor of ``module`` that accelerate offloaded
    (a meta tensor whose value sits in its hook's CPU or disk weights map)."""
    for sub, hook in _offload_hooks(module):
        weights = getattr(hook, "weights_map", None)
        if getattr(hook, "offload", False) and weights is not None:
            for name, tensor in [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)]:
                if tensor.device.type == "meta":
                    yield sub, name, weights[name]


def materialize_offloaded(
    module: nn.Module, device: torch.device | str = "cpu", *, model: nn.Module | None = None
) -> None:
    """Load the weights accelerate offloaded out of ``module`` onto ``device`` and remove its
    offload hooks, so the module can be run and compressed like one that was always in
    memory. Modules without hooks are left alone. With ``model``, its ``hf_device_map`` is
    updated (transformers reads it when saving)."""
    from accelerate.hooks import remove_hook_from_module
    from accelerate.utils import set_module_tensor_to_device

    hooks = list(_offload_hooks(module))
    if not hooks:
        return
    for sub, name, value in list(offloaded_tensors(module)):
        set_module_tensor_to_device(sub, name, device, value=value)
    for sub, _ in hooks:
        remove_hook_from_module(sub)
        # accelerate puts the class's forward back as a bound method in the instance's dict: a
        # reference cycle that kept every layer a stage replaced (weights and all) alive until
        # the next gc.collect(); the class's own forward is what a plain module calls.
        forward = sub.__dict__.get("forward")
        if getattr(forward, "__self__", None) is sub and getattr(forward, "__func__", None) is type(sub).forward:
            del sub.__dict__["forward"]
    device_map = getattr(model, "hf_device_map", None)
    if isinstance(device_map, dict):
        name = next((n for n, m in model.named_modules() if m is module), None)
        for key in list(device_map):
            if name is not None and (key == name or key.startswith(f"{name}.") or name.startswith(f"{key}.")):
                device_map[key] = str(device)


@functools.cache
def _libc_malloc_trim():
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return getattr(libc, "malloc_trim", None)


def release_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise): between blocks, the
    previous block's activations and temporaries are garbage, and keeping them mapped raised
    the peak RSS of a SmolLM2 GPTQ run by ~13% (1712 -> 1503 MB measured).

    No garbage collection: the blocks' garbage is freed as its references go, and a full
    collection walks every object the process holds (0.2 s with transformers loaded, more in a
    larger process): one per block cost 6 s of a 50 s SmolLM2 GPTQ run and found nothing."""
    trim = _libc_malloc_trim()
    if trim is not None:
        trim(0)


# Cache arguments a block may be called with; calibration runs without a cache.
_CACHE_KWARGS = ("past_key_values", "past_key_value", "cache", "layer_past")


class _Captured(Exception):
    pass


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    return value


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    first_block: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    device: torch.device,
    *,
    blocks: nn.ModuleList | None = None,
    kinds: list[str] | None = None,
) -> list[BlockInputs]:
    """Run ``model`` on each batch until ``first_block`` is reached; return what it received.

    With ``blocks`` and their ``kinds`` (:func:`block_kinds`), the forward goes on to the first
    block of each kind and records the keyword arguments that kind receives (``by_kind``).
    The modules before the first block (embeddings, rotary tables) run on their own devices;
    captured tensors are moved to ``device``.
    """
    captured: list[BlockInputs] = []
    # The first block of each kind after the first block's own (whose arguments `first` records).
    leaders: dict[str, int] = {}
    if blocks is not None and kinds is not None:
        for index, kind in enumerate(kinds):
            leaders.setdefault(kind, index)
        del leaders[kinds[0]]
    last = max(leaders.values(), default=0)

    def keywords(kwargs: dict[str, Any]) -> dict[str, Any]:
        return {k: _to(v, device) for k, v in kwargs.items() if k not in _CACHE_KWARGS}

    def first(module, args, kwargs):
        own = keywords(kwargs)
        captured.append(BlockInputs(_to(args, device), own, {kinds[0]: own} if leaders else None))
        if not leaders:
            raise _Captured

    def leader(kind: str, index: int):
        def hook(module, args, kwargs):
            captured[-1].by_kind[kind] = keywords(kwargs)
            if index == last:
                raise _Captured

        return hook

    handles = [first_block.register_forward_pre_hook(first, with_kwargs=True)]
    handles += [
        blocks[index].register_forward_pre_hook(leader(kind, index), with_kwargs=True)
        for kind, index in leaders.items()
    ]
    model_device = next(model.parameters()).device
    try:
        for batch in batches:
            with contextlib.suppress(_Captured):
                model(**{k: v.to(model_device) for k, v in batch.items()}, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    if len(captured) != len(batches):
        raise ModelError(
            f"the model's forward on the calibration batches never reached its first block "
            f"({type(first_block).__name__}; {len(captured)} of {len(batches)} batches did): the block list found "
            "is not the one these inputs run through. Add an entry for this model_type to "
            "hfcompress.architectures.ARCHITECTURES"
        )
    return captured


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """bfloat16/float16 autocast on ``device`` when ``dtype`` is given; a no-op otherwise."""
    if dtype is None:
        yield
    else:
        with torch.autocast(device.type, dtype=dtype):
            yield


@torch.no_grad()
def run_block(block: nn.Module, inputs: list[BlockInputs], *, compute_dtype: torch.dtype | None = None) -> None:
    """Run ``block`` on every batch, discarding the outputs (the hooks are what matter).
    Quantized layers compute with dense dequantized weights (see ``dense_weights``)."""
    device = inputs[0].args[0].device
    with dense_weights():
        for item in inputs:
            with autocast(device, compute_dtype):
                block(*item.args, **item.kwargs)


def _outputs(block: nn.Module, inputs: list[BlockInputs], compute_dtype: torch.dtype | None) -> Iterator[torch.Tensor]:
    """``block``'s hidden-state output on each batch in turn, in the input dtype."""
    device = inputs[0].args[0].device
    with dense_weights():
        for item in inputs:
            with autocast(device, compute_dtype):
                out = _hidden(block(*item.args, **item.kwargs))
            yield out.to(item.args[0].dtype)


@torch.no_grad()
def propagate(block: nn.Module, inputs: list[BlockInputs], *, compute_dtype: torch.dtype | None = None) -> None:
    """Replace each batch's hidden states, in place, by ``block``'s output on it (kept in the
    input dtype). Each input is freed as soon as its output exists, so only one extra batch
    of activations is alive at a time."""
    for i, out in enumerate(_outputs(block, inputs, compute_dtype)):
        inputs[i] = inputs[i].with_hidden(out)


@functools.cache
def native_bfloat16(device_type: str) -> bool:
    """Whether matrix products in bfloat16 are fast on this kind of device: on a CPU, whether
    oneDNN has a bfloat16 path (AVX-512 or newer; without one, on AVX2-only CPUs, a bfloat16
    matmul runs tens of times slower than float32: 70x measured on an AVX2 EPYC VM) and it is
    clearly faster than float32 here, measured (:mod:`hfcompress.matmul_speed`: 2.2-2.7x on an
    AVX-512 EPYC VM, 0.55-0.65x on an Intel Xeon VM without AMX). On CUDA, whether the GPU
    computes in bfloat16 natively (compute capability 8 or newer), not by emulation. Other
    devices are assumed to."""
    if device_type == "cpu":
        return half_matmul_pays(torch.bfloat16)
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    return True


@functools.cache
def native_float16(device_type: str) -> bool:
    """Whether matrix products in float16 are fast on this kind of device: on a CPU, whether
    oneDNN has a float16 path (AVX-512-FP16 or AMX-FP16; without one a float16 matmul runs
    several times slower than float32: 4.2-4.4x at 4096 x 576 x 1536 on an AVX-512 EPYC VM) and
    it is clearly faster than float32 here, measured (about float32's time on an Intel Xeon VM
    with AVX-512-FP16 and no AMX, where a float16 model's GPTQ ran 1.1-1.2x faster in
    float32). GPUs and other devices are assumed to."""
    if device_type == "cpu":
        return half_matmul_pays(torch.float16)
    return True


def slow_dtypes(model: nn.Module, device: torch.device) -> list[torch.dtype]:
    """The float dtypes of ``model``'s parameters that have no fast matrix multiply on
    ``device``: float16 on most CPUs, bfloat16 on AVX2-only ones (see
    :mod:`hfcompress.upcast`, which runs the stages in float32 instead)."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point() and not p.is_meta}
    native = {torch.float16: native_float16, torch.bfloat16: native_bfloat16}
    return [d for d, fast in native.items() if d in dtypes and not fast(device.type)]


def bfloat16_or_warn(device: torch.device | str, asked: str, instead: str) -> bool:
    """Whether to honour a bfloat16 speed setting (``asked``, as the user wrote it) on
    ``device``: True where :func:`native_bfloat16` holds. Elsewhere False, with one warning
    per setting and device type that names the setting ``instead`` that silences it: there
    bfloat16 would make the work slower, not faster (on CPUs without AVX-512 many times)."""
    device_type = torch.device(device).type
    if native_bfloat16(device_type):
        return True
    if (device_type, asked) not in _WARNED_BF16:
        _WARNED_BF16.add((device_type, asked))
        logger.warning(
            "%s asked for, but this %s has no fast bfloat16 matrix multiply (%s); float32 is used instead, "
            "as it is faster here. Results can differ slightly from a bfloat16 run. Set %s to silence this.",
            asked,
            device_type,
            _bfloat16_speed(device_type),
            instead,
        )
    return False


def _bfloat16_speed(device_type: str) -> str:
    """Why :func:`native_bfloat16` is False on ``device_type``, for a warning."""
    if device_type != "cpu":
        return "it emulates bfloat16"
    if not onednn_has(torch.bfloat16):
        return "no AVX-512: bfloat16 runs tens of times slower than float32"
    return f"measured: a bfloat16 matmul is {matmul_speedup(torch.bfloat16):.2f}x as fast as float32's"


def has_float16(model: nn.Module) -> bool:
    """Whether any of ``model``'s parameters is float16."""
    return any(p.dtype == torch.float16 for p in model.parameters())


def autocast_for(model: nn.Module, dtype: torch.dtype | None) -> torch.dtype | None:
    """The autocast dtype of passes through ``model``: ``dtype``, except none in a float16
    model. A bfloat16 autocast there hands bfloat16 activations to float16 parameters outside
    the autocast ops, which LayerNorm refuses ("mixed dtype (CPU): expect parameter to have
    scalar type of Float", a float16 BERT under GPTQ's ``compute_dtype: bfloat16``); such a
    model's passes run in float16."""
    return None if dtype is not None and has_float16(model) else dtype


def autocast_dtype(name: str, device: torch.device | str) -> torch.dtype | None:
    """A config's ``compute_dtype`` as the autocast dtype of the calibration passes on
    ``device``: ``"bfloat16"`` -> ``torch.bfloat16``, ``"float32"`` -> None (no autocast).

    ``compute_dtype`` is a speed setting, so where ``device`` has no fast bfloat16 path the
    passes run in float32 instead, with a warning (:func:`bfloat16_or_warn`)."""
    if name != "bfloat16":
        return None
    return torch.bfloat16 if bfloat16_or_warn(device, "compute_dtype: bfloat16", "compute_dtype: float32") else None


_WARNED_BF16: set[tuple[str, str]] = set()


def compute_device(model: nn.Module, device: torch.device | None) -> torch.device:
    """Where layerwise work runs: ``device`` if given, else the model's first parameter's
    device (CPU when that is meta, i.e. offloaded)."""
    if device is not None:
        return device
    first = next(model.parameters()).device
    return first if first.type != "meta" else torch.device("cpu")


@torch.no_grad()
def run_model(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> None:
    """Run the whole model on every batch, discarding the outputs (for layers outside the
    blocks, e.g. BERT's pooler, whose hooks need full passes)."""
    model_device = next(model.parameters()).device
    for batch in batches:
        model(**{k: v.to(model_device) for k, v in batch.items()})


@dataclass
class Block:
    """One block as a technique's ``process`` sees it.

    Attributes:
        index: Position among the model's blocks.
        count: Number of blocks.
        prefix: Qualified name of the block followed by a dot (``"model.layers.3."``).
        module: The block, on the compute device.
        inputs: Its calibration inputs, as the blocks before it (already processed) produce them.
        targets: The stage's target layers inside the block, relative to it (``"mlp.up_proj"``).
        compute_dtype: Autocast dtype of the calibration passes, or None.
        reference_inputs: With a runner built with ``reference=True``: the block's inputs in
            the unprocessed model, one per item of ``inputs`` (GPTAQ compares each layer's
            inputs in both); else None.
        float_module: With ``reference=True``: a copy of the block as it was before
            ``process`` (what computes :attr:`reference`); else None.
    """

    index: int
    count: int
    prefix: str
    module: nn.Module
    inputs: list[BlockInputs]
    targets: list[str]
    compute_dtype: torch.dtype | None = None
    reference_inputs: list[BlockInputs] | None = None
    float_module: nn.Module | None = None

    def __post_init__(self) -> None:
        self._reference: list[torch.Tensor | None] = [None] * len(self.reference_inputs or [])

    def run(self) -> None:
        """Run the block on every input without gradients (for hooks that collect statistics)."""
        run_block(self.module, self.inputs, compute_dtype=self.compute_dtype)

    def forward(self, item: BlockInputs, *, grad: bool = False) -> torch.Tensor:
        """The block's hidden-state output on one input; with ``grad``, differentiable with
        respect to the block's parameters (and whatever ``process`` made trainable)."""
        with torch.set_grad_enabled(grad), autocast(item.args[0].device, self.compute_dtype):
            return _hidden(self.module(*item.args, **item.kwargs))

    @torch.no_grad()
    def reference_output(self, i: int) -> torch.Tensor:
        """Run :attr:`float_module` on ``reference_inputs[i]`` (its hooks fire) and return its
        output, which :attr:`reference` then reuses instead of computing it again."""
        if self.float_module is None or self.reference_inputs is None:
            raise RuntimeError("this block has no reference stream: build the runner with reference=True")
        (out,) = _outputs(self.float_module, [self.reference_inputs[i]], self.compute_dtype)
        self._reference[i] = out
        return out

    @property
    def reference(self) -> list[torch.Tensor] | None:
        """With ``reference=True``: the block's outputs in the unprocessed model, one per input
        (the float model's activations, for techniques that fit a block to them rather than
        to its own float output), computed on first use; else None."""
        if self.reference_inputs is None:
            return None
        return [out if out is not None else self.reference_output(i) for i, out in enumerate(self._reference)]


class LayerwiseRunner:
    """Runs a per-block ``process`` over a model's blocks on calibration data.

    Args:
        model: The model; its repeated blocks are found by :func:`hfcompress.architectures.blocks_of`.
        batches: Calibration batches (``{"input_ids": [B, T]}``).
        device: Compute device of the block being processed.
        compute_dtype: Autocast dtype of the calibration passes (None: the model's dtype).
        checkpoint: Per-block checkpoint; finished blocks are restored from it instead of
            being processed again.
        progress: Show a progress bar.
        desc: Its label.
        reference: Also carry the unprocessed model's activations through the blocks (a
            second stream, as much memory as the calibration inputs) and hand each block its
            outputs there as :attr:`Block.reference`.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: list[dict[str, torch.Tensor]],
        *,
        device: torch.device,
        compute_dtype: torch.dtype | None = None,
        checkpoint: BlockCheckpoint | None = None,
        progress: bool = True,
        desc: str = "blocks",
        reference: bool = False,
    ) -> None:
        self.model = model
        self.batches = batches
        self.device = device
        self.compute_dtype = autocast_for(model, compute_dtype)
        self.checkpoint = checkpoint
        self.progress = progress
        self.desc = desc
        self.reference = reference
        self.prefix = ""  # the block list's qualified name, once `run` found it

    @torch.no_grad()
    def run(self, process: Callable[[Block], None], targets: Iterable[str] = ()) -> None:
        """Process every block that holds a target (blocks without one only propagate).

        Args:
            process: The technique's work on one block, in place. It is called under
                ``torch.no_grad()``; gradient steps go inside ``torch.enable_grad()``.
            targets: Qualified names of the layers the stage targets.
        """
        prefix, blocks = blocks_of(self.model)
        self.prefix = prefix
        targets = list(targets)
        kinds = block_kinds(self.model, blocks)
        inputs = capture_block_inputs(self.model, blocks[0], self.batches, self.device, blocks=blocks, kinds=kinds)
        reference = list(inputs) if self.reference else None  # the unprocessed model's stream
        release_memory()
        count = len(blocks)
        if self.checkpoint is not None:
            done = self.checkpoint.completed(count)
            if done:
                logger.info("%s: resuming after block %d of %d (%s)", self.desc, done, count, self.checkpoint.directory)
        for index, block in enumerate(tqdm(blocks, desc=self.desc, disable=not self.progress)):
            local = f"{prefix}.{index}."
            names = [n.removeprefix(local) for n in targets if n.startswith(local)]
            # A block accelerate offloaded to CPU or disk is loaded into memory for good: once
            # compressed it is a fraction of its float size.
            materialize_offloaded(block, model=self.model)
            home = next(block.parameters(), next(block.buffers(), torch.empty(0))).device
            block.to(self.device)
            # The unprocessed block, for the reference stream: a technique that runs it there
            # anyway (GPTAQ) leaves its outputs in `view`, so that pass is not repeated.
            float_block = copy.deepcopy(block) if reference is not None else None
            if kinds is not None:  # this block's own attention mask and rotary tables
                inputs = [item.for_kind(kinds[index]) for item in inputs]
                if reference is not None:
                    reference = [item.for_kind(kinds[index]) for item in reference]
            view = Block(index, count, local, block, inputs, names, self.compute_dtype, reference, float_block)
            if names:
                if self.checkpoint is not None and self.checkpoint.has(index):
                    self.checkpoint.load(index, block)
                else:
                    process(view)
                    if self.checkpoint is not None:
                        self.checkpoint.save(index, block)
            propagate(block, inputs, compute_dtype=self.compute_dtype)
            if reference is not None:
                reference = [item.with_hidden(out) for item, out in zip(reference, view.reference, strict=True)]
            del view, float_block
            release_memory()
            block.to(home)
        del inputs, reference
