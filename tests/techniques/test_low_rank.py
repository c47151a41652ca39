"""The low-rank stages end to end on tiny models: low_rank and error_compensation, their
composition with quantization, save and reload, resume, and bad input."""

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import hfcompress
from hfcompress import (
    CheckpointError,
    ErrorCompensationConfig,
    GPTQConfig,
    LowRankConfig,
    LowRankLinear,
    QuantLinear,
    RecipeError,
    RTNConfig,
    compress,
)
from hfcompress.eval.size import linear_layer_stats, size_report
from tests.conftest import make_tiny_llama

CALIB = torch.randint(0, 128, (16, 24), generator=torch.Generator().manual_seed(5))
FFN = ("gate_proj", "up_proj", "down_proj")


def _mse(model, reference):
    return (model(CALIB).logits - reference).pow(2).mean().item()


def _low_rank(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


@pytest.mark.parametrize("method", ["whitened", "asvd", "svd"])
def test_low_rank_replaces_the_ffn_layers_at_the_ratio_rank(tiny_llama, method):
    compress(tiny_llama, [LowRankConfig(method=method, ratio=0.2)], calibration_data=CALIB, progress=False)
    layers = _low_rank(tiny_llama)
    assert sorted({n.rsplit(".", 1)[1] for n in layers}) == sorted(FFN)
    assert len(layers) == 3 * len(tiny_llama.model.layers)
    for layer in layers.values():
        n, k = layer.out_features, layer.in_features
        assert layer.rank * (n + k) <= 0.8 * n * k < (layer.rank + 1) * (n + k)


def test_whitened_svd_loses_less_than_asvd_and_plain_svd(tiny_llama):
    reference = tiny_llama(CALIB).logits
    errors = {}
    for method in ("whitened", "asvd", "svd"):
        model = copy.deepcopy(tiny_llama)
        compress(model, [LowRankConfig(method=method, ratio=0.3)], calibration_data=CALIB, progress=False)
        errors[method] = _mse(model, reference)
    assert errors["whitened"] < errors["asvd"] < errors["svd"]


def test_plain_svd_needs_no_calibration(tiny_llama):
    compress(tiny_llama, [LowRankConfig(method="svd", rank=4)], progress=False)
    assert all(m.rank == 4 for m in _low_rank(tiny_llama).values())


def test_energy_picks_ranks_from_the_spectrum(tiny_llama):
    compress(tiny_llama, [LowRankConfig(energy=0.5)], calibration_data=CALIB, progress=False)
    ranks = {m.rank for m in _low_rank(tiny_llama).values()}
    full = {min(m.in_features, m.out_features) for m in _low_rank(tiny_llama).values()}
    assert max(ranks) < min(full)


def test_error_compensation_lowers_the_error_of_rtn_and_gptq(tiny_llama):
    reference = tiny_llama(CALIB).logits
    for quantizer in (RTNConfig(bits=3, group_size=16), GPTQConfig(bits=3, group_size=16)):
        plain, corrected = copy.deepcopy(tiny_llama), copy.deepcopy(tiny_llama)
        compress(plain, [quantizer], calibration_data=CALIB, progress=False)
        compress(corrected, [quantizer, ErrorCompensationConfig(rank=8)], calibration_data=CALIB, progress=False)
        assert _mse(corrected, reference) < 0.6 * _mse(plain, reference)
        layers = _low_rank(corrected)
        assert len(layers) == 7 * len(tiny_llama.model.layers)
        for layer in layers.values():
            assert isinstance(layer.base, QuantLinear)
            assert isinstance(layer.factor_in, QuantLinear) and layer.factor_in.bits == 8
            assert layer.quant_error < 1


def test_whitened_compensation_beats_plain_svd_compensation(tiny_llama):
    reference = tiny_llama(CALIB).logits
    errors = {}
    for method in ("whitened", "svd"):
        model = copy.deepcopy(tiny_llama)
        stages = [RTNConfig(bits=3, group_size=16), ErrorCompensationConfig(rank=4, method=method, factor_bits=None)]
        compress(model, stages, calibration_data=CALIB, progress=False)
        errors[method] = _mse(model, reference)
    assert errors["whitened"] < errors["svd"]


RECIPES = {
    "low-rank": [LowRankConfig(ratio=0.25)],
    "low-rank+w4": [LowRankConfig(ratio=0.25), RTNConfig(bits=4, group_size=16)],
    "w3+compensation-8bit": [GPTQConfig(bits=3, group_size=16), ErrorCompensationConfig(rank=8)],
    "w3+compensation-4bit": [RTNConfig(bits=3, group_size=16), ErrorCompensationConfig(rank=8, factor_bits=4)],
    "w3+compensation-float": [RTNConfig(bits=3, group_size=16), ErrorCompensationConfig(rank=8, factor_bits=None)],
    "low-rank+w3+compensation": [
        LowRankConfig(ratio=0.25),
        GPTQConfig(bits=3, group_size=16),
        ErrorCompensationConfig(rank=4),
    ],
}


@pytest.mark.parametrize("recipe", list(RECIPES), ids=list(RECIPES))
def test_saves_and_reloads_with_the_same_logits(tiny_llama, tmp_path, recipe):
    compress(tiny_llama, RECIPES[recipe], calibration_data=CALIB, progress=False)
    expected = tiny_llama(CALIB).logits
    hfcompress.save_pretrained(tiny_llama, tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert torch.equal(reloaded(CALIB).logits, expected)
    assert {n: type(m) for n, m in reloaded.named_modules()} == {n: type(m) for n, m in tiny_llama.named_modules()}


def test_low_rank_factors_are_quantized_by_a_later_stage(tiny_llama):
    compress(tiny_llama, RECIPES["low-rank+w4"], calibration_data=CALIB, progress=False)
    for layer in _low_rank(tiny_llama).values():
        assert isinstance(layer.factor_in, QuantLinear) and isinstance(layer.factor_out, QuantLinear)


def test_compensation_corrects_the_quantized_factors_of_a_low_rank_layer(tiny_llama):
    # The factors exist only once the low_rank stage has run; their float weights are taken
    # just before the quantizing stage rounds them.
    low_rank = copy.deepcopy(tiny_llama)
    compress(low_rank, [LowRankConfig(ratio=0.25)], calibration_data=CALIB, progress=False)
    reference = low_rank(CALIB).logits
    plain, corrected = copy.deepcopy(tiny_llama), copy.deepcopy(tiny_llama)
    stages = [LowRankConfig(ratio=0.25), RTNConfig(bits=3, group_size=16)]
    compress(plain, stages, calibration_data=CALIB, progress=False)
    compress(corrected, [*stages, ErrorCompensationConfig(rank=8)], calibration_data=CALIB, progress=False)
    assert _mse(corrected, reference) < 0.6 * _mse(plain, reference)
    ffn = {n: m for n, m in _low_rank(corrected).items() if n.endswith(FFN)}
    assert len(ffn) == 3 * len(tiny_llama.model.layers)
    for layer in ffn.values():
        for factor in (layer.factor_in, layer.factor_out):
            assert isinstance(factor, LowRankLinear) and isinstance(factor.base, QuantLinear)
            assert factor.quant_error < 1


def test_low_rank_bert_classifier_reloads(tiny_bert, tmp_path, bert_ids):
    compress(tiny_bert, [LowRankConfig(method="svd", ratio=0.3)], progress=False)
    names = sorted(n.split(".", 3)[-1] for n in _low_rank(tiny_bert))
    assert names and all(n.endswith(("intermediate.dense", "output.dense")) for n in names)
    assert not any("attention" in n for n in _low_rank(tiny_bert))
    tiny_bert.eval()
    expected = tiny_bert(bert_ids).logits
    hfcompress.save_pretrained(tiny_bert, tmp_path / "m")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    assert torch.equal(reloaded(bert_ids).logits, expected)


def test_sizes_count_a_low_rank_layer_as_the_layer_it_replaces(tiny_llama):
    before = linear_layer_stats(tiny_llama)
    compress(tiny_llama, RECIPES["w3+compensation-8bit"], calibration_data=CALIB, progress=False)
    after = linear_layer_stats(tiny_llama)
    assert set(after) == set(before)  # no factor or base counted on its own
    name = "model.layers.0.mlp.up_proj"
    layer = tiny_llama.get_submodule(name)
    assert after[name] == (
        before[name][0],
        layer.base.storage_bytes() + sum(f.storage_bytes() for f in (layer.factor_in, layer.factor_out)),
    )
    report = size_report(tiny_llama)
    assert report.layer_count == 7 * len(tiny_llama.model.layers)


def test_resume_restores_compensated_blocks_from_the_checkpoint(tiny_llama, tmp_path):
    stages = [RTNConfig(bits=3, group_size=16), ErrorCompensationConfig(rank=8)]
    first = copy.deepcopy(tiny_llama)
    compress(first, stages, calibration_data=CALIB, progress=False, checkpoint_dir=tmp_path / "ckpt")
    # A second run finds every block in the checkpoint and restores it instead.
    second = copy.deepcopy(tiny_llama)
    compress(second, stages, calibration_data=CALIB, progress=False, checkpoint_dir=tmp_path / "ckpt")
    assert torch.equal(first(CALIB).logits, second(CALIB).logits)
    assert all(isinstance(m.base, QuantLinear) for m in _low_rank(second).values())


def test_a_missing_factor_tensor_is_a_checkpoint_error(tiny_llama, tmp_path):
    compress(tiny_llama, [LowRankConfig(ratio=0.25)], calibration_data=CALIB, progress=False)
    hfcompress.save_pretrained(tiny_llama, tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.down_proj.factor_out.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"factor_out\.weight.*missing"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "m")


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"ratio": 1.5}, "ratio"),
        ({"ratio": 0.2, "rank": 4}, "exactly one of"),
        ({}, "exactly one of"),
        ({"energy": 0.0}, "energy"),
        ({"rank": 0}, "rank"),
    ],
    ids=["ratio-above-1", "two-choices", "no-choice", "energy-zero", "rank-zero"],
)
def test_bad_low_rank_config_is_a_recipe_error(fields, message):
    with pytest.raises(RecipeError, match=message):
        LowRankConfig(**fields)


def test_rank_above_min_in_out_is_an_error_before_the_model_changes(tiny_llama):
    before = copy.deepcopy(tiny_llama.state_dict())
    with pytest.raises(RecipeError, match="rank=1000 exceeds min\\(out, in\\)"):
        compress(tiny_llama, [LowRankConfig(method="svd", rank=1000)], progress=False)
    assert all(torch.equal(before[k], v) for k, v in tiny_llama.state_dict().items())


def test_compensation_without_a_quantizing_stage_is_an_error(tiny_llama):
    with pytest.raises(RecipeError, match="put this stage after the quantizing stage"):
        compress(tiny_llama, [ErrorCompensationConfig(rank=4)], calibration_data=CALIB, progress=False)


def test_compensation_of_an_already_quantized_model_is_an_error(tiny_llama):
    compress(tiny_llama, [RTNConfig(bits=4, group_size=16)], progress=False)
    with pytest.raises(RecipeError, match="float weights are gone"):
        compress(tiny_llama, [ErrorCompensationConfig(rank=4)], calibration_data=CALIB, progress=False)


def test_low_rank_refuses_layers_an_earlier_stage_compressed(tiny_llama):
    with pytest.raises(RecipeError, match="compressed by earlier stages"):
        compress(tiny_llama, [RTNConfig(bits=4, group_size=16), LowRankConfig(method="svd", ratio=0.2)], progress=False)


def test_calibrated_methods_need_calibration_data():
    model = make_tiny_llama()
    with pytest.raises(hfcompress.CalibrationDataError, match="low_rank"):
        compress(model, [LowRankConfig(ratio=0.2)], progress=False)


def test_lora_targets_the_float_factors_of_low_rank_layers(tiny_llama):
    from hfcompress.integrations.peft import add_lora

    compress(tiny_llama, [LowRankConfig(method="svd", ratio=0.25)], progress=False)
    model = add_lora(tiny_llama, r=2, lora_alpha=4)
    wrapped = {n.rsplit(".", 1)[0] for n, _ in model.named_modules() if n.endswith(".lora_A")}
    assert len(wrapped) == 2 * 3 * len(tiny_llama.model.layers)
    assert all(n.endswith((".factor_in", ".factor_out")) for n in wrapped)


def test_distillation_from_the_float_model_recovers_a_low_rank_student(tiny_llama, tmp_path):
    from datasets import Dataset

    from hfcompress.integrations.trainer import make_trainer

    teacher = copy.deepcopy(tiny_llama).eval()
    reference = teacher(CALIB).logits
    compress(tiny_llama, [LowRankConfig(method="svd", ratio=0.5)], progress=False)
    before = _mse(tiny_llama, reference)
    for name, p in tiny_llama.named_parameters():
        p.requires_grad_(".factor_" in name)
    train = Dataset.from_dict({"input_ids": CALIB.tolist(), "labels": CALIB.tolist()})
    trainer = make_trainer(
        tiny_llama, train, None, output_dir=tmp_path, teacher=teacher, alpha=1.0, temperature=1.0,
        max_steps=30, batch_size=8, learning_rate=3e-3, progress=False,
    )  # fmt: skip
    trainer.train()
    tiny_llama.eval()
    assert _mse(tiny_llama, reference) < 0.5 * before


@pytest.mark.parametrize("method", ["whitened", "svd"])
def test_global_allocation_keeps_the_budget_and_loses_less_than_uniform(tiny_llama, method):
    reference = tiny_llama(CALIB).logits
    models = {}
    for allocation in ("uniform", "global"):
        models[allocation] = copy.deepcopy(tiny_llama)
        config = LowRankConfig(method=method, ratio=0.4, allocation=allocation)
        compress(models[allocation], [config], calibration_data=CALIB, progress=False)
    layers = _low_rank(models["global"]).values()
    budget = sum(0.6 * m.in_features * m.out_features for m in layers)
    assert sum(m.rank * (m.in_features + m.out_features) for m in layers) <= budget
    assert len({m.rank for m in layers}) > 1  # spread unevenly
    assert _mse(models["global"], reference) < _mse(models["uniform"], reference)


def test_global_allocation_needs_a_ratio():
    with pytest.raises(RecipeError, match="allocation"):
        LowRankConfig(rank=4, allocation="global")


def test_global_compensation_spends_the_uniform_budget_better(tiny_llama):
    reference = tiny_llama(CALIB).logits
    models = {}
    for allocation in ("uniform", "global"):
        models[allocation] = copy.deepcopy(tiny_llama)
        stages = [RTNConfig(bits=3, group_size=16), ErrorCompensationConfig(rank=4, allocation=allocation)]
        compress(models[allocation], stages, calibration_data=CALIB, progress=False)

    def factor_weights(model):
        return sum(m.rank * (m.in_features + m.out_features) for m in _low_rank(model).values())

    assert factor_weights(models["global"]) <= factor_weights(models["uniform"])
    assert len({m.rank for m in _low_rank(models["global"]).values()}) > 1
    assert _mse(models["global"], reference) < _mse(models["uniform"], reference)


def _distilbert():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    config = DistilBertConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, hidden_dim=96, max_position_embeddings=64)
    return DistilBertForSequenceClassification(config)


def _opt():
    from tests.test_architectures import _make

    return _make("opt")


def _lfm2():
    from tests.conftest import make_tiny_causal

    return make_tiny_causal("lfm2", num_hidden_layers=2, layer_types=["full_attention", "full_attention"])


@pytest.mark.parametrize(
    "make,expected",
    [
        (_distilbert, ["distilbert.transformer.layer.0.ffn.lin1", "distilbert.transformer.layer.0.ffn.lin2"]),
        (_opt, ["model.decoder.layers.0.fc1", "model.decoder.layers.0.fc2"]),
        (_lfm2, [f"model.layers.0.feed_forward.w{i}" for i in (1, 2, 3)]),
    ],
    ids=["distilbert", "opt", "lfm2-feed-forward"],
)
def test_the_default_targets_find_the_ffn_of_distilbert_and_opt(make, expected):
    torch.manual_seed(0)
    model = make().eval()
    hfcompress.compress(model, [hfcompress.LowRankConfig(method="svd", ratio=0.3)], progress=False)
    factored = sorted(n for n, m in model.named_modules() if type(m).__name__ == "LowRankLinear")
    assert factored == sorted(expected + [n.replace(".0.", ".1.") for n in expected])
