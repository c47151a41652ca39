"""LoRA on compressed models through peft (QLoRA-style).

The packed weights of a :class:`~hfcompress.quant.QuantLinear` stay frozen (they are buffers,
not parameters); the adapter's two small matrices train, and gradients reach earlier layers
through the layer's dequantize path (``QuantLinear`` switches to it whenever its input needs
a gradient; int8 input activations pass their gradient straight through the rounding).

    from hfcompress.integrations.peft import add_lora
    model = add_lora(model, r=16, lora_alpha=32)      # a peft PeftModel
    ...train...
    model.save_pretrained("adapter")                   # the adapter only
    model = load_lora(base_compressed_model, "adapter")

peft's own ``get_peft_model`` and ``PeftModel.from_pretrained`` work too: :func:`install`
(run when peft is imported in a process that imported hfcompress) teaches peft's LoRA to wrap
``QuantLinear`` layers and makes ``target_modules="all-linear"`` include them.
``merge``/``merge_and_unload`` into packed weights are refused: the merged
weight is not on the quantization grid, and writing it back would quietly re-quantize the
adapter away. After ``model.dequantize()`` the base layers are float and the adapters merge
into them (the QLoRA way to a float model with the adapter in it).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import peft
import torch
from peft.tuners import tuners_utils
from peft.tuners.lora import model as lora_model
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from peft.utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND, SEQ_CLS_HEAD_NAMES
from peft.utils.other import ModulesToSaveWrapper
from torch import nn

from hfcompress.errors import ModelError
from hfcompress.kinds import CompressedModule, compressed_modules, linear_weight
from hfcompress.quant.embedding import TiedQuantEmbedding
from hfcompress.quant.linear import PackedWeight, QuantLinear
from hfcompress.versions import require

__all__ = ["QuantLoraLinear", "add_lora", "install", "load_lora", "register_quant_linear"]


class QuantLoraLinear(nn.Module, LoraLayer):
    """A LoRA adapter around a frozen :class:`QuantLinear`: ``base(x) + B(A(dropout(x))) * s``."""

    # peft's LoraLayer lists the adapter's parameter names here.
    adapter_layer_names = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: Any, r: int = 0, lora_alpha: int = 1, **kwargs
    ):
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features  # peft would warn "unsupported layer type"

    def resolve_lora_variant(self, *, config: Any, **kwargs):
        variants = [
            f
            for f in ("use_dora", "alora_invocation_tokens", "arrow_config", "velora_config")
            if getattr(config, f, None)
        ]
        if variants:
            raise ModelError(f"LoRA on hfcompress QuantLinear layers supports plain LoRA only, not {variants}")
        return None

    def _float_base(self) -> nn.Module:
        """The base layer, which must be float to merge into (after ``model.dequantize()``)."""
        base = self.get_base_layer()
        if isinstance(base, CompressedModule):
            raise ModelError(
                "a LoRA adapter cannot be merged into packed quantized weights (the sum is not on their grid, and "
                "re-quantizing it would undo most of the adapter). Keep the adapter unmerged (save it with "
                "save_pretrained and load it with hfcompress.integrations.peft.load_lora), or call "
                "model.dequantize() first: the base layers become float, and the adapter merges into them"
            )
        return base

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the adapters' ``B A * s`` to a float base layer (after ``model.dequantize()``)."""
        base = self._float_base()
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.lora_A:
                continue
            weight = linear_weight(base)  # [N, K] (a transposed view of a Conv1D's)
            merged = weight.detach().float() + self.get_delta_weight(name).float()
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            with torch.no_grad():
                weight.copy_(merged.to(weight.dtype))
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        base = self._float_base()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight = linear_weight(base)
            with torch.no_grad():
                weight.copy_((weight.float() - self.get_delta_weight(name).float()).to(weight.dtype))

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        kwargs.pop("adapter_names", None)
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            h = self._cast_input_dtype(self.lora_dropout[name](x), lora_a.weight.dtype)
            result = result + (lora_b(lora_a(h)) * self.scaling[name]).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def register_quant_linear(config: Any) -> Any:
    """Teach a peft ``LoraConfig`` to wrap :class:`QuantLinear` layers; returns it."""
    config._register_custom_module({QuantLinear: QuantLoraLinear})
    return config


def _default_targets(model: nn.Module) -> list[str]:
    """Last names of the quantized layers, and of the float factors of low-rank layers (a
    low-rank layer itself is a container peft does not wrap)."""
    from hfcompress.techniques.low_rank.layer import LowRankLinear

    names = set()
    for name, module in compressed_modules(model).items():
        if isinstance(module, QuantLinear):
            names.add(name.rpartition(".")[2])
        elif isinstance(module, LowRankLinear):
            names.update(c for c in ("factor_in", "factor_out") if isinstance(getattr(module, c), nn.Linear))
    names = sorted(names)
    if not names:
        raise ModelError("the model has no compressed layers; use peft directly for a float model")
    return names


def add_lora(model: nn.Module, config: Any = None, **lora_kwargs) -> nn.Module:
    """Wrap ``model`` for LoRA training (a peft ``PeftModel``).

    Args:
        model: A model compressed by hfcompress (its QuantLinear layers get adapters; float
            Linear layers named in ``target_modules`` get peft's usual ones).
        config: A peft ``LoraConfig``; built from ``lora_kwargs`` when None. When it names no
            ``target_modules``, every compressed layer's name (``q_proj``, ...) is targeted.
        **lora_kwargs: ``LoraConfig`` fields (``r``, ``lora_alpha``, ``lora_dropout``, ...).
    """
    if config is None:
        task = "CAUSAL_LM" if getattr(model, "can_generate", lambda: False)() else "SEQ_CLS"
        lora_kwargs.setdefault("task_type", task)
        lora_kwargs.setdefault("target_modules", _default_targets(model))
        config = peft.LoraConfig(**lora_kwargs)
    elif lora_kwargs:
        raise TypeError("pass either a LoraConfig or LoraConfig fields, not both")
    elif config.target_modules is None:
        config.target_modules = _default_targets(model)
    return peft.get_peft_model(model, register_quant_linear(config))


def load_lora(model: nn.Module, adapter: str | os.PathLike, *, is_trainable: bool = False) -> nn.Module:
    """Load a saved adapter onto a compressed ``model`` (peft's ``PeftModel.from_pretrained``
    with the QuantLinear mapping registered)."""
    config = register_quant_linear(peft.LoraConfig.from_pretrained(str(adapter)))
    return peft.PeftModel.from_pretrained(model, str(adapter), config=config, is_trainable=is_trainable)


def _quantized_linear_names(config: Any, model: nn.Module) -> set[str]:
    """For ``target_modules="all-linear"``: the QuantLinear layers peft's own expansion misses
    (it looks for ``nn.Linear``), leaving out what it leaves out of float models: the output
    head, a classifier's head, and layers already inside an adapter."""
    targets = getattr(config, "target_modules", None)
    if not (isinstance(targets, str) and targets.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND):
        return set()
    exclude: set[nn.Module] = set()
    get_output = getattr(model, "get_output_embeddings", None)
    if get_output is not None and get_output() is not None:
        exclude.add(get_output())
    if getattr(config, "task_type", None) == "SEQ_CLS":
        exclude.update(m for m in (getattr(model, n, None) for n in SEQ_CLS_HEAD_NAMES) if m is not None)
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            exclude.update(module.modules())
    return {name for name, m in model.named_modules() if isinstance(m, QuantLinear) and m not in exclude}


_installed = False


def install() -> None:
    """Teach peft, in this process, to put LoRA adapters on hfcompress layers: a ``LoraConfig``
    that reaches a ``QuantLinear`` gets the :class:`QuantLoraLinear` mapping
    (:func:`register_quant_linear`), and ``"all-linear"`` includes ``QuantLinear`` layers.
    Nothing changes for other layers. Idempotent."""
    global _installed
    if _installed:
        return
    require("peft")  # older peft builds LoRA layers with other arguments
    create = lora_model.LoraModel._create_new_module

    def create_new_module(lora_config, adapter_name, target, **kwargs):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, QuantLinear):
            register_quant_linear(lora_config)
        return create(lora_config, adapter_name, target, **kwargs)

    expand = tuners_utils._maybe_include_all_linear_layers

    def include_all_linear(peft_config, model):
        quantized = _quantized_linear_names(peft_config, model)
        peft_config = expand(peft_config, model)
        if quantized:
            peft_config.target_modules = set(peft_config.target_modules) | quantized
        return peft_config

    wrap_init = ModulesToSaveWrapper.__init__

    def modules_to_save_init(self, module_to_save, *args, **kwargs):
        wrap_init(self, module_to_save, *args, **kwargs)
        _warn_if_frozen(module_to_save)

    lora_model.LoraModel._create_new_module = staticmethod(create_new_module)
    tuners_utils._maybe_include_all_linear_layers = include_all_linear
    ModulesToSaveWrapper.__init__ = modules_to_save_init
    _installed = True


def _warn_if_frozen(module: nn.Module) -> None:
    """peft trains a ``modules_to_save`` module whole (a classifier's head under
    ``task_type="SEQ_CLS"``); a packed weight in it cannot train, which would leave the head
    learning only its bias."""
    layer = next((m for m in module.modules() if isinstance(m, (PackedWeight, TiedQuantEmbedding))), None)
    if layer is not None:
        what = f"a compressed {type(layer).__name__} ({getattr(layer, 'in_features', '?')} -> "
        what += f"{getattr(layer, 'out_features', '?')})"
        if layer is not module:
            what += f" inside a {type(module).__name__}"
        warnings.warn(
            f"peft trains {what} whole (modules_to_save: a classifier head under task_type='SEQ_CLS'), but its packed "
            "weight cannot train: only its float parameters (a bias) will. Leave the head out of the recipe (ignore: "
            "[classifier], as the bundled BERT recipes do), or dequantize the model first",
            UserWarning,
            stacklevel=3,
        )


install()
