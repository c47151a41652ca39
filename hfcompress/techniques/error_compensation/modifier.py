"""Applies :class:`ErrorCompensationConfig`: each quantized layer ``Q`` becomes
``LowRankLinear(base=Q)``, whose factors approximate ``W - Q(W)`` (whitened by the layer's
inputs in the quantized model)."""

from __future__ import annotations

import torch
from torch import nn

from hfcompress.errors import ModelError
from hfcompress.kinds import is_linear_like, linear_features, linear_weight
from hfcompress.modifier import CompressionContext, ModelView
from hfcompress.quant.affine import quantize_rtn
from hfcompress.quant.linear import QuantLinear
from hfcompress.quant.scheme import QuantScheme
from hfcompress.targets import select
from hfcompress.techniques.error_compensation.config import ErrorCompensationConfig
from hfcompress.techniques.low_rank.algorithm import factorize, refit_out_factor
from hfcompress.techniques.low_rank.layer import LowRankLinear
from hfcompress.techniques.low_rank.modifier import FactorModifier, LayerStats

__all__ = ["ErrorCompensationModifier"]


class ErrorCompensationModifier(FactorModifier):
    config: ErrorCompensationConfig

    def __init__(self, config: ErrorCompensationConfig, stage: str) -> None:
        super().__init__(config, stage)
        # The float layers the earlier stage quantized, kept for W (their weights stay alive
        # until this stage has run).
        self._originals: dict[str, nn.Module] = {}
        # Layers an earlier stage of this call creates (e.g. low-rank factors): name -> the
        # quantizing stage, just before which the real float layer is taken from the model.
        self._created: dict[str, str] = {}

    def check(self, model: nn.Module, context: CompressionContext, view: ModelView) -> None:
        super().check(model, context, view)
        cfg = self.config
        chosen = select(view.pairs(), cfg.targets, cfg.ignore, view.outside)
        names = [n for n in chosen if view.entries[n].class_name == QuantLinear.__name__]
        if not names:
            raise self.error(
                f"targets={list(cfg.targets)} with ignore={list(cfg.ignore)} select no layer that an earlier rtn or "
                "gptq stage quantizes; put this stage after the quantizing stage"
            )
        for name in names:
            entry = view.entries[name]
            if entry.stage is None or not is_linear_like(entry.module):
                raise self.error(
                    f"layer {name!r} was already quantized when compression started, so its float weights are gone; "
                    "compensate in the same compress() call as the rtn/gptq stage"
                )
        self.check_calibrated(model, context)
        quantized_by = {name: view.entries[name].stage for name in names}
        present = dict(model.named_modules())
        self._created = {n: quantized_by[n] for n in names if present.get(n) is not view.entries[n].module}
        view.claim(names, self.stage, LowRankLinear.__name__)
        factor_class = (QuantLinear if cfg.factor_bits else nn.Linear).__name__
        for name in names:
            original = view.entries[name].module
            k, n = linear_features(original)
            rank = min(cfg.rank, k, n)
            # The quantized layer becomes the base; the factors are this stage's.
            with torch.device("meta"):
                base = nn.Linear(k, n, bias=original.bias is not None)
                view.add(f"{name}.base", base, quantized_by[name], QuantLinear.__name__)
                view.add(f"{name}.factor_in", nn.Linear(k, rank, bias=False), self.stage, factor_class)
                view.add(f"{name}.factor_out", nn.Linear(rank, n, bias=False), self.stage, factor_class)
            self._originals[name] = original
        self.planned = names

    def before_stage(self, model: nn.Module, stage: str) -> None:
        for name in [n for n, by in self._created.items() if by == stage]:
            self._originals[name] = model.get_submodule(name)
            del self._created[name]

    def _quantize_factor(self, w: torch.Tensor) -> QuantLinear:
        cfg = self.config
        k = w.shape[1]
        group = -1 if cfg.factor_group_size == -1 or cfg.factor_group_size >= k else cfg.factor_group_size
        qw = quantize_rtn(w.float(), bits=cfg.factor_bits, group_size=group, symmetric=True)
        scheme = QuantScheme.weight_only(num_bits=cfg.factor_bits, group_size=group, in_features=k, symmetric=True)
        return QuantLinear.from_quantized(qw, scheme)

    def _error(self, name: str, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W, W - Q(W))`` of the quantized ``layer``, float32 on its device."""
        if not isinstance(layer, QuantLinear):
            raise ModelError(f"stage {self.stage!r}: layer {name!r} is a {type(layer).__name__}, not a QuantLinear")
        original = self._originals.get(name)
        w = linear_weight(original).detach() if original is not None else None
        if w is None or w.is_meta:
            raise ModelError(
                f"stage {self.stage!r}: the float weights of {name!r} are not in memory (offloaded); load the model "
                "without offloading to compensate its quantization error"
            )
        w = w.to(device=layer.qweight.device, dtype=torch.float32)
        return w, w - layer.dequantize(torch.float32)

    def _transform(self, stats: LayerStats):
        return self.whiten(stats.xtx) if stats.xtx is not None else None

    def spectrum(self, name: str, layer: nn.Module, stats: LayerStats) -> torch.Tensor:
        error = self._error(name, layer)[1].double()
        transform = self._transform(stats)
        return torch.linalg.svdvals(error @ transform.s.to(error.device) if transform is not None else error)

    def layer_budget(self, name: str, k: int, n: int) -> int:
        return min(self.config.rank, k, n) * (k + n)

    def factor(self, name: str, layer: nn.Module, stats: LayerStats) -> nn.Module:
        cfg = self.config
        w, error = self._error(name, layer)
        dtype = self._originals.pop(name).weight.dtype  # the float weights are no longer needed
        n, k = error.shape
        transform = self._transform(stats)
        factors = factorize(error, self._ranks.get(name, min(cfg.rank, n, k)), transform)
        if not cfg.factor_bits:
            new = LowRankLinear.from_factors(factors.a.to(dtype), factors.b.to(dtype), base=layer)
        else:
            # Quantize A, refit B to the rounded A (least squares on the inputs), quantize B.
            qa = self._quantize_factor(factors.a)
            b = refit_out_factor(error, qa.dequantize(torch.float32), transform)
            qb = self._quantize_factor(b)
            new = LowRankLinear(k, n, factors.rank, base=layer, dtype=dtype, device=error.device)
            new.factor_in, new.factor_out = qa, qb
            for q in (qa, qb):
                q.stage = self.stage
        approx = new.dense_weight(torch.float32)
        new.quant_error = float((w - approx).norm() / w.norm().clamp_min(1e-12))
        return new
