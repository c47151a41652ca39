"""What every weight-quantization technique shares: its config fields and its layer checks.

RTN uses these as they are; GPTQ and later methods extend them.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from hfcompress.config import TechniqueConfig, invalid
from hfcompress.errors import ModelError
from hfcompress.modifier import CompressionContext, Modifier
from hfcompress.quant.linear import SCALE_DTYPES, QuantLinear
from hfcompress.quant.packing import SUPPORTED_BITS
from hfcompress.targets import check_patterns, resolve_linear_targets

__all__ = ["SCALE_DTYPES", "WeightQuantConfig", "WeightQuantModifier"]

MIN_GROUP_SIZE = 8


@dataclasses.dataclass(frozen=True, kw_only=True)
class WeightQuantConfig(TechniqueConfig):
    """Fields shared by the weight-only quantization techniques.

    Args:
        bits: Bits per weight: 2, 3, 4 or 8.
        group_size: Input columns (along ``in_features``) that share one scale and zero
            point; ``-1`` for one per output channel. A partial last group is allowed.
        symmetric: Symmetric range with the zero point fixed at ``2**(bits-1)``; otherwise
            an asymmetric min-max range with a per-group zero point.
        zero_point: Asymmetric only. ``"integer"``: uint8 zero points, range widened to
            include 0 (GPTQ's convention). ``"float"``: zero points stored like the scales,
            the grid spans exactly each group's min and max (GGUF Q4_1 and HQQ's convention).
        scale_dtype: Storage dtype of the scales (and float zero points).
        targets: Layers to quantize: module names, class names or ``re:`` patterns.
        ignore: Layers to leave alone, same pattern syntax; wins over ``targets``.
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    zero_point: Literal["integer", "float"] = "integer"
    scale_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = ("lm_head",)

    def _validate(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise invalid("bits", self.bits, ", ".join(map(str, SUPPORTED_BITS)))
        if self.group_size != -1 and self.group_size < MIN_GROUP_SIZE:
            raise invalid("group_size", self.group_size, f"-1 (per channel) or an integer >= {MIN_GROUP_SIZE}")
        if self.symmetric and self.zero_point == "float":
            raise invalid("zero_point", self.zero_point, "'integer' when symmetric is true (its zero point is fixed)")
        if not self.targets:
            raise invalid("targets", list(self.targets), "a non-empty list of patterns")
        for key in ("targets", "ignore"):
            problem = check_patterns(getattr(self, key))
            if problem:
                raise invalid(key, list(getattr(self, key)), f"module names, class names or 're:' patterns; {problem}")

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]


class WeightQuantModifier(Modifier):
    """Resolves and checks the targeted Linear layers; subclasses quantize them."""

    config: WeightQuantConfig

    def layers(self, model: nn.Module) -> dict[str, nn.Linear]:
        return resolve_linear_targets(model, self.config.targets, self.config.ignore)

    def check(self, model: nn.Module, context: CompressionContext) -> None:
        super().check(model, context)
        layers = self.layers(model)
        if not layers:
            linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:8]
            raise self.error(
                f"targets={list(self.config.targets)} with ignore={list(self.config.ignore)} select no "
                f"nn.Linear layer; Linear layers in this model include {linear}"
            )
        for name, layer in layers.items():
            if self.config.group_size > layer.in_features:
                raise self.error(
                    f"group_size={self.config.group_size} exceeds in_features={layer.in_features} of layer "
                    f"{name!r}; use group_size=-1 (per channel), a size <= {layer.in_features}, or add "
                    f"{name!r} to ignore"
                )
            # Offloaded (meta) weights are checked when a layerwise stage loads them.
            if not layer.weight.is_meta:
                self.check_finite(name, layer.weight)

    def check_finite(self, name: str, weight: torch.Tensor) -> None:
        if not torch.isfinite(weight).all():
            raise ModelError(
                f"stage {self.stage!r}: layer {name!r} has NaN or infinite weights; quantizing it would "
                "give a silently wrong model. Fix the checkpoint or add the layer to ignore"
            )

    @staticmethod
    def replace(model: nn.Module, name: str, new: QuantLinear) -> None:
        """Swap the layer ``name`` for ``new``, untying an output embedding it shared."""
        old = model.get_submodule(name)
        config = getattr(model, "config", None)
        get_out = getattr(model, "get_output_embeddings", None)
        if get_out is not None and get_out() is old and getattr(config, "tie_word_embeddings", False):
            # The input embedding keeps the float weight; the output head is now its own tensor.
            config.tie_word_embeddings = False
        model.set_submodule(name, new)
