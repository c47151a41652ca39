"""Applies :class:`LowRankConfig`: each targeted Linear becomes a ``LowRankLinear``.

:class:`FactorModifier` is the plumbing the low-rank stages share (``low_rank`` here and
``error_compensation``): it runs the calibrated ones block by block on the layerwise runner,
with hooks gathering each target's input statistics, and calls the stage's ``factor`` on
each layer once its block has run; stages that need no calibration visit the layers in turn.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from hfcompress.architectures import blocks_of
from hfcompress.checkpointing import BlockCheckpoint, run_fingerprint
from hfcompress.errors import ModelError
from hfcompress.input_stats import InputHessianHooks
from hfcompress.kinds import linear_features, linear_weight, swap_module
from hfcompress.layerwise import Block, LayerwiseRunner, autocast_dtype, compute_device, run_model
from hfcompress.modifier import CompressionContext, ModelView, Modifier
from hfcompress.techniques.low_rank.algorithm import (
    Whitening,
    asvd_scaling,
    factorize,
    rank_for_budget,
    rank_for_energy,
    rank_for_ratio,
    whitening,
)
from hfcompress.techniques.low_rank.config import LowRankConfig
from hfcompress.techniques.low_rank.layer import LowRankLinear
from hfcompress.techniques.weight_quant import WeightQuantModifier

__all__ = ["FactorModifier", "LayerStats", "LowRankModifier"]

logger = logging.getLogger(__name__)


class LayerStats:
    """What calibration measured about one layer's inputs (None where nothing was gathered).

    Attributes:
        xtx: ``[K, K]`` float32 ``sum x x^T``.
        abs_mean: ``[K]`` mean ``|x|`` per input channel.
    """

    def __init__(self, xtx: torch.Tensor | None = None, abs_mean: torch.Tensor | None = None) -> None:
        self.xtx = xtx
        self.abs_mean = abs_mean


class FactorModifier(Modifier):
    """Shared lifecycle of the low-rank stages; subclasses set ``planned`` in ``check`` and
    implement :meth:`factor`."""

    def __init__(self, config, stage: str) -> None:
        super().__init__(config, stage)
        self.planned: list[str] = []
        self._batches: list[dict[str, torch.Tensor]] = []
        self._whitened: dict[int, Whitening] = {}
        self._ranks: dict[str, int] = {}  # a global allocation's ranks, by qualified name

    @property
    def track_abs(self) -> bool:
        """Whether calibration gathers mean ``|x|`` too (ASVD)."""
        return False

    def check_calibrated(self, model: nn.Module, context: CompressionContext) -> None:
        """The checks and data a calibrated stage needs, before any stage changes the model."""
        if not self.config.needs_calibration:
            return
        try:
            blocks_of(model)
        except ModelError as exc:
            raise self.error(str(exc)) from None
        self._batches = self.calibration_batches(model, context, self.config.batch_size)

    @abstractmethod
    def factor(self, name: str, layer: nn.Module, stats: LayerStats) -> nn.Module:
        """The module that replaces ``layer`` (called ``name`` in the model)."""

    def spectrum(self, name: str, layer: nn.Module, stats: LayerStats) -> torch.Tensor:
        """The singular values whose truncation the stage's factors make (global allocation)."""
        raise NotImplementedError

    def layer_budget(self, name: str, k: int, n: int) -> int:
        """Weights a ``k -> n`` layer's factors hold under a uniform allocation."""
        raise NotImplementedError

    def _allocate(self, model: nn.Module, context: CompressionContext) -> None:
        """A global allocation's first pass: every targeted block layer's spectrum (on the
        model as the stage finds it), then ranks by :func:`rank_for_budget` that hold as many
        weights in all as a uniform allocation would."""
        spectra: dict[str, torch.Tensor] = {}
        shapes: dict[str, tuple[int, int]] = {}

        def record(name: str, layer: nn.Module, stats: LayerStats) -> None:
            spectra[name] = self.spectrum(name, layer, stats).cpu()
            shapes[name] = linear_features(layer)

        def survey(block: Block) -> None:
            stats = self._calibrate(block.module, block.targets, block.run)
            self._whitened = {}
            for name in block.targets:
                record(block.prefix + name, block.module.get_submodule(name), stats[name])

        if self.config.needs_calibration:
            self.runner(model, context).run(survey, self.planned)
        else:  # plain SVD: the spectra need no inputs
            for name in self.planned:
                WeightQuantModifier.load_offloaded(model, name)
                record(name, model.get_submodule(name), LayerStats())
        costs = {name: k + n for name, (k, n) in shapes.items()}
        budget = sum(self.layer_budget(name, k, n) for name, (k, n) in shapes.items())
        self._ranks = rank_for_budget(spectra, costs, budget)
        logger.info(
            "stage %r: global allocation, ranks from %d to %d", self.stage, min(self._ranks.values()),
            max(self._ranks.values()),
        )  # fmt: skip

    def whiten(self, xtx: torch.Tensor) -> Whitening:
        """:func:`whitening` of ``xtx``, computed once for the layers that share it (q/k/v,
        gate/up: :meth:`_calibrate` gives them one tensor)."""
        key = id(xtx)
        if key not in self._whitened:
            self._whitened[key] = whitening(xtx, damp=self.config.damp)
        return self._whitened[key]

    def _replace(self, module: nn.Module, names: list[str], stats: dict[str, LayerStats], prefix: str) -> None:
        self._whitened: dict[int, Whitening] = {}
        for name in names:
            new = self.factor(prefix + name, module.get_submodule(name), stats.get(name, LayerStats()))
            new.stage = self.stage
            swap_module(module, name, new)

    def _calibrate(self, module: nn.Module, names: list[str], run: Callable[[], None]) -> dict[str, LayerStats]:
        dtype = autocast_dtype(self.config.compute_dtype, compute_device(module, None)) or torch.float32
        hooks = InputHessianHooks(module, names, dtype, track_abs=self.track_abs)
        try:
            run()
        finally:
            hooks.remove()
        out = {}
        distinct: list[torch.Tensor] = []
        for name in names:
            acc = hooks.acc[name]
            if acc.count == 0:
                raise ModelError(
                    f"stage {self.stage!r}: layer {name!r} saw no calibration token (an expert never routed to?); "
                    "add it to ignore or give more calibration data"
                )
            # Layers that read the same input get one tensor, so their whitening is shared.
            xtx = next((t for t in distinct if t.shape == acc.sum.shape and torch.equal(t, acc.sum)), None)
            if xtx is None:
                distinct.append(xtx := acc.sum)
            out[name] = LayerStats(xtx, hooks.abs_mean(name) if self.track_abs else None)
        return out

    def _process_block(self, block: Block) -> None:
        stats = self._calibrate(block.module, block.targets, block.run)
        self._replace(block.module, block.targets, stats, block.prefix)

    def runner(self, model: nn.Module, context: CompressionContext, checkpoint: BlockCheckpoint | None = None):
        """A :class:`LayerwiseRunner` over the stage's calibration batches."""
        return LayerwiseRunner(
            model,
            self._batches,
            device=(device := compute_device(model, context.device)),
            compute_dtype=autocast_dtype(self.config.compute_dtype, device),
            checkpoint=checkpoint,
            progress=context.progress,
            desc=f"{self.stage}: blocks",
        )

    @torch.no_grad()
    def apply(self, model: nn.Module, context: CompressionContext) -> None:
        targets = list(self.planned)
        if self.config.allocation == "global":
            self._allocate(model, context)
        if not self.config.needs_calibration:
            for name in tqdm(targets, desc=f"{self.stage}: layers", disable=not context.progress):
                WeightQuantModifier.load_offloaded(model, name)
                self._replace(model, [name], {}, "")
            return
        batches = self._batches
        checkpoint = None
        if context.checkpoint_dir is not None:
            fingerprint = run_fingerprint(
                {"stage": self.stage, **self.config.to_dict()}, model, [b["input_ids"] for b in batches]
            )
            checkpoint = BlockCheckpoint(context.checkpoint_dir / self.stage, fingerprint)
        runner = self.runner(model, context, checkpoint)
        runner.run(self._process_block, targets)
        outside = [n for n in targets if not n.startswith(f"{runner.prefix}.")]
        if outside:  # e.g. BERT's pooler: calibrate on full passes through the processed blocks
            stats = self._calibrate(model, outside, lambda: run_model(model, batches))
            self._replace(model, outside, stats, "")


class LowRankModifier(FactorModifier):
    config: LowRankConfig

    @property
    def track_abs(self) -> bool:
        return self.config.method == "asvd"

    def _rank_for(self, name: str, n: int, k: int) -> int | None:
        """The rank ``check`` can tell (None: chosen from the spectrum at apply time)."""
        cfg = self.config
        if name in self._ranks:
            return self._ranks[name]
        if cfg.ratio is not None:
            return rank_for_ratio(n, k, cfg.ratio)
        if cfg.rank is not None:
            if cfg.rank > min(n, k):
                raise self.error(
                    f"rank={cfg.rank} exceeds min(out, in) = {min(n, k)} of layer {name!r} ({k} -> {n}); "
                    f"use a rank <= {min(n, k)}, a ratio, or add {name!r} to ignore"
                )
            return cfg.rank
        return None

    def check(self, model: nn.Module, context: CompressionContext, view: ModelView) -> None:
        super().check(model, context, view)
        cfg = self.config
        names, taken = view.free_linear(cfg.targets, cfg.ignore)
        if not names:
            where = f"; the layers they match are compressed by earlier stages (e.g. {taken[0]!r})" if taken else ""
            raise self.error(
                f"targets={list(cfg.targets)} with ignore={list(cfg.ignore)} select no float linear layer{where}"
            )
        self.check_calibrated(model, context)
        view.claim(names, self.stage, LowRankLinear.__name__)
        for name in names:
            original = view.entries[name].module
            k, n = linear_features(original)
            rank = self._rank_for(name, n, k) or min(n, k)  # an energy rank is at most min(n, k)
            # The factors are new layers a later stage may compress (rtn/gptq on the factors).
            with torch.device("meta"):
                view.add(f"{name}.factor_in", nn.Linear(k, rank, bias=False))
                view.add(f"{name}.factor_out", nn.Linear(rank, n, bias=original.bias is not None))
        self.planned = names

    def _transform(self, stats: LayerStats) -> Whitening | None:
        cfg = self.config
        if cfg.method == "whitened":
            return self.whiten(stats.xtx)
        if cfg.method == "asvd":
            return asvd_scaling(stats.abs_mean, alpha=cfg.alpha)
        return None

    def factor(self, name: str, layer: nn.Module, stats: LayerStats) -> nn.Module:
        w = linear_weight(layer).detach()
        if not torch.isfinite(w).all():
            raise ModelError(f"stage {self.stage!r}: layer {name!r} has NaN or infinite weights")
        n, k = w.shape
        rank = self._rank_for(name, n, k)
        energy = self.config.energy
        factors = factorize(
            w.float(), rank if rank is not None else lambda s: rank_for_energy(s, energy), self._transform(stats)
        )
        if factors.rank * (n + k) >= n * k:
            logger.warning(
                "stage %r: %s keeps rank %d of %d, which holds more weights than the dense layer",
                self.stage,
                name,
                factors.rank,
                min(n, k),
            )
        bias = layer.bias.detach() if layer.bias is not None else None
        return LowRankLinear.from_factors(factors.a.to(w.dtype), factors.b.to(w.dtype), bias=bias)

    def spectrum(self, name: str, layer: nn.Module, stats: LayerStats) -> torch.Tensor:
        w = linear_weight(layer).detach().double()
        transform = self._transform(stats)
        return torch.linalg.svdvals(w @ transform.s.to(w.device) if transform is not None else w)

    def layer_budget(self, name: str, k: int, n: int) -> int:
        return int((1 - self.config.ratio) * k * n)
