"""A weight-quantization stage with a ``budget``: the plan is met, applied per layer, saved,
reloaded and resumed; bad budgets are refused before the model changes."""

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

import hfcompress
from hfcompress import (
    BitsBudget,
    GPTQConfig,
    LearnedRoundingConfig,
    QuantLinear,
    Recipe,
    RecipeError,
    RTNConfig,
    compress,
)
from hfcompress.errors import CalibrationDataError
from hfcompress.eval.size import size_report
from hfcompress.kinds import compressed_modules
from hfcompress.quant.linear import quantized_bytes
from hfcompress.techniques.gptq import modifier as gptq_modifier
from tests.conftest import assert_resume_gives_the_uninterrupted_result, make_tiny_llama

CALIB = torch.randint(0, 128, (8, 24), generator=torch.Generator().manual_seed(5))
EVAL = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(6))
BUDGET = BitsBudget(bits_per_weight=3.5, group_sizes=(16, 32))


def _grids(model):
    return {n: (m.bits, m.group_size) for n, m in compressed_modules(model).items() if isinstance(m, QuantLinear)}


def _bits(model):
    return size_report(model, list(compressed_modules(model))).bits_per_weight


@pytest.mark.parametrize(
    ("grid", "symmetric", "zero_point", "scale_dtype"),
    [
        ((4, 16), False, "integer", "float16"),
        ((3, 32), True, "integer", "bfloat16"),
        ((2, -1), False, "float", "float32"),
        ((8, 24), False, "integer", "float16"),
    ],
    ids=["w4g16", "w3g32-sym", "w2pc-float-zero", "w8g24-partial"],
)
def test_planned_bytes_are_the_stored_bytes(grid, symmetric, zero_point, scale_dtype):
    model = make_tiny_llama()
    config = RTNConfig(
        bits=grid[0], group_size=grid[1], symmetric=symmetric, zero_point=zero_point, scale_dtype=scale_dtype
    )
    compress(model, [config], progress=False)
    for layer in compressed_modules(model).values():
        planned = quantized_bytes(
            layer.out_features,
            layer.in_features,
            bits=grid[0],
            group_size=grid[1],
            symmetric=symmetric,
            float_zero=zero_point == "float",
            scale_dtype=scale_dtype,
        )
        assert planned == layer.storage_bytes()


@pytest.mark.parametrize("strategy", ["sensitivity", "layer_order"])
def test_gptq_meets_the_budget_with_mixed_grids_and_reloads(strategy, tmp_path):
    model = make_tiny_llama()
    budget = dataclasses.replace(BUDGET, strategy=strategy)
    compress(model, [GPTQConfig(budget=budget)], calibration_data=CALIB, progress=False)
    assert 3.3 < _bits(model) <= 3.5
    assert len(set(_grids(model).values())) > 1
    hfcompress.save_pretrained(model, tmp_path / "m")
    card = (tmp_path / "m" / "README.md").read_text()
    assert "## Bits per layer" in card and "| model.layers.1 |" in card
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert _grids(reloaded) == _grids(model)
    with torch.no_grad():
        assert torch.equal(reloaded(EVAL).logits, model(EVAL).logits)


def test_layer_order_puts_the_larger_grid_first():
    model = make_tiny_llama(layers=4)
    budget = BitsBudget(bits_per_weight=4.3, bits=(3, 4), group_sizes=(32,), strategy="layer_order")
    compress(model, [RTNConfig(budget=budget)], progress=False)  # layer order needs no calibration data
    bits = [b for b, _ in _grids(model).values()]
    assert bits == sorted(bits, reverse=True) and bits[0] == 4 and bits[-1] == 3


def test_total_bytes_budget_and_learned_rounding():
    model = make_tiny_llama()
    layers = list(
        compressed_modules(compress(make_tiny_llama(), [RTNConfig(bits=3, group_size=32)], progress=False)).values()
    )
    w3_bytes = sum(m.storage_bytes() for m in layers)
    config = LearnedRoundingConfig(
        budget=BitsBudget(total_bytes=w3_bytes, bits=(2, 4), group_sizes=(32,)), steps=3, batch_size=4
    )
    compress(model, [config], calibration_data=CALIB, progress=False)
    assert sum(m.storage_bytes() for m in compressed_modules(model).values()) <= w3_bytes
    assert {b for b, _ in _grids(model).values()} == {2, 4}


def test_resume_after_a_kill_gives_the_uninterrupted_result(tmp_path, monkeypatch):
    config = [GPTQConfig(budget=BUDGET)]
    assert_resume_gives_the_uninterrupted_result(
        monkeypatch, tmp_path, config, CALIB, gptq_modifier.GPTQModifier, "_quantize_block", 1
    )


def test_recipe_yaml_reads_and_writes_the_budget():
    recipe = Recipe.from_yaml_str("stages:\n  - technique: gptq\n    budget: {bits_per_weight: 3.5, bits: [3, 4]}\n")
    budget = recipe.stages[0].config.budget
    assert budget == BitsBudget(bits_per_weight=3.5, bits=(3, 4))
    assert Recipe.from_yaml_str(recipe.to_yaml()) == recipe


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("budget: {bits_per_weight: 3.5, bitz: [3]}", r"unknown key\(s\) 'bitz' for BitsBudget section"),
        ("budget: {bits: [3, 4]}", "exactly one of bits_per_weight"),
        ("budget: {bits_per_weight: 3.5, total_bytes: 100}", "exactly one of bits_per_weight"),
        ("budget: {bits_per_weight: 3.5, bits: [5]}", r"bits=\[5\]"),
        ("budget: {bits_per_weight: 3.5, group_sizes: [4]}", r"group_sizes=\[4\]"),
        ("budget: {bits_per_weight: 3.5, strategy: hessian}", "strategy='hessian'"),
        ("budget: 3.5", "budget=3.5 is invalid; accepted: a mapping with keys bits_per_weight"),
        ("bits: 3\n    budget: {bits_per_weight: 3.5}", "the budget chooses them per layer"),
    ],
    ids=["unknown-key", "no-size", "two-sizes", "bits", "group", "strategy", "not-a-mapping", "bits-with-budget"],
)
def test_bad_budgets_are_refused(text, match):
    with pytest.raises(RecipeError, match=match):
        Recipe.from_yaml_str(f"stages:\n  - technique: gptq\n    {text}\n")


def test_a_budget_below_every_plan_is_refused_before_the_model_changes():
    model = make_tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RecipeError, match=r"smallest candidates .* take \d+ bytes, 3\.500 bits per weight"):
        compress(
            model,
            [GPTQConfig(budget=BitsBudget(bits_per_weight=2.0, group_sizes=(16,)))],
            calibration_data=CALIB,
            progress=False,
        )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_sensitivity_needs_calibration_data_even_for_rtn():
    with pytest.raises(CalibrationDataError, match="layer_order"):
        compress(make_tiny_llama(), [RTNConfig(budget=BUDGET)], progress=False)
