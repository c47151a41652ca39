"""The base of every technique config: a frozen, keyword-only dataclass with strict parsing.

A technique config is plain data. ``from_dict`` refuses unknown keys and wrong types before any
model is touched; ``to_dict`` gives back a dict that ``from_dict`` turns into an equal config,
which is what a saved checkpoint records.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, ClassVar, Literal, get_args, get_origin

from hfcompress.errors import RecipeError

__all__ = ["ConfigSection", "TechniqueConfig", "check_e2e_fields", "check_target_fields", "invalid"]


def invalid(key: str, value: Any, accepted: str) -> RecipeError:
    """Build the error for one bad config value: it names the key, the value and what is accepted."""
    return RecipeError(f"{key}={value!r} is invalid; accepted: {accepted}")


def check_target_fields(config: Any, keys: tuple[str, ...] = ("targets", "ignore")) -> None:
    """Raise :func:`invalid` for an empty ``targets`` or a malformed pattern in any of ``keys``
    (module names, class names or ``re:`` patterns) of a config."""
    from hfcompress.targets import check_patterns

    if "targets" in keys and not config.targets:
        raise invalid("targets", list(config.targets), "a non-empty list of patterns")
    for key in keys:
        problem = check_patterns(getattr(config, key))
        if problem:
            raise invalid(key, list(getattr(config, key)), f"module names, class names or 're:' patterns; {problem}")


def check_e2e_fields(config: Any) -> None:
    """Raise :func:`invalid` for a bad ``e2e_lr`` or ``e2e_windows``: the fields of the
    end-to-end scale steps (``learned_rounding`` and ``int8_activations`` share them)."""
    if not 0 < config.e2e_lr <= 1:
        raise invalid("e2e_lr", config.e2e_lr, "a number in (0, 1]")
    if config.e2e_windows < 1:
        raise invalid("e2e_windows", config.e2e_windows, "an integer >= 1")


def _describe(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(annotation))
    if origin is tuple:
        return f"a list of {_describe(get_args(annotation)[0])}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(annotation))
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, ConfigSection):
        return "a mapping with keys " + ", ".join(f.name for f in dataclasses.fields(annotation))
    return getattr(annotation, "__name__", str(annotation))


def _coerce(key: str, annotation: Any, value: Any) -> Any:
    """Check ``value`` against a field annotation; lists become tuples. Raise on mismatch."""
    origin = get_origin(annotation)
    if origin is Literal:
        if value in get_args(annotation) and type(value) in {type(a) for a in get_args(annotation)}:
            return value
    elif origin in (typing.Union, types.UnionType):
        section_error = None
        for option in get_args(annotation):
            try:
                return _coerce(key, option, value)
            except RecipeError as exc:
                if isinstance(value, dict) and isinstance(option, type) and issubclass(option, ConfigSection):
                    section_error = exc  # a mapping meant as this section: its own error says more
        if section_error is not None:
            raise section_error
    elif origin is tuple:
        if isinstance(value, str) and get_args(annotation)[0] is str:
            return (value,)  # targets: Linear, as llm-compressor's targets="Linear"
        if isinstance(value, (list, tuple)):
            item_type = get_args(annotation)[0]
            return tuple(_coerce(key, item_type, v) for v in value)
    elif annotation is type(None):
        if value is None:
            return None
    elif annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif isinstance(annotation, type) and issubclass(annotation, ConfigSection):
        if isinstance(value, annotation):
            return value
        if isinstance(value, dict):
            try:
                return annotation.from_dict(value)
            except RecipeError as exc:
                raise RecipeError(f"{key}: {exc}") from None
    else:  # pragma: no cover - a config declared a type this parser does not know
        raise TypeError(f"unsupported config annotation {annotation!r} for {key!r}")
    raise invalid(key, value, _describe(annotation))


# Other tools' names for our keys (GPTQModel/AutoGPTQ, AutoAWQ, llm-compressor), for the hint
# an unknown key gets; a typo gets the closest key instead.
_OTHER_TOOLS_KEYS = {
    "sym": "symmetric",
    "desc_act": "act_order",
    "actorder": "act_order",
    "damp_percent": "damp",
    "dampening_frac": "damp",
    "w_bit": "bits",
    "wbits": "bits",
    "num_bits": "bits",
    "q_group_size": "group_size",
    "groupsize": "group_size",
    "smoothing_strength": "alpha",
}


def _guess_key(key: str, known: list[str]) -> str | None:
    """The accepted key that an unknown ``key`` most likely means, or None."""
    guess = _OTHER_TOOLS_KEYS.get(key)
    if guess in known:
        return guess
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
    return close[0] if close else None


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Strict:
    """Frozen keyword-only dataclass data, checked on construction: each value against its
    field's annotation (lists become tuples, mappings become nested sections), then
    ``_validate``."""

    # What a field accepts, in words, where its type alone says too little ("int" for a group
    # size that also takes -1 for per channel): a value of the wrong type is refused with this.
    _accepted: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            try:
                coerced = _coerce(field.name, hints[field.name], value)
            except RecipeError:
                if field.name in self._accepted:
                    raise invalid(field.name, value, self._accepted[field.name]) from None
                raise
            if coerced is not value:
                object.__setattr__(self, field.name, coerced)
        self._validate()

    def _validate(self) -> None:
        """Raise :class:`RecipeError` (through :func:`invalid`) for values out of range."""

    @classmethod
    def _what(cls) -> str:
        return cls.__name__

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        """Build one from a dict, refusing keys it does not have."""
        if not isinstance(data, dict):
            raise RecipeError(f"a {cls._what()} must be a mapping, got {type(data).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            guesses = [(key, _guess_key(key, known)) for key in unknown]
            hint = ", ".join(f"{guess!r} for {key!r}" for key, guess in guesses if guess)
            raise RecipeError(
                f"unknown key(s) {', '.join(map(repr, unknown))} for {cls._what()}"
                + (f" (did you mean {hint}?)" if hint else "")
                + f"; accepted keys: {', '.join(known)}"
            )
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (tuples become lists, sections mappings), suitable for JSON and YAML;
        ``from_dict`` turns it into an equal object."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, _Strict):
                value = value.to_dict()
            out[field.name] = value
        return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConfigSection(_Strict):
    """A group of options that a technique config holds as one field, written as a nested
    mapping in a recipe (e.g. ``budget: {bits_per_weight: 3.5}``)."""

    @classmethod
    def _what(cls) -> str:
        return f"{cls.__name__} section"


@dataclasses.dataclass(frozen=True, kw_only=True)
class TechniqueConfig(_Strict):
    """Base of the per-technique configs.

    Subclasses are frozen keyword-only dataclasses; they set ``technique`` (the name a recipe
    uses), ``needs_calibration`` and ``needs_training``, and check their values in ``_validate``.
    """

    technique: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False
    needs_training: ClassVar[bool] = False

    @classmethod
    def _what(cls) -> str:
        return f"technique {cls.technique!r} stage"
