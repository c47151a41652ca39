"""Module kinds: the compressed modules a checkpoint can hold, in an explicit registry.

A module kind is an ``nn.Module`` subclass of :class:`CompressedModule` that owns its layout:
its ``spec()`` (plain data that the checkpoint's config records), how to rebuild an empty one
from that spec in place of the float module it replaced, which tensors a checkpoint must
hold for it, and the checks of those tensors once loaded. The transformers loader and the
per-block checkpoints only talk to this interface, so a new technique adds a kind in one
file plus one :func:`register_module_kind` line, without touching the loader.

Linear-like float modules are ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2's
projections, whose weight is stored transposed, ``[K, N]``), and their subclasses that compute
the same (:func:`is_linear_like`); :func:`linear_weight` gives either as ``W: [N, K]``.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from hfcompress.architectures import text_config
from hfcompress.errors import CheckpointError

logger = logging.getLogger(__name__)

__all__ = [
    "LINEAR_CLASSES",
    "SAME_FORWARD_SUBCLASSES",
    "CompressedModule",
    "compressed_modules",
    "get_module_kind",
    "is_linear_like",
    "linear_class_names",
    "linear_features",
    "linear_weight",
    "plain_linear_class",
    "register_module_kind",
    "registered_module_kinds",
    "swap_module",
]

LINEAR_CLASSES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)
# Subclasses that override forward to compute the same x W^T + b (Falcon's, as a plain matmul).
SAME_FORWARD_SUBCLASSES = frozenset({"FalconLinear"})


def is_linear_like(module: nn.Module) -> bool:
    """True for a float layer that computes ``x W^T + b`` through its forward: ``nn.Linear``,
    ``Conv1D``, and their subclasses that keep that forward (compressed kinds are not
    linear-like). A subclass with a forward of its own (an MoE router that returns the top
    experts, bitsandbytes' quantized layers) is not: a quantized layer in its place would
    compute something else."""
    return isinstance(module, LINEAR_CLASSES) and plain_linear_class(type(module))


@functools.cache
def plain_linear_class(cls: type) -> bool:
    """Whether instances of ``cls`` (a subclass of one of :data:`LINEAR_CLASSES`) are linear-like
    (:func:`is_linear_like`)."""
    if cls in LINEAR_CLASSES or cls.__name__ in SAME_FORWARD_SUBCLASSES:
        return True
    if cls.__name__ == "NonDynamicallyQuantizableLinear":  # nn.MultiheadAttention reads its weight, not its forward
        return False
    return cls.forward in (nn.Linear.forward, Conv1D.forward)


def linear_class_names() -> frozenset[str]:
    """The class names the target pattern ``"Linear"`` stands for: the linear-like classes
    defined so far (:func:`is_linear_like`)."""
    found, todo = set(), list(LINEAR_CLASSES)
    while todo:
        cls = todo.pop()
        if plain_linear_class(cls):
            found.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return frozenset(found)


def linear_features(module: nn.Module) -> tuple[int, int]:
    """``(in_features K, out_features N)`` of a linear-like module."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a linear-like module as ``W: [N, K]`` (a view; Conv1D's is transposed)."""
    if isinstance(module, Conv1D):
        return module.weight.t()
    return module.weight


class CompressedModule(nn.Module):
    """Base class of every module kind.

    Subclasses set ``kind`` (the name a checkpoint records), ``replaces`` (the float module
    classes it may stand in for), ``marker_tensors`` (tensor names that only this kind
    stores, so a loader can tell a checkpoint holds one where its config says none), and
    implement the methods below.
    """

    kind: ClassVar[str] = ""
    replaces: ClassVar[tuple[type[nn.Module], ...]] = LINEAR_CLASSES
    marker_tensors: ClassVar[tuple[str, ...]] = ()
    # Whether loading marks the parent module initialised too (see the transformers loader):
    # needed where a parent's weight init reaches into a child's ``weight``; wrong where the
    # parent's init sets buffers of its own (BERT's embeddings set their position ids there).
    shields_parent_init: ClassVar[bool] = True

    def spec(self) -> dict[str, Any]:
        """The layout as plain JSON data; must include ``"kind": self.kind``."""
        raise NotImplementedError

    @classmethod
    def from_spec(cls, spec: dict[str, Any], original: nn.Module) -> CompressedModule:
        """An empty module of ``spec``'s layout, to load tensors into, in place of ``original``
        (whose bias presence and float dtype it follows). Called under ``torch.device("meta")``
        by the loader."""
        raise NotImplementedError

    @classmethod
    def validate_spec(cls, name: str, spec: dict[str, Any]) -> None:
        """Raise :class:`CheckpointError` naming ``name`` when ``spec`` is malformed."""

    @classmethod
    def expected_tensors(cls, name: str, spec: dict[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Every tensor a checkpoint must hold for this module, by full key: (safetensors
        dtype, shape). Float tensors whose dtype follows the model (a bias) are left out."""
        raise NotImplementedError

    def attach(self, model: nn.Module) -> None:
        """Called once the whole ``model`` is loaded, before :meth:`check_loaded`: a module that
        reads another's tensors (an embedding tied to its LM head) links to it here."""

    def check_loaded(self, name: str) -> None:
        """Raise :class:`CheckpointError` when the loaded tensors are not usable."""

    def storage_bytes(self) -> int:
        """Bytes of the compressed weight (bias excluded)."""
        raise NotImplementedError

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``[N, K]`` float weight of the linear map this module computes (its input
        quantization aside), for ``model.dequantize()``."""
        raise NotImplementedError(f"{type(self).__name__} ({self.kind!r}) has no float form: it cannot be dequantized")

    def dense_bias(self) -> torch.Tensor | None:
        """The bias added to that map's output, or None."""
        bias = getattr(self, "bias", None)
        return bias if isinstance(bias, torch.Tensor) else None

    def linear_spec(self, **layout: Any) -> dict[str, Any]:
        """The spec of a linear-like kind: its kind, ``in_features``, ``out_features``, the
        ``layout`` fields, and the recipe stage that made it when known."""
        spec: dict[str, Any] = {
            "kind": self.kind,
            "in_features": self.in_features,
            "out_features": self.out_features,
            **layout,
        }
        if getattr(self, "stage", None) is not None:
            spec["stage"] = self.stage
        return spec

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)
        # A saved checkpoint holds an empty uint8 `weight` for its first compressed layer (the
        # load guard, see transformers_quantizer): not a tensor of this module, and not an
        # unexpected key when the file's state dict is loaded with torch's load_state_dict (a
        # strict load, or the Trainer resuming from a checkpoint).
        key = f"{prefix}weight"
        guard = state_dict.get(key)
        if (
            key in unexpected_keys
            and isinstance(guard, torch.Tensor)
            and guard.dtype == torch.uint8
            and not guard.numel()
        ):
            unexpected_keys.remove(key)

    @staticmethod
    def replaced_features(spec: dict[str, Any], original: nn.Module) -> tuple[int, int]:
        """``(K, N)`` of ``original``; a :class:`CheckpointError` when the spec's differ."""
        k, n = linear_features(original)
        if (k, n) != (spec["in_features"], spec["out_features"]):
            raise CheckpointError(
                f"the config describes a {spec['in_features']} -> {spec['out_features']} layer where the model has "
                f"{k} -> {n}"
            )
        return k, n


_KINDS: dict[str, type[CompressedModule]] = {}


def register_module_kind(cls: type[CompressedModule]) -> type[CompressedModule]:
    """Register a module kind under ``cls.kind``; a duplicate name raises ``ValueError``.
    Usable as a class decorator."""
    if not (isinstance(cls, type) and issubclass(cls, CompressedModule)) or not cls.kind:
        raise ValueError(f"{cls!r} must subclass CompressedModule and set `kind`")
    if cls.kind in _KINDS:
        raise ValueError(f"module kind {cls.kind!r} is already registered by {_KINDS[cls.kind].__name__}")
    _KINDS[cls.kind] = cls
    return cls


def get_module_kind(kind: str) -> type[CompressedModule]:
    """The class registered as ``kind``, or a :class:`CheckpointError` listing the known kinds."""
    _ensure_builtin_kinds()
    try:
        return _KINDS[kind]
    except KeyError:
        raise CheckpointError(
            f"unknown module kind {kind!r}; this hfcompress knows {sorted(_KINDS)}. Upgrade hfcompress"
        ) from None


def registered_module_kinds() -> dict[str, type[CompressedModule]]:
    _ensure_builtin_kinds()
    return dict(_KINDS)


def compressed_modules(model: nn.Module) -> dict[str, CompressedModule]:
    """Every compressed module of ``model``, by qualified name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, CompressedModule)}


def swap_module(model: nn.Module, name: str, new: nn.Module, *, warn_untie: bool = True) -> None:
    """Put ``new`` at ``name``, untying an output embedding that shared the old module's weight
    (with a warning, unless ``warn_untie`` is False: the caller stores the shared matrix once)."""
    old = model.get_submodule(name)
    config = getattr(model, "config", None)
    get_out = getattr(model, "get_output_embeddings", None)
    if get_out is not None and get_out() is old and getattr(config, "tie_word_embeddings", False):
        # The input embedding keeps the float weight; the output head is now its own tensor.
        config.tie_word_embeddings = False
        text_config(model).tie_word_embeddings = False
        if warn_untie:
            weight = getattr(old, "weight", None)
            size = f" ({weight.numel() * weight.element_size() / 1e6:.1f} MB)" if weight is not None else ""
            logger.warning(
                "%r shared its weight with the input embedding (tie_word_embeddings); compressing it unties them, "
                "and the embedding keeps its float copy%s, so the checkpoint stores both. To store the shared matrix "
                "once, compressed, leave %r out of this stage and add an `embeddings` stage",
                name,
                size,
                name,
            )
    model.set_submodule(name, new)


def _ensure_builtin_kinds() -> None:
    # The built-in kinds register when their module is imported.
    import hfcompress.quant.embedding
    import hfcompress.quant.linear
    import hfcompress.techniques.low_rank.layer  # noqa: F401
