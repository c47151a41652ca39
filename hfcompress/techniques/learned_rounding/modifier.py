"""Applies :class:`LearnedRoundingConfig` on GPTQ's layerwise runner: in each block GPTQ (or
RTN) quantizes the targets into :class:`RoundingLinear` stand-ins, signed-gradient steps tune
their rounding against the block's target outputs, and the result becomes ``QuantLinear``
layers like GPTQ's."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from hfcompress.kinds import linear_weight
from hfcompress.layerwise import Block, autocast_dtype, compute_device, propagate
from hfcompress.loss_scaling import LossScaler
from hfcompress.modifier import CompressionContext, ModelView
from hfcompress.quant.affine import QuantizedWeight
from hfcompress.quant.linear import QuantLinear
from hfcompress.techniques.gptq.algorithm import GPTQResult
from hfcompress.techniques.gptq.modifier import GPTQModifier
from hfcompress.techniques.learned_rounding.algorithm import RoundingLinear, signed_step
from hfcompress.techniques.learned_rounding.config import LearnedRoundingConfig
from hfcompress.techniques.learned_rounding.scales import (
    calibration_windows,
    check_in_memory,
    teacher_top_k,
    tune_scales,
)

__all__ = ["LearnedRoundingModifier"]

logger = logging.getLogger(__name__)


class LearnedRoundingModifier(GPTQModifier):
    config: LearnedRoundingConfig
    description = "learned rounding"

    def __init__(self, config: LearnedRoundingConfig, stage: str) -> None:
        super().__init__(config, stage)
        self._in_block = False  # GPTQ's results go into stand-ins only inside a block
        self._originals: dict[str, nn.Module] = {}  # the float layers the stand-ins replaced

    @property
    def needs_reference(self) -> bool:
        return self.config.target == "float_model" or super().needs_reference

    def takes_gradients(self) -> bool:
        return True  # the rounding is learned by gradient descent, block by block

    def check(self, model: nn.Module, context: CompressionContext, view: ModelView) -> None:
        super().check(model, context, view)
        if self.config.e2e_steps:
            check_in_memory(model, self.error)

    @torch.no_grad()
    def apply(self, model: nn.Module, context: CompressionContext) -> None:
        cfg = self.config
        if cfg.e2e_steps == 0:
            super().apply(model, context)
            return
        # The unquantized model's predictions, before any block changes.
        windows = calibration_windows(self._batches, cfg.e2e_windows)
        dtype = autocast_dtype(cfg.compute_dtype, compute_device(model, context.device))
        teacher = teacher_top_k(model, windows, dtype)
        super().apply(model, context)
        layers = [m for n in self.planned if isinstance(m := model.get_submodule(n), QuantLinear)]
        tune_scales(
            model, layers, windows, teacher, steps=cfg.e2e_steps, lr=cfg.e2e_lr, compute_dtype=dtype,
            seed=cfg.seed, progress=context.progress, desc=f"{self.stage}: scales, end to end",
        )  # fmt: skip

    def _stand_in(self, layer: nn.Module, base: torch.Tensor, start: QuantizedWeight) -> RoundingLinear:
        cfg = self.config
        return RoundingLinear(
            base,
            start,
            layer.bias,
            symmetric=cfg.symmetric,
            float_zero=cfg.zero_point == "float",
            learn_range=cfg.learn_range,
        ).to(base.device)

    def _install(
        self, module: nn.Module, name: str, layer: nn.Module, result: GPTQResult, config: LearnedRoundingConfig
    ) -> None:
        if not self._in_block:  # a layer outside the blocks (BERT's pooler): GPTQ's result as is
            super()._install(module, name, layer, result, config)
            return
        self._originals[name] = layer
        self.replace(module, name, self._stand_in(layer, result.unrounded, result.weight))

    def _rtn_start(self, module: nn.Module, name: str, config: LearnedRoundingConfig) -> None:
        layer = module.get_submodule(name)
        w = linear_weight(layer).detach().float()
        self.check_finite(name, w)
        self._originals[name] = layer
        self.replace(module, name, self._stand_in(layer, w, self.rtn_weight(w, config)))

    def _quantize_block(self, block: Block) -> None:
        cfg = self.config
        module = block.module
        own = None
        if cfg.target == "block":  # the float block's own outputs, before anything in it is quantized
            stream = list(block.inputs)
            propagate(module, stream, compute_dtype=block.compute_dtype)
            own = [item.args[0] for item in stream]
        self._originals.clear()
        self._in_block = True
        try:
            if cfg.init == "gptq":
                super()._quantize_block(block)
            else:
                for name in block.targets:
                    self._rtn_start(module, name, self.config_for(block.prefix + name))
        finally:
            self._in_block = False
        stand_ins = {name: module.get_submodule(name) for name in block.targets}
        stand_ins = {n: m for n, m in stand_ins.items() if isinstance(m, RoundingLinear)}
        # The float model's activations: asked for after GPTQ, which (as GPTAQ) computed them already.
        targets = own if own is not None else block.reference
        self._tune(block, list(stand_ins.values()), targets)
        for name, stand_in in stand_ins.items():
            original = self._originals.pop(name)
            actorder = cfg.act_order and cfg.init == "gptq"
            config = self.config_for(block.prefix + name)
            self.replace(
                module, name, self.quantized_layer(original, stand_in.quantized(), actorder=actorder, config=config)
            )

    def _tune(self, block: Block, layers: list[RoundingLinear], targets: list[torch.Tensor]) -> None:
        cfg = self.config
        if not layers or cfg.steps == 0:
            return
        module = block.module
        frozen = [p for p in module.parameters() if p.requires_grad]
        trainable = {id(p) for layer in layers for p in layer.trainable()}
        frozen = [p for p in frozen if id(p) not in trainable]
        for p in frozen:
            p.requires_grad_(False)
        generator = torch.Generator().manual_seed(cfg.seed * 100_003 + block.index)
        params = [p for layer in layers for p in layer.trainable()]
        scaler = LossScaler(module)
        order: list[int] = []
        losses: list[float] = []
        best, best_loss = None, float("inf")
        try:
            for step in range(cfg.steps):
                if not order:
                    order = torch.randperm(len(block.inputs), generator=generator).tolist()
                i = order.pop()
                with torch.enable_grad():
                    out = block.forward(block.inputs[i], grad=True)
                    loss = F.mse_loss(out.float(), targets[i].float())
                    finite = scaler.backward(loss, params)  # the sign is all a step reads: no unscaling
                losses.append(loss.item())
                if cfg.keep_best and losses[-1] < best_loss:  # the values that gave this loss
                    best, best_loss = [p.detach().clone() for p in params], losses[-1]
                if finite:  # else a float16 gradient overflowed: no step
                    signed_step(layers, cfg.step_size * (1 - step / cfg.steps))
            if best is not None:
                for p, value in zip(params, best, strict=True):
                    p.data.copy_(value)
        finally:
            for p in frozen:
                p.requires_grad_(True)
        logger.debug(
            "%s: block output MSE %.4g at the first step, %.4g at the last, %.4g the lowest; %d steps dropped "
            "(float16 gradients overflowed)",
            block.prefix,
            losses[0],
            losses[-1],
            min(losses),
            scaler.skipped,
        )
