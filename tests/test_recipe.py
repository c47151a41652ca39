from pathlib import Path

import pytest
import yaml

from hfcompress import RecipeError, RTNConfig
from hfcompress.recipe import Recipe, Stage

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))

GOOD = """
stages:
  - name: weights
    technique: rtn
    bits: 4
    group_size: 128
    targets: [Linear]
    ignore: [lm_head, "re:.*down_proj"]
"""


def test_from_yaml_str_builds_typed_configs():
    recipe = Recipe.from_yaml_str(GOOD)
    (stage,) = recipe.stages
    assert stage.name == "weights"
    assert stage.config == RTNConfig(bits=4, group_size=128, ignore=("lm_head", "re:.*down_proj"))
    assert isinstance(stage.config.ignore, tuple)


def test_from_yaml_reads_a_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(GOOD)
    assert Recipe.from_yaml(path) == Recipe.from_yaml_str(GOOD)


def test_python_construction_names_stages():
    recipe = Recipe([RTNConfig(bits=8, group_size=-1), RTNConfig(bits=4, targets=("lm_head",), ignore=())])
    assert [s.name for s in recipe] == ["stage_0", "stage_1"]


@pytest.mark.parametrize(
    "recipe", [Recipe.from_yaml_str(GOOD), Recipe([RTNConfig(zero_point="float")])], ids=["yaml", "py"]
)
def test_round_trips_through_dict_and_yaml(recipe):
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert Recipe.from_yaml_str(recipe.to_yaml()) == recipe
    assert yaml.safe_load(recipe.to_yaml()) == recipe.to_dict()


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_parses_and_documents_itself(path):
    assert path.read_text().startswith("#"), "a recipe opens with a comment saying what it does"
    assert len(Recipe.from_yaml(path)) >= 1


BAD = [
    ("stages:\n  - technique: rtn\n    bitz: 4\n", r"stage 'stage_0': unknown key\(s\) 'bitz'.*accepted keys: bits"),
    ("stages:\n  - name: w\n    technique: rtn\n    bits: 5\n", r"stage 'w': bits=5 is invalid; accepted: 2, 3, 4, 8"),
    ("stages:\n  - technique: rtn\n    group_size: 0\n", r"group_size=0 is invalid; accepted: -1 \(per channel\)"),
    ("stages:\n  - technique: rtn\n    bits: '4'\n", r"bits='4' is invalid; accepted: int"),
    ("stages:\n  - technique: rtn\n    symmetric: 1\n", r"symmetric=1 is invalid; accepted: bool"),
    (
        "stages:\n  - technique: rtn\n    scale_dtype: fp8\n",
        r"scale_dtype='fp8' is invalid; accepted: one of 'float16'",
    ),
    ("stages:\n  - technique: rtn\n    symmetric: true\n    zero_point: float\n", r"zero_point='float'"),
    ("stages:\n  - technique: rtn\n    targets: []\n", r"targets=\[\] is invalid"),
    ("stages:\n  - technique: rtn\n    ignore: ['re:(']\n", r"not a valid regular expression"),
    ("stages:\n  - technique: spqr\n", r"unknown technique 'spqr'; registered techniques: .*rtn"),
    ("stages:\n  - bits: 4\n", r"missing key 'technique'"),
    ("stages: []\n", r"'stages' must be a non-empty list"),
    ("stage:\n  - technique: rtn\n", r"unknown recipe key\(s\) \['stage'\]; accepted keys: \['stages'\]"),
    ("- technique: rtn\n", r"a recipe must be a mapping"),
    ("stages: [\n", r"not valid YAML"),
    ("stages:\n  - {name: a, technique: rtn}\n  - {name: a, technique: rtn}\n", r"repeated: \['a'\]"),
]


@pytest.mark.parametrize("text,message", BAD, ids=[m[:30] for _, m in BAD])
def test_bad_recipes_name_the_problem(text, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_yaml_str(text)


def test_missing_file():
    with pytest.raises(RecipeError, match="does not exist"):
        Recipe.from_yaml("/nonexistent/recipe.yaml")


def test_python_configs_validate_too():
    with pytest.raises(RecipeError, match="bits=5"):
        RTNConfig(bits=5)
    with pytest.raises(RecipeError, match="must be a technique config"):
        Recipe([Stage(name="x", config={"bits": 4})])
