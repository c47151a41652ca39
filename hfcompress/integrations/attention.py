"""The one module that touches transformers' ``AttentionInterface``: registering our attention
functions (with SDPA's mask builder), switching a model to them and back, and the dense SDPA
attention our functions fall back to.

Two of our techniques replace the attention function: the quantized KV cache's
``hfcompress_kv``, which reads a packed cache, and block-sparse attention's
``hfcompress_block_sparse``, which chooses the tiles of a call whose keys are all its own (a
prefill, a forward without a cache). They compose: a model with both runs ``hfcompress_kv``
(the *outer* function), which passes each call with no stored keys to the module's *inner*
function (:func:`sequence_attention`), block-sparse attention; steps over a cache attend
densely either way. Two outer or two inner functions on one model do not compose.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from hfcompress.errors import ModelError

__all__ = [
    "OURS",
    "attention_conflict",
    "check_attention_interface",
    "declare_outer",
    "dense_attention",
    "register_attention",
    "restore_attention",
    "sequence_attention",
    "set_inner_attention",
    "switch_attention",
]

_BEFORE = "_hfcompress_attn_before"  # on the model: the attention it ran before ours
_ON = "_hfcompress_attn_on"  # on the model: ours switched on, in order
_INNER = "_hfcompress_inner_attention"  # on an attention module: its inner function
OURS: set[str] = set()
_OUTER: set[str] = set()
# Layer types (``config.layer_types``) that attend over a window of the most recent tokens (Gemma
# 2 and 3, Cohere 2, Qwen 2 with sliding windows; Llama 4's chunks). Our attention functions leave
# them as they are: the quantized KV cache keeps their float caches, and block-sparse attention
# their dense attention, with transformers' own window masks.
WINDOWED_LAYER_TYPES = ("sliding_attention", "chunked_attention")


def register_attention(name: str, fn: Callable[..., tuple[torch.Tensor, Any]]) -> None:
    """Register ``fn`` as transformers attention ``name``, its masks built as SDPA's."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(name, fn)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    OURS.add(name)


def declare_outer(name: str) -> None:
    """Declare our attention ``name`` an outer one: it hands calls whose keys are all their own
    to :func:`sequence_attention` (declared where it is defined, so stages can check before
    anything is registered)."""
    _OUTER.add(name)


def check_attention_interface(model: nn.Module, what: str) -> None:
    """Raise :class:`ModelError` unless ``model``'s attention goes through ``AttentionInterface``."""
    if not type(model)._can_set_attn_implementation():
        raise ModelError(
            f"{type(model).__name__}'s attention does not go through transformers' AttentionInterface, so {what} "
            "cannot replace it; this model is not supported"
        )
    if not getattr(type(model), "_supports_sdpa", True):
        # Our attention functions compute what SDPA computes; such a model's attention adds to it
        # (Gemma 2's logit soft-capping, GPT-OSS's attention sinks), which they would drop.
        raise ModelError(
            f"{type(model).__name__}'s attention is not SDPA's (transformers runs it eagerly: logit soft-capping, "
            f"attention sinks or the like), and {what} computes SDPA's attention; this model is not supported"
        )


def check_layer_types(config: Any, what: str, acts: str, none_reason: str, fix: str = "") -> list[str] | None:
    """``config.layer_types`` (None when the config has none: full attention throughout), checked
    for ``what``, which ``acts`` on full-attention layers while sliding-window and chunked ones
    keep their own attention.

    Raises:
        ModelError: a layer of another type (linear attention, state-space layers), or no
            full-attention layer (``none_reason`` says why that leaves nothing to do).
    """
    types = getattr(config, "layer_types", None)
    if not types:
        return None
    other = sorted(set(types) - {"full_attention", *WINDOWED_LAYER_TYPES})
    if other:
        raise ModelError(
            f"{what} {acts} (sliding-window and chunked layers keep their own); this model also has layer types "
            f"{other}{fix}"
        )
    if "full_attention" not in types:
        raise ModelError(f"{what} {acts}, and this model has none (layer types {sorted(set(types))}): {none_reason}")
    return list(types)


def _running(model: nn.Module) -> list[str]:
    """Ours switched on for ``model`` (a model switched by hand to one of ours counts too)."""
    on = list(getattr(model, _ON, []))
    current = model.config._attn_implementation
    if current in OURS and current not in on:
        on.append(current)
    return on


def _clash(on: list[str], name: str) -> str | None:
    """The one of ``on`` that ``name`` cannot run beside (both outer or both inner), or None."""
    return next((n for n in on if n != name and (n in _OUTER) == (name in _OUTER)), None)


def attention_conflict(marks: dict[str, str], model: nn.Module, name: str, stage: str) -> str | None:
    """Why ``stage``, switching ``model`` to our attention ``name``, cannot run, or None; records
    the claim in ``marks`` (the model-level marks of a :class:`~hfcompress.modifier.ModelView`)
    as ``attention:<name>``."""
    earlier = {key.partition(":")[2]: f"stage {s!r}" for key, s in marks.items() if key.startswith("attention:")}
    for other in _running(model):
        earlier.setdefault(other, f"an earlier run ({other!r})")
    clash = _clash(list(earlier), name)
    if clash is not None:
        return (
            f"the model's attention is already replaced in the same way (by {earlier[clash]}); block-sparse "
            "attention and the quantized KV cache compose, but two of one kind do not: keep one"
        )
    marks[f"attention:{name}"] = stage
    return None


def switch_attention(model: nn.Module, name: str, what: str) -> None:
    """Switch ``name`` on for ``model`` (registered by :func:`register_attention`), remembering
    the attention the model had; the model runs the outer one of ours that are on, else the
    inner one.

    Raises:
        ModelError: The model already runs another of ours of the same kind (outer or inner).
    """
    on = _running(model)
    clash = _clash(on, name)
    if clash is not None:
        raise ModelError(
            f"{what} replaces the attention function, and this model already runs {clash!r}, which cannot run "
            "beside it (block-sparse attention and the quantized KV cache compose; two of one kind do not)"
        )
    if not hasattr(model, _BEFORE):
        current = model.config._attn_implementation
        object.__setattr__(model, _BEFORE, "sdpa" if current in OURS else current)
    if name not in on:
        on.append(name)
    object.__setattr__(model, _ON, on)
    _settle(model)


def restore_attention(model: nn.Module, name: str) -> None:
    """Undo :func:`switch_attention` of ``name``: the other of ours still on, else the
    attention the model had before."""
    on = [n for n in _running(model) if n != name]
    object.__setattr__(model, _ON, on)
    _settle(model)


def _settle(model: nn.Module) -> None:
    on = getattr(model, _ON)
    if not on:
        if hasattr(model, _BEFORE):
            model.set_attn_implementation(getattr(model, _BEFORE))
            object.__delattr__(model, _BEFORE)
        object.__delattr__(model, _ON)
        return
    outer = [n for n in on if n in _OUTER]
    model.set_attn_implementation(outer[0] if outer else on[0])


def set_inner_attention(module: nn.Module, fn: Callable[..., tuple[torch.Tensor, Any]] | None) -> None:
    """Make ``fn`` the function :func:`sequence_attention` runs for ``module`` (None: SDPA)."""
    if fn is not None:
        object.__setattr__(module, _INNER, fn)
    elif hasattr(module, _INNER):
        object.__delattr__(module, _INNER)


def sequence_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """What an outer function runs for a call whose keys are all its own: ``module``'s inner
    function (block-sparse attention) if it has one, else SDPA."""
    fn = getattr(module, _INNER, None) or dense_attention
    return fn(module, query, key, value, attention_mask, dropout, scaling, **kwargs)


def dense_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention (the dense path of our functions)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
