"""Applies :class:`SmoothQuantConfig` block by block: find the mappings (or take the given
ones), measure each mapping's input ranges, choose alpha, fold the factors in."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from hfcompress.architectures import blocks_of
from hfcompress.errors import CalibrationDataError, ModelError
from hfcompress.kinds import CompressedModule, is_linear_like, linear_features, linear_weight
from hfcompress.layerwise import Block, BlockInputs, LayerwiseRunner, autocast_dtype, compute_device
from hfcompress.modifier import CompressionContext, ModelView, Modifier
from hfcompress.norms import norm_offset, set_norm_gain
from hfcompress.quant.activations import fake_quantize_activations
from hfcompress.quant.scheme import QuantArgs
from hfcompress.targets import matches
from hfcompress.techniques.smoothquant.algorithm import fake_quantize_weight_per_channel, smoothing_scales
from hfcompress.techniques.smoothquant.config import SmoothQuantConfig, parse_mapping

__all__ = ["Mapping", "SmoothQuantModifier", "output_size", "smooth", "to_source"]

logger = logging.getLogger(__name__)

# Linear -> linear pairs tried where the shapes allow: (earlier layer, later layer), by name.
_LINEAR_PAIRS = (
    (re.compile(r"(^|\.)(v_proj|value)$"), re.compile(r"(^|\.)(o_proj|out_proj)$|attention\.output\.dense$")),
    (re.compile(r"(^|\.)up_proj$"), re.compile(r"(^|\.)down_proj$")),
)
_PER_TOKEN = QuantArgs(num_bits=8, symmetric=True, strategy="token", dynamic=True, zp_dtype=None, observer=None)
# Largest relative change of the block output that random factors may cause for a mapping
# to count as exact, by the dtype the block computes in. float32 round-off of a smoothed block
# is ~1e-6; bfloat16's was 1.3e-3 to 6.1e-3 on SmolLM2's blocks (1e-3 judged every mapping
# inexact, so a bfloat16 model was not smoothed at all), float16's under 1e-3; a mapping that
# is not an identity (BERT's post-norm residual) changes it by ~0.7.
_EXACT_TOL = {torch.float32: 1e-3, torch.float64: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _exact_tolerance(block: Block, output: torch.Tensor) -> float:
    """The tolerance of the least precise dtype the block computes in (float32's for a dtype the
    table does not name, the one tolerance every dtype had before)."""
    dtypes = {output.dtype, block.compute_dtype, *(p.dtype for p in block.module.parameters())}
    default = _EXACT_TOL[torch.float32]
    return max(_EXACT_TOL.get(d, default) for d in dtypes if d is not None and d.is_floating_point)


@dataclass(frozen=True)
class Mapping:
    """One smoothing: ``source`` (a norm, or a linear whose output rows are divided) feeds
    ``readers`` (linears whose input columns are multiplied); names relative to the block.

    ``groups > 1`` is grouped-query attention's v -> o: o's input channel ``h * D + d`` (query
    head ``h``, ``D = head_dim``) reads v's channel ``(h // groups) * D + d``, so one factor
    per v channel multiplies the ``groups`` o columns that read it."""

    source: str
    readers: tuple[str, ...]
    groups: int = 1
    head_dim: int = 0

    def reader_index(self, size: int, device: torch.device) -> torch.Tensor | None:
        """For each of the readers' ``size`` input channels, the source channel it reads
        (None when they are the same channels)."""
        if self.groups == 1:
            return None
        i = torch.arange(size, device=device)
        return (i // self.head_dim // self.groups) * self.head_dim + i % self.head_dim


def _divide_outputs(module: nn.Module, s: torch.Tensor) -> None:
    if is_linear_like(module):
        linear_weight(module).div_(s.to(module.weight.dtype)[:, None])
    else:
        try:  # a norm: its gain (Gemma's is 1 + weight) divided by s
            offset = norm_offset(module)
        except ValueError:  # not a plain gain: divide the weight, and the exactness check decides
            offset = 0.0
        if offset:
            set_norm_gain(module, (module.weight.detach().double() + offset) / s.double(), offset)
        else:
            module.weight.div_(s.to(module.weight.dtype))
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.div_(s.to(bias.dtype))


def smooth(block: nn.Module, mapping: Mapping, s: torch.Tensor) -> None:
    """Divide ``source``'s output channels by ``s`` and multiply the readers' columns by it."""
    _divide_outputs(block.get_submodule(mapping.source), s)
    for name in mapping.readers:
        layer = block.get_submodule(name)
        w = linear_weight(layer)
        index = mapping.reader_index(w.shape[1], s.device)
        w.mul_((s if index is None else s[index]).to(w.dtype)[None, :])


def to_source(mapping: Mapping, values: torch.Tensor, size: int, reduce: str = "amax") -> torch.Tensor:
    """Per-reader-channel statistics ``[K]`` reduced (``"amax"`` or ``"mean"``) to the
    source's ``size`` channels."""
    index = mapping.reader_index(values.numel(), values.device)
    if index is None:
        return values
    out = torch.zeros(size, dtype=values.dtype, device=values.device)
    return out.scatter_reduce_(0, index, values, reduce, include_self=False)


def output_size(module: nn.Module) -> int | None:
    if is_linear_like(module):
        return linear_features(module)[1]
    weight = getattr(module, "weight", None)
    return weight.numel() if isinstance(weight, torch.Tensor) and weight.dim() == 1 else None


@contextmanager
def _restorable(block: nn.Module, mappings: list[Mapping]):
    """Put back every tensor the mappings touch on exit."""
    names = {m.source for m in mappings} | {r for m in mappings for r in m.readers}
    saved = [(t, t.detach().clone()) for n in names for t in block.get_submodule(n).parameters(recurse=False)]
    try:
        yield
    finally:
        for tensor, copy in saved:
            tensor.data.copy_(copy)


@contextmanager
def _fake_quantized(block: nn.Module, names: set[str], weight_bits: int):
    """Inside, the named linears compute with per-channel ``weight_bits`` weights and 8-bit
    per-token inputs (the W8A8 / W4A8 that the smoothing prepares for)."""
    handles, saved = [], []
    for name in names:
        layer = block.get_submodule(name)
        w = linear_weight(layer)
        saved.append((w, w.detach().clone()))
        w.data.copy_(fake_quantize_weight_per_channel(w, weight_bits))
        handles.append(layer.register_forward_pre_hook(lambda _m, a: (fake_quantize_activations(a[0], _PER_TOKEN),)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for w, copy in saved:
            w.data.copy_(copy)


class SmoothQuantModifier(Modifier):
    config: SmoothQuantConfig
    description = "SmoothQuant"  # messages and the progress bar's label
    # What this stage prepares the float weights for, in words, and an example of the stages
    # after it that do it (:meth:`_followers` gives their types).
    prepares = "int8 activations or weight quantization"
    example = "recipes/llama_w8a8_static_smoothquant.yaml: rtn with bits 8, then int8_activations"

    def __init__(self, config: SmoothQuantConfig, stage: str) -> None:
        super().__init__(config, stage)
        self._batches: list[dict[str, torch.Tensor]] = []
        self._explicit = [Mapping(*parse_mapping(text)) for text in config.mappings]
        self.applied: dict[str, list[Mapping]] = {}  # block prefix -> mappings smoothed
        self.alphas: dict[str, dict[str, float | None]] = {}  # block prefix -> {source: alpha; AWQ: None = unscaled}

    def _followers(self) -> tuple[type, ...]:
        from hfcompress.techniques.activations.modifier import ActivationQuantModifier
        from hfcompress.techniques.weight_quant import WeightQuantModifier

        return (WeightQuantModifier, ActivationQuantModifier)

    def check_later_stages(self, later: list[Modifier]) -> None:
        # Alone, this stage leaves a float model with the same function: nothing compressed.
        if not any(isinstance(m, self._followers()) for m in later):
            raise self.error(
                f"{self.description} only rescales the float model for {self.prepares} in a later stage, and no later "
                f"stage of this recipe does that: the model would stay float. Add it after this stage ({self.example})"
            )

    def check(self, model: nn.Module, context: CompressionContext, view: ModelView) -> None:
        super().check(model, context, view)
        try:
            prefix, blocks = blocks_of(model)
        except ModelError as exc:
            raise self.error(str(exc)) from None
        # compressed by an earlier stage of this recipe, or by an earlier run (a compressed
        # checkpoint, an earlier compress() call): either way not float any more
        done = [
            n
            for n, e in view.entries.items()
            if n.startswith(f"{prefix}.") and (e.stage is not None or isinstance(e.module, CompressedModule))
        ]
        if done:
            entry = view.entries[done[0]]
            by = f"stage {entry.stage!r}" if entry.stage is not None else "an earlier run"
            raise self.error(
                f"layer {done[0]!r} is already compressed by {by}: {self.description} rescales float weights, so "
                "put it before the weight stages (of the same recipe, on the float model)"
            )
        self._explicit = [self._check_mapping(blocks[0], mapping) for mapping in self._explicit]
        self._batches = self.calibration_batches(model, context, self.config.batch_size)

    def _check_mapping(self, block: nn.Module, mapping: Mapping) -> Mapping:
        """``mapping`` checked against ``block``; a one-reader linear-to-linear mapping whose
        reader is wider than its source becomes grouped-query attention's v -> o where the
        shapes allow (as the discovery finds it)."""
        try:
            source = block.get_submodule(mapping.source)
            readers = [block.get_submodule(r) for r in mapping.readers]
        except AttributeError as exc:
            raise self.error(f"mapping {mapping.source} -> {', '.join(mapping.readers)}: {exc}") from None
        size = output_size(source)
        for name, layer in zip(mapping.readers, readers, strict=True):
            if not is_linear_like(layer):
                raise self.error(f"mapping reader {name!r} is a {type(layer).__name__}, not a float linear layer")
            k = linear_features(layer)[0]
            if size != k:
                grouped = _pair(block, mapping.source, name) if len(readers) == 1 and is_linear_like(source) else None
                if grouped is not None:
                    return grouped
                raise self.error(
                    f"mapping {mapping.source} -> {name}: the shapes disagree: {mapping.source!r} gives {size} "
                    f"channels and {name!r} reads {k}"
                )
        return mapping

    @torch.no_grad()
    def apply(self, model: nn.Module, context: CompressionContext) -> None:
        cfg = self.config
        runner = LayerwiseRunner(
            model,
            self._batches,
            device=(device := compute_device(model, context.device)),
            compute_dtype=autocast_dtype(cfg.compute_dtype, device),
            progress=context.progress,
            desc=f"{self.stage}: {self.description} blocks",
        )
        prefix, _ = blocks_of(model)
        everything = [n for n, m in model.named_modules() if n.startswith(f"{prefix}.") and is_linear_like(m)]
        runner.run(self._process, everything)
        total = sum(len(m) for m in self.applied.values())
        if total == 0:
            logger.warning(
                "stage %r: no mapping was smoothable in any block (none was found, the rest were ignored, or each "
                "changed its block's output when smoothed: the INFO log names those), so the stage changed nothing",
                self.stage,
            )
        else:
            logger.info("stage %r: smoothed %d mappings in %d blocks", self.stage, total, len(self.applied))

    # -- one block -----------------------------------------------------------------------------

    def _process(self, block: Block) -> None:
        mappings = self._mappings(block)
        if mappings:
            self._smooth_block(block, mappings)
            self.applied[block.prefix] = mappings
            logger.debug("%s: alphas %s", block.prefix, self.alphas[block.prefix])

    def _mappings(self, block: Block) -> list[Mapping]:
        """The block's mappings: the explicit ones (each must be an identity), or those
        discovered, not ignored, and found to be an identity."""
        module = block.module
        ignored = {
            n
            for n, m in module.named_modules()
            if any(matches(block.prefix + n, type(m).__name__, p) for p in self.config.ignore)
        }
        probe = _probe(block)
        output = block.forward(probe)
        reference, tolerance = output.float(), _exact_tolerance(block, output)
        if self._explicit:
            for mapping in self._explicit:
                if not self._is_exact(block, mapping, probe, reference, tolerance):
                    raise self.error(
                        f"mapping {mapping.source} -> {', '.join(mapping.readers)} changes the output of block "
                        f"{block.prefix[:-1]!r}: smoothing it is not an identity there"
                    )
            mappings = self._explicit
        else:
            mappings = [m for m in self._discover(block, probe) if not ignored & {m.source, *m.readers}]
            mappings = [m for m in mappings if self._is_exact(block, m, probe, reference, tolerance)]
        return mappings

    def _smooth_block(self, block: Block, mappings: list[Mapping]) -> None:
        """Choose each mapping's factors and fold them in (recording the alphas)."""
        absmax = self._input_ranges(block, mappings)
        alphas = self._choose_alphas(block, mappings, absmax)
        for mapping in mappings:
            s = self._scales(block.module, mapping, absmax[mapping.source], alphas[mapping.source])
            smooth(block.module, mapping, s)
        self.alphas[block.prefix] = alphas

    def _discover(self, block: Block, probe: BlockInputs) -> list[Mapping]:
        """Norms read only through linears, by tracing which tensor each linear reads; plus the
        linear -> linear pairs whose shapes match."""
        module = block.module
        outputs: dict[str, torch.Tensor] = {}
        inputs: dict[str, torch.Tensor] = {}
        handles = []
        linears = {n: m for n, m in module.named_modules() if is_linear_like(m)}
        for name, sub in module.named_modules():
            if name and "norm" in type(sub).__name__.lower() and output_size(sub) is not None:
                handles.append(sub.register_forward_hook(lambda _m, _a, out, n=name: outputs.setdefault(n, out)))
        for name, layer in linears.items():
            handles.append(layer.register_forward_pre_hook(lambda _m, a, n=name: inputs.setdefault(n, a[0])))
        try:
            block.forward(probe)
        finally:
            for handle in handles:
                handle.remove()
        found = []
        for norm, out in outputs.items():
            readers = tuple(n for n, x in inputs.items() if x is out)
            if readers:
                found.append(Mapping(norm, readers))
        for before, after in _LINEAR_PAIRS:
            firsts = [n for n in linears if before.search(n)]
            seconds = [n for n in linears if after.search(n)]
            if len(firsts) == 1 and len(seconds) == 1:
                mapping = _pair(module, firsts[0], seconds[0])
                if mapping is not None:
                    found.append(mapping)
        return found

    def _is_exact(
        self, block: Block, mapping: Mapping, probe: BlockInputs, reference: torch.Tensor, tolerance: float
    ) -> bool:
        """Smoothing ``mapping`` with random factors leaves the block's output on ``probe``
        (``reference`` before smoothing) unchanged, within ``tolerance`` (relative)."""
        module = block.module
        size = output_size(module.get_submodule(mapping.source))
        g = torch.Generator().manual_seed(0)
        s = torch.exp(torch.empty(size).uniform_(-1, 1, generator=g)).to(reference.device)
        with _restorable(module, [mapping]):
            smooth(module, mapping, s)
            changed = block.forward(probe).float()
        error = float((changed - reference).abs().max() / reference.abs().max().clamp(min=1e-12))
        if error > tolerance:
            logger.info(
                "%s: %s -> %s is not smoothable (output change %.2g)",
                block.prefix,
                mapping.source,
                ",".join(mapping.readers),
                error,
            )
        return error <= tolerance

    def _watch_inputs(
        self, block: Block, mappings: list[Mapping], record: Callable[[str, torch.Tensor], torch.Tensor]
    ) -> None:
        """Run the calibration data through the block, calling ``record(source, x)`` with each
        mapping's input as ``[tokens, channels]``. ``record`` returns the per-channel statistic
        it reduced ``x`` to; a NaN or an infinity there is an error that names the layer (so
        the check costs no pass over ``x`` of its own)."""
        handles = []
        for mapping in mappings:
            reader = mapping.readers[0]

            def hook(_m, args, source=mapping.source, reader=reader):
                x = args[0].detach()
                if not torch.isfinite(record(source, x.reshape(-1, x.shape[-1]))).all():
                    raise CalibrationDataError(
                        f"stage {self.stage!r}: the calibration inputs of layer {block.prefix + reader!r} hold NaN or "
                        "infinite values; the model overflows on this data before this layer"
                    )

            handles.append(block.module.get_submodule(reader).register_forward_pre_hook(hook))
        try:
            block.run()
        finally:
            for handle in handles:
                handle.remove()

    def _input_ranges(self, block: Block, mappings: list[Mapping]) -> dict[str, torch.Tensor]:
        """Per-channel ``max|x|`` of each mapping's input over the calibration data."""
        absmax: dict[str, torch.Tensor] = {}

        def record(source: str, x: torch.Tensor) -> torch.Tensor:
            amax = x.abs().amax(dim=0).float()
            absmax[source] = torch.maximum(absmax[source], amax) if source in absmax else amax
            return amax

        self._watch_inputs(block, mappings, record)
        return absmax

    def _scales(self, module: nn.Module, mapping: Mapping, act_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
        """The factors ``[source channels]`` for ``mapping`` at strength ``alpha``."""
        weights = [linear_weight(module.get_submodule(r)).detach().abs().float() for r in mapping.readers]
        weight_absmax = torch.stack([w.amax(dim=0) for w in weights]).amax(dim=0)
        size = output_size(module.get_submodule(mapping.source))
        act = to_source(mapping, act_absmax.to(weight_absmax.device), size)
        return smoothing_scales(act, to_source(mapping, weight_absmax, size), alpha)

    def _choose_alphas(
        self, block: Block, mappings: list[Mapping], absmax: dict[str, torch.Tensor]
    ) -> dict[str, float]:
        """Each mapping's alpha: ``alpha``, or with ``alpha_grid`` the grid value that brings the
        fake-quantized block closest to the float block, chosen one mapping at a time in block
        order (the others held at their current choice: coordinate descent, one sweep)."""
        cfg = self.config
        alphas = {m.source: cfg.alpha for m in mappings}
        if not cfg.alpha_grid:
            return alphas
        module = block.module
        readers = {r for m in mappings for r in m.readers}
        inputs = block.inputs[: cfg.search_batches]
        targets = [block.forward(item).float() for item in inputs]

        def loss() -> float:
            with _restorable(module, mappings):
                for m in mappings:
                    smooth(module, m, self._scales(module, m, absmax[m.source], alphas[m.source]))
                with _fake_quantized(module, readers, cfg.search_weight_bits):
                    return sum(
                        float((block.forward(item).float() - t).pow(2).mean())
                        for item, t in zip(inputs, targets, strict=True)
                    )

        for mapping in mappings:
            losses = {}
            for alpha in cfg.alpha_grid:
                alphas[mapping.source] = alpha
                losses[alpha] = loss()
            alphas[mapping.source] = min(losses, key=losses.get)
            logger.debug("%s%s: alpha losses %s", block.prefix, mapping.source, losses)
        return alphas


def _pair(block: nn.Module, first: str, second: str) -> Mapping | None:
    """``first -> second`` when ``second`` reads ``first``'s channels one to one, or, under
    grouped-query attention, each of them ``groups`` times (the attention module that holds
    ``second`` says its ``head_dim``); None when the shapes allow neither."""
    out, k = output_size(block.get_submodule(first)), linear_features(block.get_submodule(second))[0]
    if out == k:
        return Mapping(first, (second,))
    parent = block.get_submodule(second.rpartition(".")[0]) if "." in second else block
    head_dim = getattr(parent, "head_dim", None)
    if isinstance(head_dim, int) and head_dim > 0 and out and k % out == 0 and out % head_dim == 0:
        return Mapping(first, (second,), groups=k // out, head_dim=head_dim)
    return None


def _probe(block: Block) -> BlockInputs:
    """The first calibration batch cut to its first sequence (every batched tensor argument
    with it): enough to trace the block or test a mapping, at a fraction of the cost."""
    item = block.inputs[0]
    batch = item.args[0].shape[0]

    def first(value):
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == batch:
            return value[:1]
        if isinstance(value, tuple):
            return tuple(first(v) for v in value)
        return value

    if batch == 1:
        return item
    return BlockInputs(tuple(first(a) for a in item.args), {k: first(v) for k, v in item.kwargs.items()})
