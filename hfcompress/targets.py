"""Choosing the layers a stage applies to: ``targets`` and ``ignore`` patterns.

A pattern is one of:

* an exact module name, as ``model.named_modules()`` gives it (``"lm_head"``,
  ``"model.layers.0.mlp.down_proj"``);
* a class name (``"LlamaMLP"``); ``"Linear"`` stands for every linear-like layer
  (``nn.Linear``, transformers' ``Conv1D`` of GPT-2's projections, and their subclasses that
  compute the same, such as Falcon's; not an MoE router's);
* ``"re:<regex>"``, matched with :func:`re.fullmatch` against the module name
  (``"re:.*mlp\\.(up|gate)_proj"``).

A pattern that selects a container selects the layers inside it. ``ignore`` wins over
``targets``. In a multimodal model, ``"Linear"`` as a target stands for the linear layers of the
language model and its LM head: the vision tower and the projector, which text calibration
data never reaches, are compressed only when named (``"re:model\\.vision_tower\\..*"``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from hfcompress.kinds import is_linear_like, linear_class_names

__all__ = ["check_patterns", "matches", "resolve_linear_targets", "select"]


def check_patterns(patterns: Iterable[str]) -> str | None:
    """Return a description of the first malformed pattern, or None when all are valid."""
    for pattern in patterns:
        if not pattern:
            return "an empty pattern"
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                return f"{pattern!r} is not a valid regular expression ({exc})"
    return None


def matches(name: str, class_name: str, pattern: str, linear_names: frozenset[str] | None = None) -> bool:
    """True when ``pattern`` selects the module called ``name`` of class ``class_name``
    (``linear_names``: what ``"Linear"`` stands for, :func:`~hfcompress.kinds.linear_class_names`
    when not given)."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if pattern == "Linear" and class_name in (linear_class_names() if linear_names is None else linear_names):
        return True
    return pattern == name or pattern == class_name


def _selected(
    modules: list[tuple[str, str]], patterns: tuple[str, ...], outside: frozenset[str] = frozenset()
) -> set[str]:
    """Names selected by any pattern, including everything inside a selected container;
    ``"Linear"`` does not select the ``outside`` modules (a multimodal model's vision tower)."""
    linear = linear_class_names()
    roots = [
        name
        for name, cls in modules
        if any(matches(name, cls, p, linear) and not (p == "Linear" and name in outside) for p in patterns)
    ]
    if "" in roots:
        return {name for name, _ in modules}
    selected: set[str] = set(roots)
    prefixes = tuple(f"{root}." for root in roots)
    if prefixes:
        selected.update(name for name, _ in modules if name.startswith(prefixes))
    return selected


def select(
    modules: Iterable[tuple[str, str]],
    targets: tuple[str, ...],
    ignore: tuple[str, ...],
    outside: frozenset[str] = frozenset(),
) -> list[str]:
    """Names, among ``(name, class name)`` pairs, that ``targets`` select and ``ignore`` does
    not, in the given order (``outside``: what ``"Linear"`` leaves alone as a target, see
    :func:`~hfcompress.architectures.outside_language_model`)."""
    modules = list(modules)
    chosen = _selected(modules, targets, outside) - _selected(modules, ignore)
    return [name for name, _ in modules if name in chosen]


def resolve_linear_targets(model: nn.Module, targets: tuple[str, ...], ignore: tuple[str, ...]) -> dict[str, nn.Module]:
    """The float linear-like layers that ``targets`` select and ``ignore`` does not, by
    name, in module order."""
    from hfcompress.architectures import outside_language_model

    modules = dict(model.named_modules())
    pairs = ((n, type(m).__name__) for n, m in modules.items())
    names = select(pairs, targets, ignore, outside_language_model(model))
    return {n: modules[n] for n in names if is_linear_like(modules[n])}
