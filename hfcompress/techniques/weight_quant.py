"""What every weight-quantization technique shares: its config fields and its layer checks.

RTN uses these as they are; GPTQ and later methods extend them.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from hfcompress.config import TechniqueConfig, check_target_fields, invalid
from hfcompress.errors import CalibrationDataError, ModelError
from hfcompress.kinds import CompressedModule, is_linear_like, linear_features, linear_weight, swap_module
from hfcompress.layerwise import materialize_offloaded, offloads
from hfcompress.mixed_precision import BitsBudget, Choice, PrecisionPlan, plan_by_layer_order, solve_budget
from hfcompress.mixed_precision.sensitivity import choice_losses, fisher_diagonal
from hfcompress.modifier import CompressionContext, ModelView, Modifier
from hfcompress.quant.affine import MIN_GROUP_SIZE, QuantizedWeight, quantize_rtn
from hfcompress.quant.linear import SCALE_DTYPES, QuantLinear, quantized_bytes
from hfcompress.quant.packing import SUPPORTED_BITS
from hfcompress.quant.scheme import QuantScheme

__all__ = ["SCALE_DTYPES", "WeightQuantConfig", "WeightQuantModifier", "check_grid_fields"]

logger = logging.getLogger(__name__)


# What the packed layers hold, in words: the configs with a weight grid refuse other values
# (and values of another type, such as group_size=None) with these.
GRID_FIELDS_ACCEPTED = {
    "bits": ", ".join(map(str, SUPPORTED_BITS)),
    "group_size": f"-1 (per channel) or an integer >= {MIN_GROUP_SIZE}",
}


def check_grid_fields(config: Any) -> None:
    """Raise :func:`invalid` for a config's ``bits`` or ``group_size`` outside what the packed
    layers hold."""
    if config.bits not in SUPPORTED_BITS:
        raise invalid("bits", config.bits, GRID_FIELDS_ACCEPTED["bits"])
    if config.group_size != -1 and config.group_size < MIN_GROUP_SIZE:
        raise invalid("group_size", config.group_size, GRID_FIELDS_ACCEPTED["group_size"])


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
        budget: Mixed precision (:class:`~hfcompress.mixed_precision.BitsBudget`): each
            targeted layer gets its own bits and group size, chosen from the budget's
            candidates so that the layers fit its size (e.g. ``{bits_per_weight: 3.5}``).
            ``bits`` and ``group_size`` must then keep their defaults; the other grid fields
            apply to every layer.
    """

    _accepted: ClassVar[dict[str, str]] = GRID_FIELDS_ACCEPTED
    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    zero_point: Literal["integer", "float"] = "integer"
    scale_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = ("lm_head",)
    budget: BitsBudget | None = None

    def _validate(self) -> None:
        check_grid_fields(self)
        if self.symmetric and self.zero_point == "float":
            raise invalid("zero_point", self.zero_point, "'integer' when symmetric is true (its zero point is fixed)")
        check_target_fields(self)
        if self.budget is not None and (self.bits, self.group_size) != (4, 128):
            raise invalid(
                "bits/group_size",
                (self.bits, self.group_size),
                "the defaults (4, 128) when a budget is given: the budget chooses them per layer; list the "
                "candidates in budget.bits and budget.group_sizes",
            )

    def for_choice(self, choice: Choice) -> WeightQuantConfig:
        """This config with the grid of one candidate of its budget (and no budget)."""
        return dataclasses.replace(self, bits=choice.bits, group_size=choice.group_size, budget=None)

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


def _weight_count(layer: nn.Module) -> int:
    """``in_features * out_features`` of a linear-like layer."""
    k, n = linear_features(layer)
    return k * n


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
        self.plan: PrecisionPlan | None = None  # with a budget: the grid chosen per layer
        self._layer_configs: dict[str, WeightQuantConfig] = {}
        self._sensitivity_batches: list[dict[str, torch.Tensor]] = []

    def takes_gradients(self) -> bool:
        budget = self.config.budget  # a budget's layer sensitivities are Fisher information
        return super().takes_gradients() or (budget is not None and budget.strategy == "sensitivity")

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
            done = [n for n, e in view.entries.items() if e.stage is None and isinstance(e.module, CompressedModule)]
            if done:
                raise self.error(
                    f"targets={list(self.config.targets)} with ignore={list(self.config.ignore)} select no float "
                    f"linear layer: {len(done)} layer(s) of this model are compressed already (e.g. {done[0]!r}, a "
                    f"{type(view.entries[done[0]].module).__name__}), by an earlier compress() call or a compressed "
                    "checkpoint. Compress the float model instead; a recipe for an already compressed model takes "
                    "stages that add to its layers (int8_activations, kv_cache, ...), not a second weight stage"
                )
            linear = [n for n, e in view.entries.items() if is_linear_like(e.module) and e.stage is None][:8]
            ignored = [t for t in self.config.targets if t in self.config.ignore]
            hint = (
                f"; {ignored} is both a target and ignored (ignore defaults to ['lm_head']): pass ignore: [] to "
                "quantize it"
                if ignored
                else ""
            )
            raise self.error(
                f"targets={list(self.config.targets)} with ignore={list(self.config.ignore)} select no "
                f"linear layer; linear layers in this model include {linear}{hint}"
            )
        for name in names:
            layer = view.entries[name].module
            in_features = linear_features(layer)[0]
            if self.config.budget is None and self.config.group_size > in_features:
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
        if self.config.budget is not None:
            self._check_budget(model, context, {n: view.entries[n].module for n in names})

    # -- mixed precision under a budget ------------------------------------------------------

    def _candidates(self, layers: dict[str, nn.Module]) -> tuple[dict[str, list[Choice]], dict[str, list[int]]]:
        """Each layer's candidate grids (group sizes up to its ``in_features``) and their bytes."""
        budget, cfg = self.config.budget, self.config
        choices, costs = {}, {}
        for name, layer in layers.items():
            k, n = linear_features(layer)
            options = sorted({Choice(b, g) for b in budget.bits for g in budget.group_sizes if g == -1 or g <= k})
            if not options:
                raise self.error(
                    f"budget.group_sizes={list(budget.group_sizes)} all exceed in_features={k} of layer {name!r}; "
                    "add -1 (per channel) or a smaller size"
                )
            choices[name] = options
            costs[name] = [
                quantized_bytes(
                    n,
                    k,
                    bits=c.bits,
                    group_size=c.group_size,
                    symmetric=cfg.symmetric,
                    float_zero=cfg.zero_point == "float",
                    scale_dtype=cfg.scale_dtype,
                )
                for c in options
            ]
        return choices, costs

    def _budget_bytes(self, layers: dict[str, nn.Module]) -> int:
        budget = self.config.budget
        if budget.total_bytes is not None:
            return budget.total_bytes
        return int(budget.bits_per_weight * sum(map(_weight_count, layers.values())) / 8)

    def _check_budget(self, model: nn.Module, context: CompressionContext, layers: dict[str, nn.Module]) -> None:
        """Refuse a budget below the smallest plan, and read the sensitivity's calibration data."""
        budget = self.config.budget
        _, costs = self._candidates(layers)
        least = sum(min(c) for c in costs.values())
        capacity = self._budget_bytes(layers)
        if least > capacity:
            weights = sum(map(_weight_count, layers.values()))
            raise self.error(
                f"budget {budget.to_dict()} allows {capacity} bytes for the {len(layers)} targeted layers, but their "
                f"smallest candidates (bits {list(budget.bits)}, group sizes {list(budget.group_sizes)}) take "
                f"{least} bytes, {8 * least / weights:.3f} bits per weight; raise the budget or add smaller candidates"
            )
        if budget.strategy == "sensitivity":
            offloaded = [n for n, m in layers.items() if linear_weight(m).is_meta]
            if offloaded:
                raise self.error(
                    f"budget.strategy='sensitivity' needs backward passes through the whole model, but the weights "
                    f"of {offloaded[0]!r} are offloaded (meta device); load the model in memory, or use "
                    "budget.strategy='layer_order', which measures nothing"
                )
            if context.calibration_data is None:
                raise CalibrationDataError(
                    f"stage {self.stage!r} ({self.config.technique}): budget.strategy='sensitivity' measures each "
                    "layer's sensitivity on calibration data; pass calibration_data=... to compress() (or "
                    "--calibration), or use budget.strategy='layer_order'"
                )
            self._sensitivity_batches = self.calibration_batches(model, context, 1)

    def make_plan(self, model: nn.Module, context: CompressionContext) -> None:
        """With a budget: choose each targeted layer's grid (call at the start of ``apply``,
        on the model as the earlier stages left it)."""
        budget = self.config.budget
        if budget is None:
            return
        layers = {name: model.get_submodule(name) for name in self.planned}
        choices, costs = self._candidates(layers)
        capacity = self._budget_bytes(layers)
        names = list(layers)
        estimated = None
        if budget.strategy == "layer_order":
            picked = plan_by_layer_order([costs[n] for n in names], capacity)
        else:
            fisher = fisher_diagonal(
                model,
                names,
                self._sensitivity_batches,
                samples=budget.samples,
                seed=context.seed,
                progress=context.progress,
            )
            losses = {
                n: choice_losses(
                    linear_weight(layers[n]),
                    fisher.pop(n),
                    choices[n],
                    # min-max rounding: a range search (clip_search) would cost 20x more here
                    lambda w, c: WeightQuantModifier.rtn_weight(self, w, self.config.for_choice(c)).dequantize(),
                )
                for n in names
            }
            picked = solve_budget([costs[n] for n in names], [losses[n] for n in names], capacity)
            estimated = sum(losses[n][j] for n, j in zip(names, picked, strict=True))
        self.plan = PrecisionPlan(
            layers={n: choices[n][j] for n, j in zip(names, picked, strict=True)},
            weights={n: _weight_count(layers[n]) for n in names},
            bytes={n: costs[n][j] for n, j in zip(names, picked, strict=True)},
            budget_bytes=capacity,
            strategy=budget.strategy,
            estimated_loss=estimated,
        )
        self._layer_configs = {n: self.config.for_choice(c) for n, c in self.plan.layers.items()}
        logger.info("stage %r: %s", self.stage, self.plan.summary())
        logger.info("stage %r: bits and group size per layer:\n%s", self.stage, self.plan.table())

    def config_for(self, name: str) -> WeightQuantConfig:
        """The grid config of layer ``name`` (its model-level name): the plan's choice under a
        budget, else the stage's config."""
        return self._layer_configs.get(name, self.config)

    def rtn_weight(self, weight: torch.Tensor, config: WeightQuantConfig) -> QuantizedWeight:
        """Round-to-nearest on ``config``'s grid (subclasses with a range search override it)."""
        return quantize_rtn(
            weight.detach(),
            bits=config.bits,
            group_size=config.group_size,
            symmetric=config.symmetric,
            scale_dtype=config.torch_scale_dtype,
            float_zero=config.zero_point == "float",
        )

    def check_finite(self, name: str, weight: torch.Tensor) -> None:
        if not torch.isfinite(weight).all():
            raise ModelError(
                f"stage {self.stage!r}: layer {name!r} has NaN or infinite weights; quantizing it would "
                "give a silently wrong model. Fix the checkpoint or add the layer to ignore"
            )

    def quantized_layer(
        self, layer: nn.Module, qw: QuantizedWeight, *, actorder: bool = False, config: WeightQuantConfig | None = None
    ) -> QuantLinear:
        """The ``QuantLinear`` holding ``qw`` in place of the float ``layer`` (bias kept);
        ``config`` gives its grid (default: the stage's)."""
        config = config or self.config
        scheme = config.scheme(qw.q.shape[1], actorder=actorder, observer=self.observer)
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
            if offloads(module):
                materialize_offloaded(module, model=model)
                return
        layer = model.get_submodule(name)
        if any(t.is_meta for t in layer.parameters()):
            raise ModelError(
                f"layer {name!r} has weights on the meta device and no offload hook to load them from; load the "
                "model with device_map/offload_folder (accelerate) or in memory"
            )
