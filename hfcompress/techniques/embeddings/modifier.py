"""Applies :class:`EmbeddingQuantConfig`: the input embedding becomes a ``QuantEmbedding``, or,
when the LM head shares its matrix, the head a ``QuantLinear`` and the embedding a
``TiedQuantEmbedding`` reading the head's rows."""

from __future__ import annotations

import torch
from torch import nn

from hfcompress.architectures import text_config
from hfcompress.errors import ModelError
from hfcompress.kinds import CompressedModule, is_linear_like, swap_module
from hfcompress.modifier import CompressionContext, ModelView, Modifier
from hfcompress.quant.affine import quantize_rtn
from hfcompress.quant.embedding import QuantEmbedding, TiedQuantEmbedding, embedding_scale
from hfcompress.quant.linear import SCALE_DTYPES, QuantLinear
from hfcompress.techniques.embeddings.config import EmbeddingQuantConfig
from hfcompress.techniques.weight_quant import WeightQuantModifier

__all__ = ["EmbeddingQuantModifier", "token_embedding"]


def token_embedding(model: nn.Module) -> tuple[str, nn.Module]:
    """``(name, module)`` of the model's input token embedding; a :class:`ModelError` when it
    has none that ``get_input_embeddings`` gives."""
    try:
        module = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        module = None
    for name, candidate in model.named_modules():
        if module is not None and candidate is module:
            return name, module
    raise ModelError(f"{type(model).__name__} has no input embedding that get_input_embeddings() returns")


def _tied_head(model: nn.Module, embedding: nn.Module) -> tuple[str, nn.Module] | None:
    """``(name, module)`` of the float output head that shares ``embedding``'s weight, if any."""
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if head is None or not is_linear_like(head):
        return None
    weight = getattr(head, "weight", None)
    if weight is not embedding.weight:
        # accelerate's offload hooks keep a tied pair as two meta tensors: the config says
        # whether they are one matrix.
        offloaded = weight is not None and weight.is_meta and embedding.weight.is_meta
        tied = offloaded and weight.shape == embedding.weight.shape and text_config(model).tie_word_embeddings
        if not tied:
            return None
    return next((name, m) for name, m in model.named_modules() if m is head)


class EmbeddingQuantModifier(Modifier):
    config: EmbeddingQuantConfig

    def __init__(self, config: EmbeddingQuantConfig, stage: str) -> None:
        super().__init__(config, stage)
        self.embedding = ""
        self.head: str | None = None
        self.embed_scale: float | None = None

    def check(self, model: nn.Module, context: CompressionContext, view: ModelView) -> None:
        super().check(model, context, view)
        try:
            name, module = token_embedding(model)
        except ModelError as exc:
            raise self.error(str(exc)) from None
        entry = view.entries.get(name)
        if isinstance(module, CompressedModule):
            raise self.error(f"the input embedding {name!r} is compressed already (a {type(module).__name__})")
        if entry is None or entry.stage is not None:
            raise self.error(f"the input embedding {name!r} is replaced by the earlier stage {entry and entry.stage!r}")
        try:
            self.embed_scale = embedding_scale(module)
        except ModelError as exc:
            raise self.error(f"the input embedding {name!r}: {exc}") from None
        dim = module.embedding_dim
        if self.config.group_size > dim:
            raise self.error(
                f"group_size={self.config.group_size} exceeds the embedding dimension {dim} of {name!r}; use "
                f"group_size=-1 (one scale per row) or a size <= {dim}"
            )
        if not module.weight.is_meta and not torch.isfinite(module.weight).all():
            raise self.error(f"the input embedding {name!r} has NaN or infinite weights")
        tied = _tied_head(model, module)
        if tied is not None and view.entries[tied[0]].stage is not None:
            tied = None  # an earlier stage quantizes the head: it is untied by then
        self.embedding, self.head = name, tied[0] if tied else None
        view.claim([name], self.stage, (TiedQuantEmbedding if tied else QuantEmbedding).__name__)
        if tied:
            view.claim([tied[0]], self.stage, QuantLinear.__name__)

    @torch.no_grad()
    def apply(self, model: nn.Module, context: CompressionContext) -> None:
        WeightQuantModifier.load_offloaded(model, self.embedding)
        embedding = model.get_submodule(self.embedding)
        weight = embedding.weight.detach()
        cfg = self.config
        qw = quantize_rtn(
            weight,
            bits=cfg.bits,
            group_size=cfg.group_size,
            symmetric=cfg.symmetric,
            scale_dtype=SCALE_DTYPES[cfg.scale_dtype],
            float_zero=cfg.zero_point == "float",
        )
        scheme = cfg.scheme(embedding.embedding_dim)
        if self.head is None:
            new = QuantEmbedding.from_quantized(qw, scheme, embedding, self.embed_scale)
            table = new
        else:
            head = model.get_submodule(self.head)
            table = QuantLinear.from_quantized(qw, scheme, bias=head.bias.detach() if head.bias is not None else None)
            table.stage = self.stage
            # unties the config: the head's tensors are its own now, and the embedding reads them
            swap_module(model, self.head, table, warn_untie=False)
            new = TiedQuantEmbedding(
                table,
                self.head,
                (embedding.num_embeddings, embedding.embedding_dim),
                dtype=weight.dtype,
                padding_idx=embedding.padding_idx,
                embed_scale=self.embed_scale,
            )
        w = weight.float()
        err = float((w - table.dequantize(torch.float32)).norm() / w.norm().clamp_min(1e-12))
        new.stage = self.stage
        table.quant_error = new.quant_error = err  # for the model card's per-layer plot
        model.set_submodule(self.embedding, new)
