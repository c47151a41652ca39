"""What every weight-quantization technique shares: its config fields and its layer checks.

RTN uses these as they are; GPTQ and later methods extend them.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from hfcompress.config import TechniqueConfig, check_target_fields, invalid
from hfcompress.errors import ModelError
from hfcompress.kinds import is_linear_like, linear_features, linear_weight, swap_module
from hfcompress.layerwise import materialize_offloaded
from hfcompress.modifier import CompressionContext, ModelView, Modifier
from hfcompress.quant.affine import QuantizedWeight
from hfcompress.quant.linear import SCALE_DTYPES, QuantLinear
from hfcompress.quant.packing import SUPPORTED_BITS
from hfcompress.quant.scheme import QuantScheme

__all__ = ["SCALE_DTYPES", "WeightQuantConfig", "WeightQuantModifier"]

MIN_GROUP_SIZE = 8


@dataclasses.dataclass(frozen=True, kw_only=True)
class WeightQuantConfig(TechniqueConfig):
    """Fields shared by the weight-only quantization techniques.

    Args:
        bits: Bits per weight: 2, 3, 4 or 8 (a scheme's ``num_bits``).
        group_size: Input columns (along ``in_features``) that share one scale and zero
            point; ``-1`` for one per output channel. A partial last group is allowed.
        symmetric: Symmetric range with the zero point fixed at ``2**(bits-1)``; otherwise
            an asymmetric min-max range with a per-group zero point.
        zero_point: Asymmetric only. ``"integer"``: uint8 zero points, range widened to
            include 0 (GPTQ's convention). ``"float"``: zero points stored like the scales,
            the grid spans exactly each group's min and max (GGUF Q4_1 and HQQ's convention).
        scale_dtype: Storage dtype of the scales (and float zero points).
        targets: Layers to quantize: module names, class names or ``re:`` patterns
            (``Linear`` selects every linear-like layer, GPT-2's ``Conv1D`` included).
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
        check_target_fields(self)

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    def scheme(self, in_features: int, *, actorder: bool = False, observer: str = "minmax") -> QuantScheme:
        """The weight-only scheme this config gives a layer with ``in_features`` inputs."""
        return QuantScheme.weight_only(
            num_bits=self.bits,
            group_size=self.group_size,
            in_features=in_features,
            symmetric=self.symmetric,
            float_zero=self.zero_point == "float",
            scale_dtype=self.scale_dtype,
            actorder=actorder,
            observer=observer,
        )


class WeightQuantModifier(Modifier):
    """Resolves and checks the targeted linear-like layers; subclasses quantize them.

    ``check`` resolves the targets against the model as the earlier stages leave it (a layer
    an earlier stage compressed is no longer a target) and keeps the result; ``apply``
    quantizes exactly those layers.
    """

    config: WeightQuantConfig
    observer = "minmax"  # what the scheme records as the way ranges were chosen

    def __init__(self, config: WeightQuantConfig, stage: str) -> None:
        super().__init__(config, stage)
        self.planned: list[str] = []

    def check(self, model: nn.Module, context: CompressionContext, view: ModelView) -> None:
        super().check(model, context, view)
        names, taken = view.free_linear(self.config.targets, self.config.ignore)
        if not names:
            if taken:
                stages = sorted({view.entries[n].stage for n in taken})
                raise self.error(
                    f"targets={list(self.config.targets)} with ignore={list(self.config.ignore)} select no layer left "
                    f"to quantize: the {len(taken)} layer(s) they match (e.g. {taken[0]!r}) are compressed by the "
                    f"earlier stage(s) {stages}. Remove this stage, or narrow the earlier stage's targets"
                )
            linear = [n for n, e in view.entries.items() if is_linear_like(e.module) and e.stage is None][:8]
            raise self.error(
                f"targets={list(self.config.targets)} with ignore={list(self.config.ignore)} select no "
                f"linear layer; linear layers in this model include {linear}"
            )
        for name in names:
            layer = view.entries[name].module
            in_features = linear_features(layer)[0]
            if self.config.group_size > in_features:
                raise self.error(
                    f"group_size={self.config.group_size} exceeds in_features={in_features} of layer "
                    f"{name!r}; use group_size=-1 (per channel), a size <= {in_features}, or add "
                    f"{name!r} to ignore"
                )
            # Offloaded (meta) weights are checked when they are loaded.
            if not layer.weight.is_meta:
                self.check_finite(name, linear_weight(layer))
        view.claim(names, self.stage, QuantLinear.__name__)
        self.planned = names

    def check_finite(self, name: str, weight: torch.Tensor) -> None:
        if not torch.isfinite(weight).all():
            raise ModelError(
                f"stage {self.stage!r}: layer {name!r} has NaN or infinite weights; quantizing it would "
                "give a silently wrong model. Fix the checkpoint or add the layer to ignore"
            )

    def quantized_layer(self, layer: nn.Module, qw: QuantizedWeight, *, actorder: bool = False) -> QuantLinear:
        """The ``QuantLinear`` holding ``qw`` in place of the float ``layer`` (bias kept)."""
        scheme = self.config.scheme(qw.q.shape[1], actorder=actorder, observer=self.observer)
        bias = layer.bias.detach() if layer.bias is not None else None
        new = QuantLinear.from_quantized(qw, scheme, bias=bias)
        new.stage = self.stage
        # The relative weight error, for the model card's per-layer plot (not saved).
        w = linear_weight(layer).detach().float()
        err = (w - new.dequantize(torch.float32).to(w.device)).norm() / w.norm().clamp_min(1e-12)
        new.quant_error = float(err)
        return new

    @staticmethod
    def replace(model: nn.Module, name: str, new: nn.Module) -> None:
        """Swap the layer ``name`` for ``new``, untying an output embedding it shared."""
        swap_module(model, name, new)

    @staticmethod
    def load_offloaded(model: nn.Module, name: str) -> None:
        """Load the weights of layer ``name`` if accelerate offloaded them (with the rest of the
        outermost offloaded module around it, as a layerwise stage loads a block)."""
        parts = name.split(".")
        for depth in range(len(parts) + 1):
            module = model.get_submodule(".".join(parts[:depth]))
            hook = getattr(module, "_hf_hook", None)
            if hook is not None and getattr(hook, "offload", False):
                materialize_offloaded(module, model=model)
                return
        layer = model.get_submodule(name)
        if any(t.is_meta for t in layer.parameters()):
            raise ModelError(
                f"layer {name!r} has weights on the meta device and no offload hook to load them from; load the "
                "model with device_map/offload_folder (accelerate) or in memory"
            )
