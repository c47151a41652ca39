"""Applies :class:`ActivationQuantConfig`: dynamic schemes are set directly; static scales are
calibrated block by block on the layerwise runner with one observer per distinct input."""

from __future__ import annotations

import logging

import torch
from torch import nn

from hfcompress.errors import CalibrationDataError
from hfcompress.kinds import is_linear_like
from hfcompress.layerwise import Block, LayerwiseRunner, autocast_dtype, compute_device, run_model
from hfcompress.modifier import CompressionContext, ModelView, Modifier
from hfcompress.quant.linear import QuantLinear
from hfcompress.quant.observers import ActivationObserver
from hfcompress.targets import select
from hfcompress.techniques.activations.config import ActivationQuantConfig
from hfcompress.techniques.learned_rounding.scales import (
    calibration_windows,
    check_in_memory,
    teacher_top_k,
    tune_scales,
)

__all__ = ["ActivationQuantModifier"]

logger = logging.getLogger(__name__)

_MARK = "input_activations"


class _ObserverHooks:
    """Pre-hooks feeding each named layer's input to an observer; layers called with the very
    same tensor (q/k/v, gate/up) share one observer, and so one scale."""

    def __init__(
        self, module: nn.Module, names: list[str], make, stage: str, prefix: str, track_tokens: bool = False
    ) -> None:
        self.observers: dict[str, ActivationObserver] = {}
        # With track_tokens, per observer: each calibration token's max |x|.
        self.token_absmax: dict[str, list[torch.Tensor]] | None = {} if track_tokens else None
        self.alias: dict[str, str] = {}
        self._last: tuple[torch.Tensor, str] | None = None
        self._make, self._stage, self._prefix = make, stage, prefix
        self._handles = [module.get_submodule(n).register_forward_pre_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def hook(_module, inputs):
            x = inputs[0]
            if self._last is not None and self._last[0] is x:
                self.alias[name] = self._last[1]
                return
            observer = self.observers.setdefault(name, self._make())
            try:
                observer.update(x)
                if self.token_absmax is not None:
                    self.token_absmax.setdefault(name, []).append(x.detach().abs().amax(dim=-1).flatten().float().cpu())
            except ValueError as exc:
                raise CalibrationDataError(
                    f"stage {self._stage!r}: the calibration inputs of layer {self._prefix + name!r}: {exc}. The "
                    "model overflows on this data before this layer: check the earlier layers' weights, the "
                    "calibration text, or calibrate in float32"
                ) from None
            self._last = (x, name)

        return hook

    def scale(self, name: str) -> torch.Tensor:
        return self.observers[self.alias.get(name, name)].scale()

    def token_outlier_ratio(self, name: str) -> float:
        """The largest token's max ``|x|`` over the median token's."""
        absmax = torch.cat(self.token_absmax[self.alias.get(name, name)])
        return float(absmax.max() / absmax.median().clamp(min=torch.finfo(torch.float32).tiny))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._last = None


class ActivationQuantModifier(Modifier):
    config: ActivationQuantConfig

    def __init__(self, config: ActivationQuantConfig, stage: str) -> None:
        super().__init__(config, stage)
        self.planned: list[str] = []
        self._batches: list[dict[str, torch.Tensor]] = []

    def takes_gradients(self) -> bool:
        return bool(self.config.e2e_steps)  # the static scales tuned end to end

    def check(self, model: nn.Module, context: CompressionContext, view: ModelView) -> None:
        super().check(model, context, view)
        cfg = self.config
        chosen = select(view.pairs(), cfg.targets, cfg.ignore, view.outside)
        names, floats = [], []
        for name in chosen:
            entry = view.entries[name]
            if entry.class_name == QuantLinear.__name__:
                names.append(name)
            elif is_linear_like(entry.module):
                floats.append(name)
        if floats:
            raise self.error(
                f"targets={list(cfg.targets)} select float layers ({floats[:4]}): activations are quantized only on "
                "layers whose weights an earlier stage quantized. Put an rtn or gptq stage for them before this one "
                "(bits 8, group_size -1, symmetric for W8A8), or add them to ignore"
            )
        if not names:
            raise self.error(
                f"targets={list(cfg.targets)} with ignore={list(cfg.ignore)} select no quantized layer; put a weight "
                "stage (rtn or gptq) before this one"
            )
        for name in names:
            entry = view.entries[name]
            earlier = entry.marks.get(_MARK)
            module = entry.module
            if earlier is None and isinstance(module, QuantLinear) and module.scheme.input_activations is not None:
                earlier = "an earlier run"
            if earlier is not None:
                raise self.error(f"layer {name!r} already has quantized input activations (from {earlier})")
            entry.marks[_MARK] = self.stage
        self.planned = names
        if not cfg.dynamic:
            self._batches = self.calibration_batches(model, context, cfg.batch_size)
        if cfg.e2e_steps:
            check_in_memory(model, self.error)

    @torch.no_grad()
    def apply(self, model: nn.Module, context: CompressionContext) -> None:
        cfg = self.config
        if cfg.dynamic:
            for name in self.planned:
                model.get_submodule(name).set_input_activations(cfg.args())
            return
        device = compute_device(model, context.device)
        dtype = autocast_dtype(cfg.compute_dtype, device)
        if cfg.e2e_steps:  # the model's predictions before its inputs are quantized
            windows = calibration_windows(self._batches, cfg.e2e_windows)
            teacher = teacher_top_k(model, windows, dtype)
        runner = LayerwiseRunner(
            model,
            self._batches,
            device=device,
            compute_dtype=dtype,
            progress=context.progress,
            desc=f"{self.stage}: activation ranges",
        )
        runner.run(self._calibrate_block, self.planned)
        outside = [n for n in self.planned if not n.startswith(f"{runner.prefix}.")]
        if outside:  # e.g. BERT's pooler: observed on full passes through the calibrated blocks
            self._calibrate(model, outside, lambda: run_model(model, self._batches))
        if cfg.e2e_steps:
            tune_scales(
                model, [model.get_submodule(n) for n in self.planned], windows, teacher, steps=cfg.e2e_steps,
                lr=cfg.e2e_lr, compute_dtype=dtype, seed=context.seed, weights=cfg.e2e_weights, inputs=True,
                progress=context.progress, desc=f"{self.stage}: scales, end to end",
            )  # fmt: skip

    def _calibrate_block(self, block: Block) -> None:
        self._calibrate(block.module, block.targets, block.run, block.prefix)

    def _calibrate(self, module: nn.Module, names: list[str], run, prefix: str = "") -> None:
        cfg = self.config

        def make() -> ActivationObserver:
            return ActivationObserver(cfg.observer, cfg.strategy, percentile=cfg.percentile, ema=cfg.ema)

        hooks = _ObserverHooks(module, names, make, self.stage, prefix, cfg.token_outlier_ratio is not None)
        try:
            run()
        finally:
            hooks.remove()
        for name in names:
            if name not in hooks.observers and name not in hooks.alias:
                raise CalibrationDataError(
                    f"stage {self.stage!r}: layer {prefix + name!r} never ran on the calibration data (an expert no "
                    "token was routed to?); give it a dynamic scheme in another stage or add it to ignore"
                )
            layer = module.get_submodule(name)
            limit = cfg.token_outlier_ratio
            if limit is not None and (ratio := hooks.token_outlier_ratio(name)) > limit:
                layer.set_input_activations(cfg.dynamic_fallback_args())
                logger.info(
                    "stage %r: layer %r keeps dynamic per-token scales: a calibration token reaches %.0fx the median "
                    "token's max |x| (token_outlier_ratio %g)",
                    self.stage, prefix + name, ratio, limit,
                )  # fmt: skip
                continue
            scale = hooks.scale(name)
            layer.set_input_activations(cfg.args(), scale.to(torch.float32))
            logger.debug("%s%s: input scale %s", prefix, name, scale[:4].tolist())
