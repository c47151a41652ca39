"""Layer dropping: which teacher layers a student keeps, and the student itself.

A mapping is the tuple of teacher layer indices (0-based) the student keeps, in order:
student layer ``i`` starts as a copy of teacher layer ``mapping[i]`` and, under PKD, learns
from that layer's output. The blocks are found by :func:`hfcompress.architectures.blocks_of`, so any architecture
whose blocks it finds can be shortened.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Literal

from torch import nn

from hfcompress.architectures import blocks_of, build_on_meta
from hfcompress.errors import ModelError, RecipeError

__all__ = ["LAYER_MAP_KEY", "check_student_layout", "drop_layers", "layer_map", "num_layers"]

logger = logging.getLogger(__name__)

LAYER_MAP_KEY = "hfcompress_layer_map"
Strategy = Literal["skip", "last", "explicit"]


def num_layers(model: nn.Module) -> int:
    """Number of transformer blocks of ``model``."""
    return len(blocks_of(model)[1])


def layer_map(
    num_teacher_layers: int,
    strategy: Strategy,
    *,
    num_student_layers: int | None = None,
    layers: Sequence[int] = (),
) -> tuple[int, ...]:
    """The teacher layers a student keeps.

    Args:
        num_teacher_layers: Blocks in the teacher (n).
        strategy: ``"skip"`` (PKD-Skip: the last layer of each of k equal spans of the teacher:
            6 -> 3 keeps 1, 3, 5; 6 -> 4 keeps 1, 2, 4, 5), ``"last"`` (PKD-Last: the last k layers) or
            ``"explicit"`` (``layers`` as given).
        num_student_layers: k, for ``skip`` and ``last``.
        layers: The explicit list, for ``explicit``: strictly increasing, each in [0, n).
    """
    n = num_teacher_layers
    if strategy == "explicit":
        if isinstance(layers, (int, str, bytes)) or not hasattr(layers, "__iter__"):
            raise RecipeError(
                f"layers={layers!r} must be a list of teacher layer indices, e.g. [1, 3, 5]; for a student of k "
                "layers chosen for you, use strategy 'skip' or 'last' with num_student_layers=k"
            )
        keep = tuple(int(i) for i in layers)
        if not keep:
            raise RecipeError("strategy='explicit' needs `layers`: the teacher layers to keep, e.g. [1, 3, 5]")
        bad = [i for i in keep if not 0 <= i < n]
        if bad:
            raise RecipeError(f"layers {bad} do not exist in the teacher, which has layers 0..{n - 1}")
        if list(keep) != sorted(set(keep)):
            raise RecipeError(f"layers={list(keep)} must be strictly increasing (each teacher layer kept once)")
        if len(keep) >= n:
            raise RecipeError(f"layers={list(keep)} keeps all {n} teacher layers; a student must have fewer")
        return keep
    if strategy not in ("skip", "last"):
        raise RecipeError(f"strategy={strategy!r} is invalid; accepted: 'skip', 'last', 'explicit'")
    k = num_student_layers
    if k is None:
        raise RecipeError(f"strategy={strategy!r} needs num_student_layers (k)")
    if not 0 < k < n:
        raise RecipeError(f"a student of {k} layers from a teacher of {n}: accepted 1..{n - 1} layers")
    if strategy == "last":
        return tuple(range(n - k, n))
    # Student layer i takes the last teacher layer of the i-th of k equal spans of the
    # teacher: ceil((i + 1) * n / k) - 1. When k divides n this is every (n / k)-th layer
    # (6 -> 3 keeps 1, 3, 5, the paper's PKD-Skip); otherwise the spans still cover the whole
    # teacher and end on its last layer (6 -> 4 keeps 1, 2, 4, 5; 30 -> 8 keeps 3, 7, ..., 29).
    return tuple(-(-(i + 1) * n // k) - 1 for i in range(k))


def drop_layers(model: nn.Module, keep: Sequence[int], *, copy_model: bool = False) -> nn.Module:
    """Keep only the blocks ``keep`` of ``model`` (in place unless ``copy_model``) and return it.

    The config's ``num_hidden_layers`` (and ``layer_types`` where the architecture has it)
    follows; each kept block's attention learns its new index (the KV cache is indexed by it);
    ``config.hfcompress_layer_map`` records ``{"teacher_layers": [...], "num_teacher_layers": n}``
    so the mapping survives ``save_pretrained``.
    """
    if copy_model:
        model = copy.deepcopy(model)
    _, blocks = blocks_of(model)
    n = len(blocks)
    keep = layer_map(n, "explicit", layers=keep)
    check_student_layout(model, keep)
    kept = [blocks[i] for i in keep]
    for new_index, block in enumerate(kept):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    # Empty and refill the same ModuleList: the model's forward keeps its reference to it.
    while len(blocks):
        del blocks[-1]
    blocks.extend(kept)
    config = model.config
    previous = getattr(config, LAYER_MAP_KEY, None)
    # A student of a student records the layers of the original teacher.
    origin = [previous["teacher_layers"][i] for i in keep] if previous else list(keep)
    _shorten_config(config, keep, n)
    setattr(
        config,
        LAYER_MAP_KEY,
        {"teacher_layers": origin, "num_teacher_layers": previous["num_teacher_layers"] if previous else n},
    )
    return model


# Config fields that hold one entry per block (Llama 4's ``no_rope_layers``), and fields that list
# the indices of blocks of one kind (Qwen-MoE's dense ``mlp_only_layers``, Llama 4's ``moe_layers``):
# both follow the kept blocks, so that a model built from the student's config lays them out as kept.
_PER_BLOCK_FIELDS = ("layer_types", "no_rope_layers")
_INDEX_FIELDS = ("moe_layers",)


def _shorten_config(config, keep: tuple[int, ...], n: int) -> None:
    config.num_hidden_layers = len(keep)
    for field in _PER_BLOCK_FIELDS:
        values = getattr(config, field, None)
        if isinstance(values, list) and len(values) == n:
            setattr(config, field, [values[i] for i in keep])
    for field in _INDEX_FIELDS:
        values = getattr(config, field, None)
        if isinstance(values, list):
            setattr(config, field, [i for i, old in enumerate(keep) if old in values])
    only = getattr(config, "mlp_only_layers", None)
    if isinstance(only, list):
        # Qwen-MoE: block i is dense if listed, or if it is off the sparse step. The student lists
        # each kept dense block at its new index; a kept sparse block off the student's step
        # cannot be expressed, and check_student_layout refuses it.
        step = getattr(config, "decoder_sparse_step", 1) or 1
        experts = getattr(config, "num_experts", 0) or 0
        dense = [old in only or experts == 0 or (old + 1) % step != 0 for old in keep]
        config.mlp_only_layers = [i for i, d in enumerate(dense) if d]


def check_student_layout(model: nn.Module, keep: tuple[int, ...]) -> None:
    """Raise :class:`ModelError` if the student that keeps the blocks ``keep`` would not reload:
    where the architecture builds a block by its index (ModernBERT's first block has no
    attention norm), a model built from the student's config lays out block ``i`` unlike the
    teacher's block ``keep[i]``, and ``from_pretrained`` would drop or leave unset the weights
    that differ: a different model, silently. Built on the meta device (no memory); a model that
    cannot be built from its config is not checked."""
    from hfcompress.kinds import CompressedModule

    config = getattr(model, "config", None)
    if config is None or not hasattr(type(model), "config_class"):
        return
    _, blocks = blocks_of(model)
    student = copy.deepcopy(config)
    _shorten_config(student, keep, len(blocks))
    fresh = build_on_meta(model, student)
    if fresh is None:  # a model class with a construction of its own: not checked
        return
    try:
        _, fresh_blocks = blocks_of(fresh)
    except ModelError as exc:
        logger.debug("student layout not checked: %s", exc)
        return
    for i, teacher_index in enumerate(keep):
        ours, built = _layout(blocks[teacher_index], CompressedModule), _layout(fresh_blocks[i], CompressedModule)
        differ = sorted(name for name in ours.keys() | built.keys() if ours.get(name) != built.get(name))
        if differ:
            shown = ", ".join(f"{name or '(block)'}: {ours.get(name, 'absent')} here, {built.get(name, 'absent')} "
                              "as built" for name in differ[:3])  # fmt: skip
            raise ModelError(
                f"{type(model).__name__} builds its block {i} unlike block {teacher_index}, which the student would "
                f"keep there ({shown}); saved and reloaded, the student would lose those weights. Choose layers "
                f"(strategy 'explicit') whose kinds the student's config can lay out at their new positions; if "
                f"this architecture builds its block {i} specially, keep teacher block {i} at position {i}"
            )


def _layout(block: nn.Module, compressed: type) -> dict[str, str]:
    """Each submodule's class and parameter shapes, by name; compressed modules (which replaced a
    float module of their own shape) and what is inside them are left out."""
    out, skip = {}, ()
    for name, module in block.named_modules():
        if skip and name.startswith(skip):
            continue
        if isinstance(module, compressed):
            skip = (f"{name}.",) if name else ("",)
            continue
        params = ",".join(f"{k}{list(p.shape)}" for k, p in module.named_parameters(recurse=False))
        out[name] = f"{type(module).__name__}({params})"
    return out
