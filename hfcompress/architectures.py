"""Per-``model_type`` tables of module names. A new architecture is a new table entry.

``blocks``: the ModuleList of transformer blocks, relative to ``model.base_model``.
``sequential``: the Linear layers of one block in the order their inputs are produced, each
inner list sharing one input; GPTQ's "true sequential" mode quantizes one group at a time and
re-runs the block in between, so later groups see the error of earlier ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from hfcompress.errors import ModelError

__all__ = ["ARCHITECTURES", "Architecture", "architecture_of", "blocks_of"]


@dataclass(frozen=True)
class Architecture:
    blocks: str
    sequential: tuple[tuple[str, ...], ...]


_LLAMA = Architecture(
    blocks="layers",
    sequential=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
)
_BERT = Architecture(
    blocks="encoder.layer",
    sequential=(
        ("attention.self.query", "attention.self.key", "attention.self.value"),
        ("attention.output.dense",),
        ("intermediate.dense",),
        ("output.dense",),
    ),
)

ARCHITECTURES: dict[str, Architecture] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "bert": _BERT,
    "roberta": _BERT,
}


def architecture_of(model: nn.Module) -> Architecture:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ModelError(
            f"no layer table for model_type={model_type!r}; supported: {', '.join(sorted(ARCHITECTURES))}. "
            "Add an entry to hfcompress.architectures.ARCHITECTURES"
        )
    return ARCHITECTURES[model_type]


def blocks_of(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The qualified name and the ModuleList of the model's transformer blocks."""
    base = getattr(model, "base_model", model)
    path = architecture_of(model).blocks
    blocks = base.get_submodule(path)
    prefix = next(name for name, module in model.named_modules() if module is blocks)
    return prefix, blocks
