"""Quantized token embeddings: the ``quant_embedding`` and ``tied_quant_embedding`` module kinds.

An embedding table ``[V, D]`` is stored like a Linear weight with ``N = V`` rows and ``K = D``
inputs (:class:`~hfcompress.quant.linear.PackedWeight`): codes packed along D, one scale (and
zero point) per row or per group of D. A lookup dequantizes only the rows it reads.

In a model whose LM head shares the input embedding's matrix (``tie_word_embeddings``), that
matrix is one packed tensor: the head is a :class:`~hfcompress.quant.linear.QuantLinear` (its
rows are the vocabulary, its inputs D, the same layout), and the input embedding is a
:class:`TiedQuantEmbedding` that looks its rows up in the head's buffers. It holds no tensors
of its own; the checkpoint records which layer it reads (``tied_to``), and loading links them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hfcompress.errors import CheckpointError, ModelError
from hfcompress.kinds import CompressedModule, register_module_kind
from hfcompress.quant.affine import QuantizedWeight
from hfcompress.quant.linear import SUPPORTED_BITS, PackedWeight
from hfcompress.quant.scheme import QuantScheme

__all__ = ["QuantEmbedding", "TiedQuantEmbedding", "embedding_scale"]


def embedding_scale(module: nn.Module) -> float | None:
    """The constant a token embedding multiplies its rows by: None for a plain ``nn.Embedding``,
    ``embed_scale`` for the scaled embeddings whose forward is ``rows * embed_scale`` (Gemma's
    ``sqrt(hidden_size)``). Raises :class:`ModelError` for any other subclass, whose forward
    may compute something a lookup of quantized rows would not, or for ``max_norm`` (which
    renormalises the rows it reads)."""
    if not isinstance(module, nn.Embedding):
        raise ModelError(f"{type(module).__name__} is not an nn.Embedding")
    if module.max_norm is not None:
        raise ModelError(f"{type(module).__name__} renormalises its rows (max_norm={module.max_norm}); not supported")
    if type(module).forward is nn.Embedding.forward:
        return None
    scale = getattr(module, "embed_scale", None)
    if scale is not None:
        value = float(scale.float().reshape(-1)[0]) if isinstance(scale, torch.Tensor) else float(scale)
        probe = torch.arange(min(8, module.num_embeddings), device=module.weight.device)
        with torch.no_grad():
            expected = module.weight[probe] * torch.tensor(value, dtype=module.weight.dtype)
            if torch.equal(module(probe), expected):
                return value
    raise ModelError(
        f"{type(module).__name__} has a forward of its own that is not a row lookup (times a constant "
        "embed_scale); its quantized rows would compute something else"
    )


def _scaled(rows: torch.Tensor, scale: float | None) -> torch.Tensor:
    return rows if scale is None else rows * torch.tensor(scale, dtype=rows.dtype)


class _EmbeddingBase(CompressedModule):
    """What both embedding kinds share: the shape, the output dtype (a float dtype that follows
    ``model.to(dtype)``, the ids being integers), padding index and row scale."""

    replaces = (nn.Embedding,)
    # Loading leaves the parent's weight init to run: BERT's embeddings set their position ids
    # there. Some parents' init also writes into this module's `weight` (ModernBERT's); a
    # stand-in on the meta device takes those writes until the load is done (see attach).
    shields_parent_init = False

    def __getattr__(self, name: str):
        if name == "weight":  # transformers' resize_token_embeddings, tie_weights, ... read it
            raise AttributeError(
                f"{type(self).__name__} holds packed integer rows, not a float `weight`: resize or tie the "
                "embeddings before compressing, or call model.dequantize() first"
            )
        return super().__getattr__(name)

    def _init_embedding(self, original_shape: tuple[int, int], dtype: torch.dtype, padding_idx, embed_scale) -> None:
        self.num_embeddings, self.embedding_dim = original_shape
        self.padding_idx = padding_idx
        self.embed_scale = embed_scale
        self.dtype = dtype
        self.stage: str | None = None

    def _apply(self, fn, recurse: bool = True):
        probe = fn(torch.empty(0, dtype=self.dtype))
        if probe.is_floating_point():
            self.dtype = probe.dtype
        return super()._apply(fn, recurse)

    def _embedding_spec(self, **fields: Any) -> dict[str, Any]:
        spec = {"kind": self.kind, "num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim}
        spec.update(fields)
        if self.embed_scale is not None:
            spec["embed_scale"] = self.embed_scale
        if self.stage is not None:
            spec["stage"] = self.stage
        return spec

    @staticmethod
    def _replaced(spec: dict[str, Any], original: nn.Module) -> tuple[int, int]:
        shape = (original.num_embeddings, original.embedding_dim)
        if shape != (spec["num_embeddings"], spec["embedding_dim"]):
            raise CheckpointError(
                f"the config describes a {spec['num_embeddings']} x {spec['embedding_dim']} embedding where the "
                f"model has {shape[0]} x {shape[1]}"
            )
        return shape

    def _loading(self, spec: dict[str, Any]):
        """This module, made from ``spec`` to be loaded into: its stage, and a stand-in weight
        for the parent's init until :meth:`attach`."""
        self.stage = spec.get("stage")
        self.__dict__["weight"] = torch.empty(self.num_embeddings, self.embedding_dim, device="meta")
        return self

    def attach(self, model: nn.Module) -> None:
        self.__dict__.pop("weight", None)  # the loading stand-in: this module has no float weight

    @staticmethod
    def _loaded_fields(spec: dict[str, Any], original: nn.Module) -> dict[str, Any]:
        """The constructor's keyword arguments for a module loaded in place of ``original``."""
        return {
            "dtype": original.weight.dtype,
            "padding_idx": original.padding_idx,
            "embed_scale": spec.get("embed_scale"),
        }

    @classmethod
    def _validate_shape(cls, name: str, spec: dict[str, Any], keys: tuple[str, ...]) -> None:
        missing = [k for k in ("num_embeddings", "embedding_dim", *keys) if k not in spec]
        if missing:
            raise CheckpointError(f"quantization_config.layers[{name!r}] lacks {missing}")

    def _lookup(self, table: PackedWeight, ids: torch.Tensor) -> torch.Tensor:
        if ids.is_floating_point():
            raise TypeError(f"an embedding takes integer token ids, got {ids.dtype}")
        return _scaled(table.rows(ids.to(table.qweight.device), self.dtype), self.embed_scale)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}" + (
            f", embed_scale={self.embed_scale:g}" if self.embed_scale is not None else ""
        )


@register_module_kind
class QuantEmbedding(_EmbeddingBase, PackedWeight):
    """A token embedding ``[V, D]`` with ``bits``-bit rows (see the module docstring).

    Args:
        num_embeddings: V.
        embedding_dim: D.
        scheme: The weight-only scheme of the rows (groups along D).
        dtype: The float dtype of the vectors it returns.
        padding_idx: Kept from the float embedding (it only matters to training).
        embed_scale: A constant the rows are multiplied by (Gemma's), or None.
        device: Where the buffers live.
    """

    kind = "quant_embedding"

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        scheme: QuantScheme,
        *,
        dtype: torch.dtype = torch.float32,
        padding_idx: int | None = None,
        embed_scale: float | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if scheme.input_activations is not None:
            raise ValueError("an embedding's scheme is weight-only")
        self._init_packed(embedding_dim, num_embeddings, scheme, device)
        self._init_embedding((num_embeddings, embedding_dim), dtype, padding_idx, embed_scale)

    @classmethod
    def from_quantized(
        cls, qw: QuantizedWeight, scheme: QuantScheme, original: nn.Embedding, embed_scale: float | None
    ) -> QuantEmbedding:
        """Build one from the quantized table of ``original`` (an ``nn.Embedding``)."""
        v, d = qw.q.shape
        module = cls(
            v,
            d,
            scheme,
            dtype=original.weight.dtype,
            padding_idx=original.padding_idx,
            embed_scale=embed_scale,
            device=qw.q.device,
        )
        module._fill(qw)
        return module

    def spec(self) -> dict[str, Any]:
        return self._embedding_spec(scheme=self.scheme.to_dict())

    @classmethod
    def from_spec(cls, spec: dict[str, Any], original: nn.Module) -> QuantEmbedding:
        v, d = cls._replaced(spec, original)
        return cls(v, d, QuantScheme.from_dict(spec["scheme"]), **cls._loaded_fields(spec, original))._loading(spec)

    @classmethod
    def validate_spec(cls, name: str, spec: dict[str, Any]) -> None:
        cls._validate_shape(name, spec, ("scheme",))
        scheme = QuantScheme.from_dict(spec["scheme"])
        if scheme.weights.num_bits not in SUPPORTED_BITS or scheme.input_activations is not None:
            raise CheckpointError(f"quantization_config.layers[{name!r}] has an embedding scheme it cannot hold")

    @classmethod
    def expected_tensors(cls, name: str, spec: dict[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
        scheme = QuantScheme.from_dict(spec["scheme"])
        return cls.packed_tensors(name, scheme, spec["num_embeddings"], spec["embedding_dim"])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._lookup(self, ids)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scheme={self.scheme.name}, group_size={self.group_size}"


@register_module_kind
class TiedQuantEmbedding(_EmbeddingBase):
    """A token embedding that reads the packed rows of the LM head it is tied to (a
    :class:`~hfcompress.quant.linear.QuantLinear` ``[V, D]``); it stores nothing itself.

    Args:
        source: The head whose buffers hold the table (None until linked after loading).
        source_name: Its qualified name in the model, recorded as ``tied_to``.
        shape: ``(V, D)``.
        dtype: The float dtype of the vectors it returns.
        padding_idx: Kept from the float embedding.
        embed_scale: A constant the rows are multiplied by, or None.
    """

    kind = "tied_quant_embedding"
    marker_tensors = ()

    def __init__(
        self,
        source: PackedWeight | None,
        source_name: str,
        shape: tuple[int, int],
        *,
        dtype: torch.dtype = torch.float32,
        padding_idx: int | None = None,
        embed_scale: float | None = None,
    ) -> None:
        super().__init__()
        self._init_embedding(shape, dtype, padding_idx, embed_scale)
        self.tied_to = source_name
        self.__dict__["_source"] = None  # not a submodule: the head's tensors are saved once, under its name
        if source is not None:
            self.link(source)

    def link(self, source: nn.Module) -> None:
        """Read rows from ``source`` from now on (the head named ``tied_to``)."""
        if not isinstance(source, PackedWeight) or (source.out_features, source.in_features) != (
            self.num_embeddings,
            self.embedding_dim,
        ):
            raise CheckpointError(
                f"the embedding is tied to {self.tied_to!r}, which must be a packed {self.num_embeddings} x "
                f"{self.embedding_dim} layer; it is {type(source).__name__}"
            )
        self.__dict__["_source"] = source

    @property
    def source(self) -> PackedWeight:
        if self._source is None:
            raise ModelError(f"this embedding reads the rows of {self.tied_to!r} and is not linked to it yet")
        return self._source

    def attach(self, model: nn.Module) -> None:
        super().attach(model)
        try:
            head = model.get_submodule(self.tied_to)
        except AttributeError:
            raise CheckpointError(f"the embedding is tied to {self.tied_to!r}, which this model lacks") from None
        self.link(head)

    def spec(self) -> dict[str, Any]:
        return self._embedding_spec(tied_to=self.tied_to)

    @classmethod
    def from_spec(cls, spec: dict[str, Any], original: nn.Module) -> TiedQuantEmbedding:
        shape = cls._replaced(spec, original)
        return cls(None, spec["tied_to"], shape, **cls._loaded_fields(spec, original))._loading(spec)

    @classmethod
    def validate_spec(cls, name: str, spec: dict[str, Any]) -> None:
        cls._validate_shape(name, spec, ("tied_to",))

    @classmethod
    def expected_tensors(cls, name: str, spec: dict[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {}

    def check_loaded(self, name: str) -> None:
        if self._source is None:
            raise CheckpointError(f"embedding {name!r} was not linked to the layer {self.tied_to!r} it reads")

    def storage_bytes(self) -> int:
        return 0  # the rows are the head's, counted there

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.source.dequantize(dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._lookup(self.source, ids)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tied_to={self.tied_to!r}"
