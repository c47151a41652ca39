"""Applies :class:`GPTQConfig` block by block on the layerwise runner: hooks collect each
layer's Hessian while the calibration batches run through the block, then
:func:`quantize_weight` replaces it."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from hfcompress.architectures import blocks_of, sequential_groups
from hfcompress.checkpointing import BlockCheckpoint, run_fingerprint
from hfcompress.errors import ModelError
from hfcompress.input_stats import InputHessianHooks, InputShiftHooks
from hfcompress.kinds import linear_weight
from hfcompress.layerwise import Block, LayerwiseRunner, autocast_dtype, compute_device, run_block, run_model
from hfcompress.modifier import CompressionContext, ModelView
from hfcompress.quant.affine import QuantizedWeight, quantize, resolve_group_size
from hfcompress.techniques.gptq.algorithm import GPTQResult, asymmetric_target, quantize_weight, search_qparams
from hfcompress.techniques.gptq.config import GPTQConfig
from hfcompress.techniques.weight_quant import WeightQuantModifier

__all__ = ["GPTQModifier"]

logger = logging.getLogger(__name__)


class GPTQModifier(WeightQuantModifier):
    config: GPTQConfig

    def __init__(self, config: GPTQConfig, stage: str) -> None:
        super().__init__(config, stage)
        self._batches: list[dict[str, torch.Tensor]] = []

    description = "GPTQ"  # the progress bar's label

    @property
    def needs_reference(self) -> bool:
        """Whether blocks get the float model's activations (``Block.reference``) and a float
        copy of themselves (``Block.float_module``)."""
        return self.config.asym_calibration

    @property
    def observer(self) -> str:
        return "mse" if self.config.clip_search else "minmax"

    def _compute_dtype(self, device: torch.device) -> torch.dtype | None:
        return autocast_dtype(self.config.compute_dtype, device)

    def _quantize(
        self, module: nn.Module, names: list[str], run: Callable[[], None], prefix: str = "", block: Block | None = None
    ) -> None:
        """Collect Hessians of ``names`` (inside ``module``, called ``prefix`` in the model)
        while ``run()`` feeds calibration data, then replace each layer by its GPTQ result.
        With ``asym_calibration`` and a ``block`` carrying the float model's inputs, the block
        and its float copy run side by side instead, for GPTAQ's second statistic."""
        dtype = self._compute_dtype(compute_device(module, None)) or torch.float32
        hooks = InputHessianHooks(module, names, dtype)
        shift = None
        if self.config.asym_calibration and block is not None and block.float_module is not None:
            shift = InputShiftHooks(module, block.float_module, names, dtype)
        try:
            if shift is None:
                run()
            else:  # each batch through the block, then the float block on the float model's version
                for i, item in enumerate(block.inputs):
                    run_block(module, [item], compute_dtype=block.compute_dtype)
                    block.reference_output(i)
        finally:
            hooks.remove()
            if shift is not None:
                shift.remove()
        logger.debug("%s: %d x^T x products, %d shared", prefix or "model", hooks.products, hooks.reuses)
        for name in names:
            cfg = self.config_for(prefix + name)
            layer = module.get_submodule(name)
            weight = linear_weight(layer)
            self.check_finite(prefix + name, weight)
            acc = hooks.acc[name]
            if acc.count == 0:
                # A mixture-of-experts expert no calibration token was routed to: no Hessian.
                logger.warning(
                    "stage %r: %s saw no calibration token (an expert never routed to); quantized with RTN",
                    self.stage,
                    prefix + name,
                )
                self.replace(module, name, self.quantized_layer(layer, self.rtn_weight(weight, cfg), config=cfg))
                continue
            hessian = acc.hessian()
            d = shift.shift(name) if shift is not None else None
            if d is not None:
                weight = asymmetric_target(weight, hessian, d, cfg.damp, cfg.asym_alpha)
            result = quantize_weight(
                weight,
                hessian,
                bits=cfg.bits,
                group_size=cfg.group_size,
                symmetric=cfg.symmetric,
                scale_dtype=cfg.torch_scale_dtype,
                float_zero=cfg.zero_point == "float",
                block_size=cfg.block_size,
                damp=cfg.damp,
                act_order=cfg.act_order,
                clip_search=cfg.clip_search,
            )
            if result.damp > cfg.damp:
                logger.warning(
                    "stage %r: the Hessian of %s was not positive definite with damp=%g; used damp=%g",
                    self.stage,
                    prefix + name,
                    cfg.damp,
                    result.damp,
                )
            self._install(module, name, layer, result, cfg)

    def _install(self, module: nn.Module, name: str, layer: nn.Module, result: GPTQResult, config: GPTQConfig) -> None:
        """Put GPTQ's result for ``layer`` (on ``config``'s grid) in its place (learned
        rounding puts a trainable stand-in there instead)."""
        self.replace(module, name, self.quantized_layer(layer, result.weight, actorder=config.act_order, config=config))

    def rtn_weight(self, weight: torch.Tensor, config: GPTQConfig) -> QuantizedWeight:
        """Round-to-nearest on ``config``'s grid, with its range search if ``clip_search``."""
        if not config.clip_search:
            return super().rtn_weight(weight, config)
        w = weight.detach().float()
        grid = dict(
            bits=config.bits,
            group_size=config.group_size,
            symmetric=config.symmetric,
            scale_dtype=config.torch_scale_dtype,
            float_zero=config.zero_point == "float",
        )
        scales, zeros = search_qparams(w, **grid)
        q = quantize(w, scales, zeros, bits=config.bits, group_size=config.group_size)
        group_size = resolve_group_size(config.group_size, w.shape[1])
        return QuantizedWeight(q=q, scales=scales, zeros=zeros, bits=config.bits, group_size=group_size)

    def _quantize_block(self, block: Block) -> None:
        module = block.module
        if self.config.true_sequential:
            groups = sequential_groups(module, block.targets, lambda: run_block(module, block.inputs[:1]))
        else:
            groups = [block.targets]
        # GPTAQ compares each layer's inputs with the float model's: the runner's float copy of
        # the block gives the latter, also for layers after a group quantized already
        # (true_sequential).
        for group in groups:
            self._quantize(module, group, block.run, block.prefix, block)

    def check(self, model: nn.Module, context: CompressionContext, view: ModelView) -> None:
        super().check(model, context, view)
        try:
            blocks_of(model)
        except ModelError as exc:
            raise self.error(str(exc)) from None
        # The calibration data is read (and checked) now, before any stage changes the model.
        self._batches = self.calibration_batches(model, context, self.config.batch_size)

    @torch.no_grad()
    def apply(self, model: nn.Module, context: CompressionContext) -> None:
        self.make_plan(model, context)
        cfg = self.config
        targets = list(self.planned)
        device = compute_device(model, context.device)
        batches = self._batches
        checkpoint = None
        if context.checkpoint_dir is not None:
            fingerprint = run_fingerprint(
                {"stage": self.stage, **cfg.to_dict()}, model, [b["input_ids"] for b in batches]
            )
            checkpoint = BlockCheckpoint(context.checkpoint_dir / self.stage, fingerprint)

        runner = LayerwiseRunner(
            model,
            batches,
            device=device,
            compute_dtype=self._compute_dtype(device),
            checkpoint=checkpoint,
            progress=context.progress,
            desc=f"{self.stage}: {self.description} blocks",
            reference=self.needs_reference,
        )
        runner.run(self._quantize_block, targets)

        prefix = runner.prefix
        outside = [n for n in targets if not n.startswith(f"{prefix}.")]
        if outside:  # e.g. BERT's pooler: calibrate it on full passes through the quantized blocks
            self._quantize(model, outside, lambda: run_model(model, batches))
