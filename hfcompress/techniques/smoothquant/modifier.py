"""Applies :class:`SmoothQuantConfig` block by block: find the mappings (or take the given
ones), measure each mapping's input ranges, choose alpha, fold the factors in."""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from hfcompress.architectures import blocks_of
from hfcompress.errors import CalibrationDataError, ModelError
from hfcompress.kinds import is_linear_like, linear_features, linear_weight
from hfcompress.layerwise import Block, LayerwiseRunner, compute_device
from hfcompress.modifier import CompressionContext, ModelView, Modifier
from hfcompress.quant.activations import fake_quantize_activations
from hfcompress.quant.scheme import QuantArgs
from hfcompress.targets import matches
from hfcompress.techniques.smoothquant.algorithm import fake_quantize_weight_per_channel, smoothing_scales
from hfcompress.techniques.smoothquant.config import SmoothQuantConfig, parse_mapping

__all__ = ["Mapping", "SmoothQuantModifier"]

logger = logging.getLogger(__name__)

# Linear -> linear pairs tried where the shapes allow: (earlier layer, later layer), by name.
_LINEAR_PAIRS = (
    (re.compile(r"(^|\.)(v_proj|value)$"), re.compile(r"(^|\.)(o_proj|out_proj)$|attention\.output\.dense$")),
    (re.compile(r"(^|\.)up_proj$"), re.compile(r"(^|\.)down_proj$")),
)
_PER_TOKEN = QuantArgs(num_bits=8, symmetric=True, strategy="token", dynamic=True, zp_dtype=None, observer=None)
# Largest relative change of the block output that random factors may cause for a mapping
# to count as exact (float32 round-off of a smoothed block is ~1e-6).
_EXACT_TOL = 1e-3


@dataclass
class Mapping:
    """One smoothing: ``source`` (a norm, or a linear whose output rows are divided) feeds
    ``readers`` (linears whose input columns are multiplied); names relative to the block."""

    source: str
    readers: tuple[str, ...]


def _divide_outputs(module: nn.Module, s: torch.Tensor) -> None:
    if is_linear_like(module):
        linear_weight(module).div_(s.to(module.weight.dtype)[:, None])
    else:
        module.weight.div_(s.to(module.weight.dtype))
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.div_(s.to(bias.dtype))


def _smooth(block: nn.Module, mapping: Mapping, s: torch.Tensor) -> None:
    _divide_outputs(block.get_submodule(mapping.source), s)
    for name in mapping.readers:
        layer = block.get_submodule(name)
        linear_weight(layer).mul_(s.to(layer.weight.dtype)[None, :])


def _output_size(module: nn.Module) -> int | None:
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

    def __init__(self, config: SmoothQuantConfig, stage: str) -> None:
        super().__init__(config, stage)
        self._batches: list[dict[str, torch.Tensor]] = []
        self._explicit = [Mapping(*parse_mapping(text)) for text in config.mappings]
        self.applied: dict[str, list[Mapping]] = {}  # block prefix -> mappings smoothed
        self.alphas: dict[str, float] = {}  # block prefix -> alpha used

    def check(self, model: nn.Module, context: CompressionContext, view: ModelView) -> None:
        super().check(model, context, view)
        try:
            prefix, blocks = blocks_of(model)
        except ModelError as exc:
            raise self.error(str(exc)) from None
        done = [n for n, e in view.entries.items() if n.startswith(f"{prefix}.") and e.stage is not None]
        if done:
            raise self.error(
                f"layer {done[0]!r} is already compressed by stage {view.entries[done[0]].stage!r}: SmoothQuant "
                "rescales float weights, so put it before the weight stages"
            )
        for mapping in self._explicit:
            self._check_mapping(blocks[0], mapping)
        self._batches = self.calibration_batches(model, context, self.config.batch_size)

    def _check_mapping(self, block: nn.Module, mapping: Mapping) -> None:
        try:
            source = block.get_submodule(mapping.source)
            readers = [block.get_submodule(r) for r in mapping.readers]
        except AttributeError as exc:
            raise self.error(f"mapping {mapping.source} -> {', '.join(mapping.readers)}: {exc}") from None
        size = _output_size(source)
        for name, layer in zip(mapping.readers, readers, strict=True):
            if not is_linear_like(layer):
                raise self.error(f"mapping reader {name!r} is a {type(layer).__name__}, not a float linear layer")
            k = linear_features(layer)[0]
            if size != k:
                raise self.error(
                    f"mapping {mapping.source} -> {name}: the shapes disagree: {mapping.source!r} gives {size} "
                    f"channels and {name!r} reads {k}"
                )

    @torch.no_grad()
    def apply(self, model: nn.Module, context: CompressionContext) -> None:
        cfg = self.config
        runner = LayerwiseRunner(
            model,
            self._batches,
            device=compute_device(model, context.device),
            compute_dtype=torch.bfloat16 if cfg.compute_dtype == "bfloat16" else None,
            progress=context.progress,
            desc=f"{self.stage}: SmoothQuant blocks",
        )
        prefix, _ = blocks_of(model)
        everything = [n for n, m in model.named_modules() if n.startswith(f"{prefix}.") and is_linear_like(m)]
        runner.run(self._process, everything)
        total = sum(len(m) for m in self.applied.values())
        logger.info("stage %r: smoothed %d mappings in %d blocks", self.stage, total, len(self.applied))

    # -- one block -----------------------------------------------------------------------------

    def _process(self, block: Block) -> None:
        module = block.module
        ignored = {
            n
            for n, m in module.named_modules()
            if any(matches(block.prefix + n, type(m).__name__, p) for p in self.config.ignore)
        }
        if self._explicit:
            for mapping in self._explicit:
                if not self._is_exact(block, mapping):
                    raise self.error(
                        f"mapping {mapping.source} -> {', '.join(mapping.readers)} changes the output of block "
                        f"{block.prefix[:-1]!r}: smoothing it is not an identity there"
                    )
            mappings = self._explicit
        else:
            mappings = [m for m in self._discover(block) if not ignored & {m.source, *m.readers}]
            mappings = [m for m in mappings if self._is_exact(block, m)]
        if not mappings:
            return
        absmax = self._input_ranges(block, mappings)
        alpha = self._choose_alpha(block, mappings, absmax)
        for mapping in mappings:
            _smooth(module, mapping, self._scales(module, mapping, absmax[mapping.source], alpha))
        self.applied[block.prefix] = mappings
        self.alphas[block.prefix] = alpha
        logger.debug("%s: alpha %.2f, %s", block.prefix, alpha, [(m.source, m.readers) for m in mappings])

    def _discover(self, block: Block) -> list[Mapping]:
        """Norms read only through linears, by tracing which tensor each linear reads; plus the
        linear -> linear pairs whose shapes match."""
        module = block.module
        outputs: dict[str, torch.Tensor] = {}
        inputs: dict[str, torch.Tensor] = {}
        handles = []
        linears = {n: m for n, m in module.named_modules() if is_linear_like(m)}
        for name, sub in module.named_modules():
            if name and "norm" in type(sub).__name__.lower() and _output_size(sub) is not None:
                handles.append(sub.register_forward_hook(lambda _m, _a, out, n=name: outputs.setdefault(n, out)))
        for name, layer in linears.items():
            handles.append(layer.register_forward_pre_hook(lambda _m, a, n=name: inputs.setdefault(n, a[0])))
        try:
            block.forward(_probe(block))
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
                mapping = Mapping(firsts[0], (seconds[0],))
                if _output_size(linears[firsts[0]]) == linear_features(linears[seconds[0]])[0]:
                    found.append(mapping)
        return found

    def _is_exact(self, block: Block, mapping: Mapping) -> bool:
        """Smoothing ``mapping`` with random factors leaves the block's output unchanged."""
        module = block.module
        probe = _probe(block)
        reference = block.forward(probe).float()
        size = _output_size(module.get_submodule(mapping.source))
        g = torch.Generator().manual_seed(0)
        s = torch.exp(torch.empty(size).uniform_(-1, 1, generator=g)).to(reference.device)
        with _restorable(module, [mapping]):
            _smooth(module, mapping, s)
            changed = block.forward(probe).float()
        error = float((changed - reference).abs().max() / reference.abs().max().clamp(min=1e-12))
        if error > _EXACT_TOL:
            logger.info(
                "%s: %s -> %s is not smoothable (output change %.2g)",
                block.prefix,
                mapping.source,
                ",".join(mapping.readers),
                error,
            )
        return error <= _EXACT_TOL

    def _input_ranges(self, block: Block, mappings: list[Mapping]) -> dict[str, torch.Tensor]:
        """Per-channel ``max|x|`` of each mapping's input over the calibration data."""
        absmax: dict[str, torch.Tensor] = {}
        handles = []
        for mapping in mappings:
            reader = mapping.readers[0]

            def hook(_m, args, source=mapping.source, reader=reader):
                x = args[0].detach()
                amax = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
                if not torch.isfinite(amax).all():
                    raise CalibrationDataError(
                        f"stage {self.stage!r}: the calibration inputs of layer {block.prefix + reader!r} hold NaN or "
                        "infinite values; the model overflows on this data before this layer"
                    )
                absmax[source] = torch.maximum(absmax[source], amax) if source in absmax else amax

            handles.append(block.module.get_submodule(reader).register_forward_pre_hook(hook))
        try:
            block.run()
        finally:
            for handle in handles:
                handle.remove()
        return absmax

    def _scales(self, module: nn.Module, mapping: Mapping, act_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
        weights = [linear_weight(module.get_submodule(r)).detach().abs().float() for r in mapping.readers]
        weight_absmax = torch.stack([w.amax(dim=0) for w in weights]).amax(dim=0)
        return smoothing_scales(act_absmax.to(weight_absmax.device), weight_absmax, alpha)

    def _choose_alpha(self, block: Block, mappings: list[Mapping], absmax: dict[str, torch.Tensor]) -> float:
        cfg = self.config
        if not cfg.alpha_grid:
            return cfg.alpha
        module = block.module
        readers = {r for m in mappings for r in m.readers}
        targets = [block.forward(item).float() for item in block.inputs]
        losses = {}
        for alpha in cfg.alpha_grid:
            with _restorable(module, mappings):
                for mapping in mappings:
                    _smooth(module, mapping, self._scales(module, mapping, absmax[mapping.source], alpha))
                with _fake_quantized(module, readers, cfg.search_weight_bits):
                    losses[alpha] = sum(
                        float((block.forward(item).float() - t).pow(2).mean())
                        for item, t in zip(block.inputs, targets, strict=True)
                    )
        best = min(losses, key=losses.get)
        logger.debug("%s: alpha losses %s -> %.2f", block.prefix, losses, best)
        return best


def _probe(block: Block):
    """The first calibration batch cut to one sequence: enough to trace or test a mapping."""
    item = block.inputs[0]
    hidden = item.args[0]
    if hidden.shape[0] <= 1:
        return item
    return item.with_hidden(hidden[:1]) if not _batched_kwargs(item, hidden.shape[0]) else item


def _batched_kwargs(item, batch: int) -> bool:
    # Masks and position tensors carry the batch dimension; cutting the hidden states alone
    # would mismatch them, so the probe keeps the whole batch then.
    return any(
        isinstance(v, torch.Tensor) and v.dim() > 1 and v.shape[0] == batch and batch > 1 for v in item.kwargs.values()
    )
