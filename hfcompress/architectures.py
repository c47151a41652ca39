"""Where a model's repeated transformer blocks are, and which of their layers share an input.

Both are discovered from the model, so any architecture works without an entry here:

* the blocks are the ``nn.ModuleList`` whose items are all of one class named in the
  model's ``_no_split_modules`` (transformers' own list of its repeated block classes), else
  the longest ``ModuleList`` of two or more items of one class;
* the layers of a block that read the same input (q/k/v after the attention norm, gate/up
  after the MLP norm, one expert's projections) are found by tracing one forward of the
  block (:func:`sequential_groups`), as llm-compressor and GPTQModel do.

``ARCHITECTURES`` holds per-``model_type`` overrides of the block path only, for models where
the discovery would pick the wrong list.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from hfcompress.errors import ModelError

logger = logging.getLogger(__name__)

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "blocks_of",
    "build_on_meta",
    "find_blocks",
    "outside_language_model",
    "sequential_groups",
    "text_config",
]


def text_config(model: nn.Module):
    """The config of ``model``'s text part (its whole config for a text-only model), or None
    for a module without a config."""
    config = getattr(model, "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


@dataclass(frozen=True)
class Architecture:
    """An override: ``blocks`` is the path of the block list relative to ``model.base_model``."""

    blocks: str


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("layers"),
    "mistral": Architecture("layers"),
    "qwen2": Architecture("layers"),
    "qwen3": Architecture("layers"),
    "bert": Architecture("encoder.layer"),
    "roberta": Architecture("encoder.layer"),
}


def _uniform_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    out = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 1:
            classes = {type(m) for m in module}
            if len(classes) == 1:
                out.append((name, module))
    return out


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Discover the block list (see the module docstring); raise :class:`ModelError` if none."""
    lists = _uniform_lists(model)
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    named = [(n, m) for n, m in lists if type(m[0]).__name__ in no_split]
    candidates = named or [(n, m) for n, m in lists if len(m) >= 2]
    # A multimodal model (its text config is not its config): the language model's blocks, not
    # a vision tower's, which may be the longer list (Qwen2-VL-2B: 32 vision blocks, 28 text).
    decoder = _language_model(model)
    if decoder is not None:
        inside = [(n, m) for n, m in candidates if n.startswith(f"{decoder}.")]
        candidates = inside or candidates
    if not candidates:
        depth = getattr(text_config(model), "num_hidden_layers", None)
        longest = max((len(m) for n, m in lists), default=0)
        if isinstance(depth, int) and 0 < longest < depth:
            raise ModelError(
                f"{type(model).__name__} runs its blocks more than once (num_hidden_layers={depth}, but its longest "
                f"block list holds {longest}: weights shared across layers, as ALBERT's are). The layerwise stages "
                "(gptq, awq, smoothquant, low_rank, ...) need a block per layer; round-to-nearest (rtn) works on it"
            )
        raise ModelError(
            f"cannot find the repeated transformer blocks of {type(model).__name__}: no nn.ModuleList of identical "
            "blocks. Add an entry for its model_type to hfcompress.architectures.ARCHITECTURES"
        )
    # The longest list; on a tie the first (outermost) one in module order.
    return max(candidates, key=lambda item: len(item[1]))


def _language_model(model: nn.Module) -> str | None:
    """The qualified name of a multimodal model's language model (``get_decoder()``), or None
    for a text-only model or one without it."""
    config = getattr(model, "config", None)
    if config is None or text_config(model) is config or not hasattr(model, "get_decoder"):
        return None
    try:
        decoder = model.get_decoder()
    except Exception:  # a model class whose get_decoder does not apply
        return None
    if not isinstance(decoder, nn.Module) or decoder is model:
        return None
    return next((name for name, module in model.named_modules() if module is decoder), None)


def outside_language_model(model: nn.Module) -> frozenset[str]:
    """The modules of a multimodal model outside its language model and LM head (the vision
    tower, the projector): the default target ``"Linear"`` leaves them alone. Empty for a
    text-only model."""
    decoder = _language_model(model)
    if decoder is None:
        return frozenset()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    keep = (f"{decoder}.",)
    names = [(name, module) for name, module in model.named_modules()]
    heads = {name for name, module in names if head is not None and module is head}
    return frozenset(
        name
        for name, _ in names
        if name
        and name != decoder
        and not name.startswith(keep)
        and name not in heads
        and not any(name.startswith(f"{h}.") for h in heads)
        and not decoder.startswith(f"{name}.")  # the language model's ancestors
    )


def build_on_meta(model: nn.Module, config) -> nn.Module | None:
    """A model of ``model``'s class built from ``config`` on the meta device (no memory): what
    ``from_pretrained`` would lay out. None (logged) when the class cannot be built from a config."""
    try:
        with torch.device("meta"):
            return type(model)(config)
    except Exception as exc:  # a model class with a construction of its own
        logger.debug("%s(config) could not be built on the meta device: %s", type(model).__name__, exc)
        return None


def blocks_of(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The qualified name and the ModuleList of the model's transformer blocks."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        return find_blocks(model)
    base = getattr(model, "base_model", model)
    blocks = base.get_submodule(ARCHITECTURES[model_type].blocks)
    prefix = next(name for name, module in model.named_modules() if module is blocks)
    return prefix, blocks


@torch.no_grad()
def sequential_groups(block: nn.Module, names: list[str], run: Callable[[], None]) -> list[list[str]]:
    """Group ``names`` (layers inside ``block``) by the input tensor they read, in the order
    the block first calls them, by tracing one call of ``run()`` (which runs the block).

    Layers never called by ``run`` form a last group. GPTQ's true-sequential mode quantizes
    one group at a time and re-runs the block in between.
    """
    order: list[tuple[str, torch.Tensor]] = []
    seen: set[str] = set()

    def hook_for(name: str):
        def hook(_module, inputs):
            if name not in seen:
                seen.add(name)
                order.append((name, inputs[0]))

        return hook

    handles = [block.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in names]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[str]] = []
    inputs: list[torch.Tensor] = []
    for name, x in order:
        for i, other in enumerate(inputs):
            if other is x:
                groups[i].append(name)
                break
        else:
            groups.append([name])
            inputs.append(x)
    missing = [n for n in names if n not in seen]
    return groups + ([missing] if missing else [])
