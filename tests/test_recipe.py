from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import hfcompress
from hfcompress import RecipeError, RTNConfig, compress
from hfcompress.recipe import Recipe, Stage
from tests.conftest import make_tiny_bert, make_tiny_llama

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


# Recipes that train (distillation) need a training set and a task: tests/techniques/test_pkd_training.py.
TRAINING = {"minilm_pkd_skip3.yaml", "minilm_pkd_skip3_w4a16_rtn.yaml"}
APPLIED = [p for p in RECIPES if p.name not in TRAINING]


@pytest.mark.parametrize("path", APPLIED, ids=[p.name for p in APPLIED])
def test_every_shipped_recipe_compresses_a_small_model_that_reloads_the_same(path, tmp_path):
    # Small models with the shipped recipes' shapes in reach: group size 128 divides the inputs,
    # heads of 64 channels (KV groups of 64), 128-token windows (two attention blocks of 64).
    decoder = path.name.startswith(("llama_", "smollm2_"))
    if decoder:
        model, auto = (
            make_tiny_llama(hidden_size=256, intermediate_size=512, max_position_embeddings=256),
            AutoModelForCausalLM,
        )
    else:
        model, auto = (
            make_tiny_bert(hidden_size=128, num_attention_heads=2, intermediate_size=256),
            AutoModelForSequenceClassification,
        )
    ids = torch.randint(2, 100, (32, 128), generator=torch.Generator().manual_seed(0))
    recipe = Recipe.from_yaml(path)
    compress(model, recipe, calibration_data=ids, progress=False)
    logits = model(ids[:2]).logits
    assert torch.isfinite(logits).all()
    hfcompress.save_pretrained(model, tmp_path / "m", card=False)
    reloaded = auto.from_pretrained(tmp_path / "m")
    assert {n: type(m) for n, m in reloaded.named_modules()} == {n: type(m) for n, m in model.named_modules()}
    assert [s["name"] for s in reloaded.config.quantization_config.recipe["stages"]] == [s.name for s in recipe]
    assert torch.equal(reloaded(ids[:2]).logits, logits)
    if decoder:
        prompt = ids[:1, :96]
        generated = model.generate(prompt, max_new_tokens=8, do_sample=False)
        assert torch.equal(reloaded.generate(prompt, max_new_tokens=8, do_sample=False), generated)


BAD = [
    ("stages:\n  - technique: rtn\n    bitz: 4\n", r"stage 'stage_0': unknown key\(s\) 'bitz'.*accepted keys: bits"),
    ("stages:\n  - name: w\n    technique: rtn\n    bits: 5\n", r"stage 'w': bits=5 is invalid; accepted: 2, 3, 4, 8"),
    ("stages:\n  - technique: rtn\n    group_size: 0\n", r"group_size=0 is invalid; accepted: -1 \(per channel\)"),
    ("stages:\n  - technique: rtn\n    bits: '4'\n", r"bits='4' is invalid; accepted: 2, 3, 4, 8"),
    # None reads as "no groups" elsewhere: the refusal names -1, not just the type
    ("stages:\n  - technique: gptq\n    group_size: null\n", r"group_size=None is invalid; accepted: -1 \("),
    ("stages:\n  - technique: awq\n    group_size: 1.5\n", r"group_size=1.5 is invalid; accepted: -1 \(per channel\)"),
    ("stages:\n  - technique: embeddings\n    bits: '8'\n", r"bits='8' is invalid; accepted: 2, 3, 4, 8"),
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
    with pytest.raises(RecipeError, match=r"does not exist; shipped recipes, by name: bert_block_sparse50, "):
        Recipe.from_yaml("/nonexistent/recipe.yaml")
    # YAML text where a path belongs (compress() takes a path): named, with the right call
    with pytest.raises(RecipeError, match=r"does not exist; it reads as YAML text: .* Recipe.from_yaml_str"):
        Recipe.from_yaml("stages:\n  - technique: rtn\n")


def test_a_shipped_recipe_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no recipes/ folder here
    by_file = Recipe.from_yaml(RECIPES[0]).to_dict()
    assert Recipe.from_yaml(RECIPES[0].stem).to_dict() == by_file
    assert Recipe.from_yaml(RECIPES[0].name).to_dict() == by_file
    # a file of that name in the working folder comes first
    (tmp_path / RECIPES[0].name).write_text("stages:\n  - technique: rtn\n    bits: 8\n")
    assert Recipe.from_yaml(RECIPES[0].name).stages[0].config.bits == 8


def test_python_configs_validate_too():
    with pytest.raises(RecipeError, match="bits=5"):
        RTNConfig(bits=5)
    with pytest.raises(RecipeError, match="must be a technique config"):
        Recipe([Stage(name="x", config={"bits": 4})])


def test_stage_mappings_build_the_same_recipe_as_yaml():
    # the mapping a YAML file writes is accepted in Python too, named and checked the same way
    mixed = Recipe([{"technique": "rtn", "bits": 4, "group_size": 32}, {"name": "kv", "technique": "kv_cache"}])
    yaml_form = Recipe.from_yaml_str(
        "stages:\n  - technique: rtn\n    bits: 4\n    group_size: 32\n  - name: kv\n    technique: kv_cache\n"
    )
    assert mixed.to_dict() == yaml_form.to_dict()
    assert [s.name for s in mixed.stages] == ["stage_0", "kv"]
    with pytest.raises(RecipeError, match=r"stage 'stage_0': .*bits"):
        Recipe([{"technique": "rtn", "bits": 5}])
    with pytest.raises(RecipeError, match="missing key 'technique'"):
        Recipe([{"bits": 4}])


def test_one_stage_mapping_is_a_one_stage_recipe():
    # compress(model, {"technique": "rtn", ...}) reads as one stage; it was refused as a recipe with
    # unknown keys ['bits', 'group_size', 'technique']
    one = Recipe.of({"technique": "rtn", "bits": 4, "group_size": 32})
    assert one.to_dict() == Recipe([{"technique": "rtn", "bits": 4, "group_size": 32}]).to_dict()
    with pytest.raises(RecipeError, match="bits"):
        Recipe.of({"technique": "rtn", "bits": 5})
    # a YAML file is a recipe document: a bare stage there is still refused, with the fix named
    with pytest.raises(RecipeError, match=r"looks like one stage: list it under 'stages'"):
        Recipe.from_yaml_str("technique: rtn\nbits: 4\n")


def test_other_tools_names_and_typos_get_the_key_meant():
    # GPTQModel's sym/desc_act/damp_percent and llm-compressor's smoothing_strength were refused
    # with only the list of accepted keys; a typo in a technique name likewise
    with pytest.raises(
        RecipeError,
        match=r"did you mean 'damp' for 'damp_percent', 'act_order' for 'desc_act', 'symmetric' for 'sym'\?",
    ):
        Recipe.of({"technique": "gptq", "sym": True, "desc_act": True, "damp_percent": 0.01})
    with pytest.raises(RecipeError, match=r"'grup_size' .*did you mean 'group_size' for 'grup_size'\?"):
        Recipe.of({"technique": "rtn", "grup_size": 64})
    with pytest.raises(RecipeError, match=r"unknown key\(s\) 'foo' for technique 'rtn' stage; accepted keys"):
        Recipe.of({"technique": "rtn", "foo": 1})
    with pytest.raises(RecipeError, match=r"unknown technique 'smooth_quant' \(did you mean 'smoothquant'\?\)"):
        Recipe.of({"technique": "smooth_quant"})


def test_one_target_or_ignore_pattern_may_be_a_string():
    # llm-compressor writes targets="Linear"; it was refused as "not a list of str"
    one = Recipe.of({"technique": "rtn", "targets": "Linear", "ignore": "re:.*lm_head"})
    assert one.stages[0].config.targets == ("Linear",) and one.stages[0].config.ignore == ("re:.*lm_head",)
    assert Recipe.from_yaml_str(one.to_yaml()).to_dict() == one.to_dict()
