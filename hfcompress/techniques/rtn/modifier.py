"""Applies :class:`RTNConfig`: each targeted Linear becomes a ``QuantLinear``."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from hfcompress.modifier import CompressionContext
from hfcompress.quant.affine import quantize_rtn
from hfcompress.quant.linear import QuantLinear
from hfcompress.techniques.rtn.config import RTNConfig
from hfcompress.techniques.weight_quant import WeightQuantModifier

__all__ = ["RTNModifier"]


class RTNModifier(WeightQuantModifier):
    config: RTNConfig

    @torch.no_grad()
    def apply(self, model: nn.Module, context: CompressionContext) -> None:
        layers = self.layers(model)
        for name, linear in tqdm(layers.items(), desc=f"{self.stage}: RTN", disable=not context.progress):
            qw = quantize_rtn(
                linear.weight.detach(),
                bits=self.config.bits,
                group_size=self.config.group_size,
                symmetric=self.config.symmetric,
                scale_dtype=self.config.torch_scale_dtype,
                float_zero=self.config.zero_point == "float",
            )
            self.replace(model, name, QuantLinear.from_quantized(qw, symmetric=self.config.symmetric, bias=linear.bias))
