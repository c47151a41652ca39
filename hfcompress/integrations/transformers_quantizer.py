"""The one adapter to transformers' quantizer API (``HfQuantizer``).

Registering ``quant_method: "hfcompress"`` lets a plain ``AutoModel*.from_pretrained(dir)``
rebuild our compressed layers after ``import hfcompress``: the quantizer swaps each recorded
``nn.Linear`` for an empty ``QuantLinear`` before the weights load, so the packed tensors load
by name like any other. Before that, the checkpoint's safetensors headers are checked against
what the config promises, and after it the loaded scales and zero points are checked, so a
truncated, edited or corrupt checkpoint fails with a message naming the tensor.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from hfcompress.errors import CheckpointError
from hfcompress.quant.affine import num_groups
from hfcompress.quant.linear import SCALE_DTYPES, QuantLinear
from hfcompress.quant.packing import SUPPORTED_BITS, packed_columns

__all__ = [
    "FORMAT_VERSION",
    "QUANT_METHOD",
    "HfCompressQuantizationConfig",
    "HfCompressQuantizer",
    "attach_quantization_config",
    "register",
]

logger = logging.getLogger(__name__)

QUANT_METHOD = "hfcompress"
FORMAT_VERSION = 1
_SAFETENSORS_DTYPES = {torch.uint8: "U8", torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}
_LAYER_KEYS = ("bits", "group_size", "symmetric", "zero_point", "scale_dtype", "in_features", "out_features")


class HfCompressQuantizationConfig(QuantizationConfigMixin):
    """The ``quantization_config`` an hfcompress checkpoint carries in its ``config.json``.

    Args:
        recipe: The recipe that produced the model, as ``Recipe.to_dict()`` gives it.
        layers: For each compressed Linear, by module name: bits, group_size (resolved),
            symmetric, scale_dtype, in_features, out_features.
        format_version: Layout version of the stored tensors.
    """

    def __init__(
        self,
        recipe: dict[str, Any] | None = None,
        layers: dict[str, dict[str, Any]] | None = None,
        format_version: int = FORMAT_VERSION,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("quant_method", None)
        if kwargs:
            raise CheckpointError(f"unknown key(s) {sorted(kwargs)} in the hfcompress quantization_config")
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.recipe = recipe or {}
        self.layers = layers or {}
        self.post_init()

    def post_init(self) -> None:
        if self.format_version != FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint format_version={self.format_version!r}; this hfcompress reads {FORMAT_VERSION}. "
                "Upgrade hfcompress or re-compress the model"
            )
        if not isinstance(self.layers, dict):
            raise CheckpointError(f"quantization_config.layers must be a mapping, got {type(self.layers).__name__}")
        for name, spec in self.layers.items():
            missing = [k for k in _LAYER_KEYS if k not in spec] if isinstance(spec, dict) else list(_LAYER_KEYS)
            if missing:
                raise CheckpointError(f"quantization_config.layers[{name!r}] lacks {missing}")
            if (
                spec["bits"] not in SUPPORTED_BITS
                or spec["scale_dtype"] not in SCALE_DTYPES
                or spec["zero_point"] not in ("integer", "float")
            ):
                raise CheckpointError(f"quantization_config.layers[{name!r}] is malformed: {spec}")


class HfCompressQuantizer(HfQuantizer):
    """Loads hfcompress checkpoints; compression itself happens in ``hfcompress.compress``."""

    requires_calibration = True  # only pre-compressed checkpoints load through this quantizer
    quantization_config: HfCompressQuantizationConfig

    def _process_model_before_weight_loading(self, model, checkpoint_files: Iterable[str] | None = None, **kwargs):
        layers = self.quantization_config.layers
        if checkpoint_files is not None:
            check_checkpoint(list(checkpoint_files), layers)
        for name, spec in layers.items():
            try:
                old = model.get_submodule(name)
            except AttributeError:
                raise CheckpointError(
                    f"quantization_config names layer {name!r}, which this model ({type(model).__name__}) lacks"
                ) from None
            if not isinstance(old, torch.nn.Linear):
                raise CheckpointError(f"layer {name!r} is a {type(old).__name__}, not a Linear layer")
            with torch.device("meta"):
                new = QuantLinear.from_spec(spec, bias=old.bias is not None, dtype=old.weight.dtype)
            model.set_submodule(name, new)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        for name, module in model.named_modules():
            if isinstance(module, QuantLinear):
                check_loaded_layer(name, module)
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def _expected_tensors(name: str, spec: dict[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
    n, k = spec["out_features"], spec["in_features"]
    groups = num_groups(k, spec["group_size"])
    out = {
        f"{name}.qweight": ("U8", (n, packed_columns(k, spec["bits"]))),
        f"{name}.scales": (_SAFETENSORS_DTYPES[SCALE_DTYPES[spec["scale_dtype"]]], (n, groups)),
    }
    if not spec["symmetric"]:
        zero = "U8" if spec["zero_point"] == "integer" else out[f"{name}.scales"][0]
        out[f"{name}.zeros"] = (zero, (n, groups))
    return out


def check_checkpoint(checkpoint_files: list[str], layers: dict[str, dict[str, Any]]) -> None:
    """Compare the safetensors headers with the tensors the config promises; raise on any gap."""
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    for file in checkpoint_files:
        if not str(file).endswith(".safetensors"):
            raise CheckpointError(f"{file}: hfcompress checkpoints are safetensors files")
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    found[key] = (sl.get_dtype(), tuple(sl.get_shape()))
        except (OSError, Exception) as exc:  # safetensors raises its own error types for bad headers
            raise CheckpointError(f"{file} is not a readable safetensors file ({exc}); re-save the model") from exc
    where = Path(checkpoint_files[0]).parent if checkpoint_files else "checkpoint"
    for name, spec in layers.items():
        for key, (dtype, shape) in _expected_tensors(name, spec).items():
            if key not in found:
                raise CheckpointError(
                    f"{where}: tensor {key!r} ({dtype} {list(shape)}) is missing; the save was interrupted or "
                    "the files were edited. Re-save the compressed model"
                )
            if found[key] != (dtype, shape):
                raise CheckpointError(
                    f"{where}: tensor {key!r} is {found[key][0]} {list(found[key][1])}, expected {dtype} "
                    f"{list(shape)}; the checkpoint does not match its quantization_config"
                )


def check_loaded_layer(name: str, layer: QuantLinear) -> None:
    """Raise when a loaded layer's scales are not finite and positive, or zero points overflow."""
    if layer.qweight.is_meta:
        raise CheckpointError(f"tensor {name}.qweight was not loaded")
    scales = layer.scales.float()
    if not torch.isfinite(scales).all() or not (scales > 0).all():
        raise CheckpointError(
            f"tensor {name}.scales holds NaN, infinite or non-positive values; the checkpoint is corrupt"
        )
    if layer.symmetric:
        return
    if layer.zeros.is_floating_point():
        if not torch.isfinite(layer.zeros.float()).all():
            raise CheckpointError(f"tensor {name}.zeros holds NaN or infinite values; the checkpoint is corrupt")
    elif int(layer.zeros.max()) > 2**layer.bits - 1:
        raise CheckpointError(f"tensor {name}.zeros exceeds {2**layer.bits - 1}, the largest {layer.bits}-bit code")


def attach_quantization_config(model: torch.nn.Module, recipe: dict[str, Any]) -> None:
    """Record the model's ``QuantLinear`` layers and the recipe so ``save_pretrained`` can write
    them and ``from_pretrained`` can rebuild them. Does nothing when no layer is quantized."""
    layers = {name: m.spec() for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        return
    previous = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(previous, HfCompressQuantizationConfig):
        recipe = {"stages": previous.recipe.get("stages", []) + recipe.get("stages", [])}
    config = HfCompressQuantizationConfig(recipe=recipe, layers=layers)
    model.config.quantization_config = config
    model.hf_quantizer = HfCompressQuantizer(config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD


def register() -> None:
    """Register the config and quantizer with transformers (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(HfCompressQuantizationConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(HfCompressQuantizer)
