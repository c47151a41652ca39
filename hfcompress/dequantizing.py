"""``model.dequantize()``: a compressed model back to a plain float transformers model.

Each compressed layer becomes the float layer of the class the model's own config builds at
that name (``nn.Linear``, GPT-2's ``Conv1D``, Falcon's ``FalconLinear``, the model's embedding
class for a quantized embedding, tied to its head again when they shared one table), holding the weight
the compressed layer computes with (:meth:`~hfcompress.kinds.CompressedModule.dense_weight`:
the dequantized codes, a low-rank layer's ``B A`` plus its base) and its bias. Input
quantization goes: the float layer reads its input as it is. The quantized KV cache and
block-sparse attention are switched off, and the quantization config is removed, so that
``save_pretrained`` writes, and transformers alone loads, the model that runs.

Refused, with nothing changed: models whose structure a patch changed beyond what a plain
model can hold (rotation's norms and online Hadamard transform, MoE experts split from their
fused tensors).
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from hfcompress.architectures import build_on_meta, text_config
from hfcompress.errors import ModelError
from hfcompress.kinds import CompressedModule, compressed_modules, is_linear_like
from hfcompress.patches import PATCHES_ATTR, recorded_patches
from hfcompress.quant.embedding import QuantEmbedding, TiedQuantEmbedding

__all__ = ["dequantize_model"]

logger = logging.getLogger(__name__)

# Patches that are switches on a plain model, undone by switching them off.
_SWITCHES = ("kv_cache", "block_sparse")


def _outermost(model: nn.Module) -> dict[str, CompressedModule]:
    """Compressed modules not inside another (a low-rank layer's quantized base goes with it)."""
    out: dict[str, CompressedModule] = {}
    for name, module in compressed_modules(model).items():
        if not any(name.startswith(f"{outer}.") for outer in out):
            out[name] = module
    return out


def _float_templates(model: nn.Module) -> nn.Module | None:
    """The model as its config builds it, on the meta device (no memory), or None when its class
    cannot be built from its config (its compressed layers then become ``nn.Linear``)."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return build_on_meta(model, config)


def _float_embedding(template: nn.Module | None, module: CompressedModule, dtype: torch.dtype) -> nn.Module:
    table = module.dense_weight(torch.float32)  # [V, D]
    if not isinstance(template, nn.Embedding) or template.weight.shape != table.shape:
        template = nn.Embedding(*table.shape, padding_idx=module.padding_idx, device="meta")
    layer = template.to_empty(device=table.device).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(table)
        scale = getattr(layer, "embed_scale", None)
        if isinstance(scale, torch.Tensor):  # a buffer that to_empty left uninitialised
            scale.fill_(module.embed_scale)
    return layer


def _float_layer(template: nn.Module | None, module: CompressedModule, dtype: torch.dtype) -> nn.Module:
    if isinstance(module, (QuantEmbedding, TiedQuantEmbedding)):
        return _float_embedding(template, module, dtype)
    weight = module.dense_weight(torch.float32)  # [N, K]
    bias = module.dense_bias()
    device = weight.device
    if template is None or not is_linear_like(template):
        template = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer = template.to_empty(device=device).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(weight.t() if isinstance(layer, Conv1D) else weight)
        if layer.bias is not None:
            if bias is None:
                layer.bias.zero_()
            else:
                layer.bias.copy_(bias)
    if bias is not None and layer.bias is None:
        raise ModelError(f"the compressed layer has a bias, and the model builds {type(layer).__name__} without one")
    return layer


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace ``model``'s compressed layers by float ones in ``dtype`` (default: the model's
    float dtype) and switch off its attention patches, in place (module docstring); returns it.

    Raises:
        ModelError: a patch that a plain model cannot hold; nothing is changed then.
    """
    from hfcompress.techniques.block_sparse.attention import disable_block_sparse
    from hfcompress.techniques.kv_cache import disable_kv_cache

    structural = [p.get("name") for p in recorded_patches(model) if p.get("name") not in _SWITCHES]
    if structural:
        raise ModelError(
            f"this model cannot be dequantized: patch {structural[0]!r} changed its structure (rotation replaces its "
            "norms and adds an online Hadamard transform; split experts replace the fused expert tensors), which "
            "a plain transformers model cannot hold. Dequantize a model compressed without it"
        )
    layers = _outermost(model)
    if dtype is None:
        floats = [p.dtype for n, p in model.named_parameters() if p.is_floating_point()]
        dtype = floats[0] if floats else torch.float32
    templates = _float_templates(model) if layers else None
    # Build every float layer before replacing any: an error leaves the model as it was.
    replacements = {}
    for name, module in layers.items():
        template = None
        if templates is not None:
            # Under a peft adapter the layer is the wrapper's base_layer; the float model has it
            # at the wrapper's place.
            try:
                template = templates.get_submodule(name.replace(".base_layer", ""))
            except AttributeError:
                pass
        replacements[name] = _float_layer(template, module, dtype)
    for name, layer in replacements.items():
        model.set_submodule(name, layer)
    for name, module in layers.items():
        if isinstance(module, TiedQuantEmbedding):  # tie the float head and embedding again
            model.get_submodule(module.tied_to).weight = model.get_submodule(name).weight
            model.config.tie_word_embeddings = text_config(model).tie_word_embeddings = True
    disable_kv_cache(model)
    disable_block_sparse(model)
    if hasattr(model, PATCHES_ATTR):
        object.__delattr__(model, PATCHES_ATTR)
    logger.info("dequantized %d compressed layers to %s", len(replacements), dtype)
    return model
