"""Model-level patches: structural changes beyond swapping layers, recorded so they survive reload.

A compressed model may carry more than compressed layers: fused MoE experts split into
per-expert Linear layers (so they can be quantized one by one), and later an attention
implementation or a KV-cache configuration. Each such change is a registered patch: a name
and an ``apply(model, params)`` function that performs it on a freshly built model (on the
meta device, before the checkpoint's tensors load, so it must not read weights it does not
have). A technique that patches a model calls :func:`record_patch`; the record goes into
the saved ``quantization_config`` and ``from_pretrained`` re-applies every recorded patch,
in order, before anything loads, so what was saved is what comes back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from hfcompress.errors import CheckpointError

__all__ = ["Patch", "apply_patches", "earlier_patch", "record_patch", "recorded_patches", "register_patch"]

PATCHES_ATTR = "_hfcompress_patches"


@dataclass(frozen=True)
class Patch:
    """A registered patch: ``apply(model, params)`` changes ``model`` in place."""

    name: str
    apply: Callable[[nn.Module, dict[str, Any]], None]


_PATCHES: dict[str, Patch] = {}


def register_patch(name: str, apply: Callable[[nn.Module, dict[str, Any]], None]) -> Patch:
    """Register a patch under ``name``; a duplicate name raises ``ValueError``."""
    if name in _PATCHES:
        raise ValueError(f"patch {name!r} is already registered")
    patch = Patch(name, apply)
    _PATCHES[name] = patch
    return patch


def record_patch(model: nn.Module, name: str, params: dict[str, Any]) -> None:
    """Note on ``model`` that patch ``name`` was applied with ``params`` (JSON data), so the
    saved config re-applies it on load."""
    if name not in _PATCHES:
        _ensure_builtin_patches()
    if name not in _PATCHES:
        raise ValueError(f"unknown patch {name!r}; registered: {sorted(_PATCHES)}")
    records = list(getattr(model, PATCHES_ATTR, []))
    records.append({"name": name, **params})
    object.__setattr__(model, PATCHES_ATTR, records)


def recorded_patches(model: nn.Module) -> list[dict[str, Any]]:
    """The patches applied to ``model``, in order."""
    return list(getattr(model, PATCHES_ATTR, []))


def earlier_patch(marks: dict[str, str], model: nn.Module, name: str, active: bool) -> str | None:
    """Where patch ``name`` already comes from, or None: an earlier stage of this recipe (its
    mark in ``marks``, the model-level marks of a view) or an earlier run (``active``: the
    patch is switched on, or the model records it)."""
    earlier = marks.get(name)
    if earlier is None and (active or any(p.get("name") == name for p in recorded_patches(model))):
        earlier = "an earlier run"
    return earlier


def apply_patches(model: nn.Module, records: list[dict[str, Any]]) -> None:
    """Re-apply recorded patches (the loader calls this on the freshly built model)."""
    _ensure_builtin_patches()
    for record in records:
        params = {k: v for k, v in record.items() if k != "name"}
        name = record.get("name")
        if name not in _PATCHES:
            raise CheckpointError(
                f"the checkpoint needs the model patch {name!r}, which this hfcompress does not know "
                f"(known: {sorted(_PATCHES)}); upgrade hfcompress"
            )
        _PATCHES[name].apply(model, params)
    object.__setattr__(model, PATCHES_ATTR, list(records))


def _ensure_builtin_patches() -> None:
    import hfcompress.experts
    import hfcompress.techniques.block_sparse
    import hfcompress.techniques.kv_cache
    import hfcompress.techniques.rotation  # noqa: F401
