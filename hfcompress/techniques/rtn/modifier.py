"""Applies :class:`RTNConfig`: each targeted linear layer becomes a ``QuantLinear``."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from hfcompress.kinds import linear_weight
from hfcompress.modifier import CompressionContext
from hfcompress.techniques.rtn.config import RTNConfig
from hfcompress.techniques.weight_quant import WeightQuantModifier

__all__ = ["RTNModifier"]


class RTNModifier(WeightQuantModifier):
    config: RTNConfig

    @torch.no_grad()
    def apply(self, model: nn.Module, context: CompressionContext) -> None:
        self.make_plan(model, context)
        for name in tqdm(self.planned, desc=f"{self.stage}: RTN", disable=not context.progress):
            # Offloaded weights (accelerate device_map/offload_folder) are loaded first, and
            # their block stays in memory, compressed, as GPTQ leaves it.
            self.load_offloaded(model, name)
            linear = model.get_submodule(name)
            weight = linear_weight(linear).detach()
            self.check_finite(name, weight)
            config = self.config_for(name)
            qw = self.rtn_weight(weight, config)
            self.replace(model, name, self.quantized_layer(linear, qw, config=config))
