"""The one module that touches transformers' ``AttentionInterface``: registering our attention
functions (with SDPA's mask builder), switching a model to one and back, and the dense SDPA
attention our functions fall back to.

Two of our techniques replace the attention function (the quantized KV cache's
``hfcompress_kv`` and block-sparse attention's ``hfcompress_block_sparse``). A model runs one
attention function, so a model switched to one of ours refuses a switch to another.
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
    "dense_attention",
    "register_attention",
    "restore_attention",
    "switch_attention",
]

_BEFORE = "_hfcompress_attn_before"
OURS: set[str] = set()


def register_attention(name: str, fn: Callable[..., tuple[torch.Tensor, Any]]) -> None:
    """Register ``fn`` as transformers attention ``name``, its masks built as SDPA's."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(name, fn)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    OURS.add(name)


def check_attention_interface(model: nn.Module, what: str) -> None:
    """Raise :class:`ModelError` unless ``model``'s attention goes through ``AttentionInterface``."""
    if not type(model)._can_set_attn_implementation():
        raise ModelError(
            f"{type(model).__name__}'s attention does not go through transformers' AttentionInterface, so {what} "
            "cannot replace it; this model is not supported"
        )


def attention_conflict(marks: dict[str, str], model: nn.Module, name: str) -> str | None:
    """Why a stage switching ``model`` to our attention ``name`` cannot run, or None; records the
    claim in ``marks`` (the model-level marks of a :class:`~hfcompress.modifier.ModelView`)."""
    earlier = marks.get("attention")
    current = model.config._attn_implementation
    if earlier is None and current in OURS and current != name:
        earlier = f"an earlier run ({current!r})"
    if earlier is not None:
        return (
            f"the model's attention is already replaced (by {earlier}); the quantized KV cache and block-sparse "
            "attention each replace the attention function, so they do not compose: keep one"
        )
    marks["attention"] = name
    return None


def switch_attention(model: nn.Module, name: str, what: str) -> None:
    """Set ``model``'s attention to our registered ``name``, remembering the one it had.

    Raises:
        ModelError: The model already runs another of our attention functions.
    """
    current = model.config._attn_implementation
    if current in OURS and current != name:
        raise ModelError(
            f"{what} replaces the attention function, and this model already runs {current!r}; "
            "one attention-replacing technique per model (the quantized KV cache and block-sparse attention "
            "do not compose)"
        )
    if not hasattr(model, _BEFORE):
        object.__setattr__(model, _BEFORE, current)
    model.set_attn_implementation(name)


def restore_attention(model: nn.Module) -> None:
    """Undo :func:`switch_attention`: the attention the model had before."""
    if hasattr(model, _BEFORE):
        model.set_attn_implementation(getattr(model, _BEFORE))
        object.__delattr__(model, _BEFORE)


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
