"""The explicit registry of techniques: a name, its config class and its modifier class.

Each technique registers itself with one call beside its classes; registering a name twice
raises. Nothing is discovered by walking packages.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hfcompress.errors import RecipeError

if TYPE_CHECKING:
    from hfcompress.config import TechniqueConfig
    from hfcompress.modifier import Modifier

__all__ = ["Technique", "get_technique", "register_technique", "registered_techniques"]


@dataclass(frozen=True)
class Technique:
    """One registered technique."""

    name: str
    config_cls: type[TechniqueConfig]
    modifier_cls: type[Modifier]


_REGISTRY: dict[str, Technique] = {}


def register_technique(config_cls: type[TechniqueConfig], modifier_cls: type[Modifier]) -> Technique:
    """Register a technique under ``config_cls.technique``; a duplicate name raises ``ValueError``."""
    name = config_cls.technique
    if not name:
        raise ValueError(f"{config_cls.__name__} must set the class attribute `technique`")
    if name in _REGISTRY:
        raise ValueError(f"technique {name!r} is already registered by {_REGISTRY[name].config_cls.__name__}")
    technique = Technique(name=name, config_cls=config_cls, modifier_cls=modifier_cls)
    _REGISTRY[name] = technique
    return technique


def get_technique(name: str) -> Technique:
    """Look a technique up by name, with an error that lists the registered names."""
    _ensure_builtin_techniques()
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):  # TypeError: a name that is not hashable (a list)
        close = difflib.get_close_matches(str(name).lower(), list(_REGISTRY), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RecipeError(
            f"unknown technique {name!r}{hint}; registered techniques: {', '.join(sorted(_REGISTRY))}"
        ) from None


def technique_for_config(config: TechniqueConfig) -> Technique:
    """The registered technique whose config class is ``type(config)``."""
    technique = get_technique(type(config).technique)
    if technique.config_cls is not type(config):
        raise RecipeError(f"{type(config).__name__} is not the registered config of {technique.name!r}")
    return technique


def registered_techniques() -> dict[str, Technique]:
    """A copy of the registry, name to technique."""
    _ensure_builtin_techniques()
    return dict(_REGISTRY)


def _ensure_builtin_techniques() -> None:
    # The built-in techniques register on import of their package; importing it here keeps
    # `get_technique` correct for callers that imported only this module.
    import hfcompress.techniques  # noqa: F401
