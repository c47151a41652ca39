"""Recipes: an ordered list of named stages, each a technique config.

A recipe is data. In YAML::

    # what it does, for which models, the expected result and its source
    stages:
      - name: weights
        technique: rtn
        bits: 4
        group_size: 128

``Recipe.from_yaml(path)`` reads a file, ``Recipe.from_yaml_str(text)`` a string, and
``Recipe([RTNConfig(...), ...])`` builds one in Python (stages are then named
``stage_0``, ``stage_1``, ...). Parsing is strict: unknown keys, techniques and values fail
here, naming the stage, the key, the value and what would be accepted.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hfcompress.config import TechniqueConfig
from hfcompress.errors import RecipeError
from hfcompress.registry import get_technique, technique_for_config

__all__ = ["SHIPPED_RECIPES", "Recipe", "Stage", "shipped_recipes"]

# The recipes this package ships (the repository's recipes/, linked into the package).
SHIPPED_RECIPES = Path(__file__).resolve().parent / "recipes"


def shipped_recipes() -> list[str]:
    """The names of the shipped recipes, for ``Recipe.from_yaml(name)`` and ``--recipe``."""
    return sorted(p.stem for p in SHIPPED_RECIPES.glob("*.yaml"))


_RECIPE_KEYS = ("stages",)
_STAGE_KEYS = ("name", "technique")


@dataclass(frozen=True)
class Stage:
    """One named step of a recipe."""

    name: str
    config: TechniqueConfig

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "technique": self.config.technique, **self.config.to_dict()}


class Recipe:
    """An ordered list of stages.

    Args:
        stages: Technique configs (named ``stage_<i>``), :class:`Stage` objects, or stage
            mappings as a recipe YAML file writes them (``{"technique": "rtn", "bits": 4}``).
    """

    def __init__(self, stages: Sequence[TechniqueConfig | Stage | dict[str, Any]]) -> None:
        if isinstance(stages, (TechniqueConfig, Stage)):
            stages = [stages]
        if not stages:
            raise RecipeError("a recipe needs at least one stage")
        built: list[Stage] = []
        for i, item in enumerate(stages):
            if isinstance(item, dict):
                stage = self._stage_from_dict(i, item)
            elif isinstance(item, Stage):
                stage = item
            else:
                stage = Stage(name=f"stage_{i}", config=item)
            if not isinstance(stage.config, TechniqueConfig):
                raise RecipeError(
                    f"stage {i} must be a technique config (e.g. RTNConfig(...)) or a stage mapping "
                    f"({{'technique': 'rtn', 'bits': 4}}), got {type(stage.config).__name__}"
                )
            technique_for_config(stage.config)
            built.append(stage)
        names = [s.name for s in built]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise RecipeError(f"stage names must be unique; repeated: {duplicates}")
        self.stages: tuple[Stage, ...] = tuple(built)

    # -- construction from data -------------------------------------------------------------

    @classmethod
    def of(cls, recipe: Any) -> Recipe:
        """``recipe`` as a Recipe: a Recipe as it is, a path to a YAML file, a mapping with a
        ``stages`` list, a list of stages (configs, :class:`Stage` objects, stage mappings), one
        stage mapping (``{"technique": "rtn", "bits": 4}``) or one technique config."""
        if isinstance(recipe, Recipe):
            return recipe
        if isinstance(recipe, (str, os.PathLike)):
            return cls.from_yaml(recipe)
        if isinstance(recipe, dict):
            if "technique" in recipe and "stages" not in recipe:
                return cls([recipe])
            return cls.from_dict(recipe)
        return cls(recipe if isinstance(recipe, (list, tuple)) else [recipe])

    @classmethod
    def from_dict(cls, data: Any) -> Recipe:
        if not isinstance(data, dict):
            raise RecipeError(f"a recipe must be a mapping with a 'stages' list, got {type(data).__name__}")
        unknown = sorted(set(data) - set(_RECIPE_KEYS))
        if unknown:
            hint = (
                "; this mapping looks like one stage: list it under 'stages' ({'stages': [{'technique': ...}]})"
                if "technique" in data
                else ""
            )
            raise RecipeError(f"unknown recipe key(s) {unknown}; accepted keys: {list(_RECIPE_KEYS)}{hint}")
        stages = data.get("stages")
        if not isinstance(stages, list) or not stages:
            raise RecipeError(f"'stages' must be a non-empty list of stage mappings, got {stages!r}")
        return cls([cls._stage_from_dict(i, s) for i, s in enumerate(stages)])

    @staticmethod
    def _stage_from_dict(index: int, data: Any) -> Stage:
        if not isinstance(data, dict):
            raise RecipeError(f"stage {index} must be a mapping, got {data!r}")
        name = data.get("name", f"stage_{index}")
        if not isinstance(name, str) or not name:
            raise RecipeError(f"stage {index}: 'name' must be a non-empty string, got {name!r}")
        if "technique" not in data:
            raise RecipeError(f"stage {name!r}: missing key 'technique'")
        try:
            technique = get_technique(data["technique"])
            options = {k: v for k, v in data.items() if k not in _STAGE_KEYS}
            config = technique.config_cls.from_dict(options)
        except RecipeError as exc:
            raise RecipeError(f"stage {name!r}: {exc}") from None
        return Stage(name=name, config=config)

    @classmethod
    def from_yaml_str(cls, text: str) -> Recipe:
        """Parse a recipe from YAML text."""
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise RecipeError(f"recipe is not valid YAML: {exc}") from None
        return cls.from_dict(data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        """Read a recipe from a YAML file, or a shipped recipe by its name
        (``"llama_w8a8_dynamic"``, with or without ``.yaml``) when no such file exists."""
        path = Path(path)
        if path.is_dir():
            raise RecipeError(f"recipe {str(path)!r} is a folder; give the path of a recipe YAML file inside it")
        if not path.is_file() and len(path.parts) == 1:
            shipped = SHIPPED_RECIPES / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
            if shipped.is_file():
                path = shipped
        if not path.is_file():
            text = "\n" in str(path) or str(path).lstrip().startswith("stages:")
            if text:
                hint = "; it reads as YAML text: parse that with Recipe.from_yaml_str(text)"
            else:
                hint = f"; shipped recipes, by name: {', '.join(shipped_recipes())}"
            raise RecipeError(f"recipe file {str(path)!r} does not exist{hint}")
        try:
            return cls.from_yaml_str(path.read_text(encoding="utf-8"))
        except RecipeError as exc:
            raise RecipeError(f"{path}: {exc}") from None

    # -- back to data -----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"stages": [s.to_dict() for s in self.stages]}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    # -- container protocol ----------------------------------------------------------------

    def __iter__(self) -> Iterator[Stage]:
        return iter(self.stages)

    def __len__(self) -> int:
        return len(self.stages)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Recipe) and self.stages == other.stages

    def __repr__(self) -> str:
        inner = ", ".join(f"{s.name}={s.config!r}" for s in self.stages)
        return f"Recipe({inner})"
