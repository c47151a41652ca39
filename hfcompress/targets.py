"""Choosing the layers a stage applies to: ``targets`` and ``ignore`` patterns.

A pattern is one of:

* an exact module name, as ``model.named_modules()`` gives it (``"lm_head"``,
  ``"model.layers.0.mlp.down_proj"``);
* a class name (``"Linear"``, ``"LlamaMLP"``);
* ``"re:<regex>"``, matched with :func:`re.fullmatch` against the module name
  (``"re:.*mlp\\.(up|gate)_proj"``).

A pattern that selects a container selects the Linear layers inside it. ``ignore`` wins over
``targets``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

__all__ = ["check_patterns", "matches", "resolve_linear_targets"]


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


def matches(name: str, module: nn.Module, pattern: str) -> bool:
    """True when ``pattern`` selects the module called ``name``."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return pattern == name or pattern == type(module).__name__


def _selected(model: nn.Module, patterns: tuple[str, ...]) -> set[str]:
    """Names of the modules selected by any pattern, including everything inside them."""
    roots = [name for name, module in model.named_modules() if any(matches(name, module, p) for p in patterns)]
    selected: set[str] = set()
    for name, _ in model.named_modules():
        if any(name == root or (root == "" or name.startswith(root + ".")) for root in roots):
            selected.add(name)
    return selected


def resolve_linear_targets(model: nn.Module, targets: tuple[str, ...], ignore: tuple[str, ...]) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers that ``targets`` select and ``ignore`` does not, by name,
    in module order."""
    chosen = _selected(model, targets) - _selected(model, ignore)
    return {name: module for name, module in model.named_modules() if name in chosen and isinstance(module, nn.Linear)}
