"""Mixture-of-experts models: fused experts split into per-expert Linear layers."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, GptOssConfig, GptOssForCausalLM

import hfcompress
from hfcompress import GPTQConfig, QuantLinear, RecipeError, RTNConfig, compress
from hfcompress.experts import LinearExperts, find_fused_experts, fuse_experts_back, unfuse_experts
from tests.test_architectures import CALIB, HELD_OUT, _make


def _gpt_oss():
    torch.manual_seed(0)
    config = GptOssConfig(
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        vocab_size=128,
        max_position_embeddings=64,
        layer_types=["full_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    return GptOssForCausalLM(config).eval()


@pytest.mark.parametrize("make", [lambda: _make("mixtral"), _gpt_oss], ids=["mixtral", "gpt-oss"])
def test_split_experts_compute_the_fused_function(make):
    # GPT-OSS stores its experts transposed, interleaved, with biases and a clamped gate.
    model = make()
    expected = model(HELD_OUT).logits
    originals = unfuse_experts(model)
    assert len(originals) == 2 and all(isinstance(model.get_submodule(n), LinearExperts) for n in originals)
    torch.testing.assert_close(model(HELD_OUT).logits, expected, rtol=1e-5, atol=1e-5)
    fuse_experts_back(model, originals)
    assert find_fused_experts(model) == list(originals)
    assert torch.equal(model(HELD_OUT).logits, expected)


def test_split_copies_nothing():
    model = _make("mixtral")
    fused = model.model.layers[0].mlp.experts
    unfuse_experts(model)
    expert = model.model.layers[0].mlp.experts[2]
    assert expert.down_proj.weight.data_ptr() == fused.down_proj[2].data_ptr()


def test_experts_split_is_recorded_and_reapplied_on_load(tmp_path):
    model = _make("mixtral")
    compress(model, [RTNConfig(bits=4, group_size=16)], progress=False)
    hfcompress.save_pretrained(model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]
    assert config["patches"] == [
        {"name": "unfuse_experts", "modules": ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]}
    ]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert isinstance(reloaded.model.layers[1].mlp.experts[3].gate_up_proj, QuantLinear)
    assert torch.equal(reloaded(HELD_OUT).logits, model(HELD_OUT).logits)


def test_a_recipe_that_leaves_the_experts_alone_keeps_them_fused(tmp_path):
    model = _make("mixtral")
    compress(model, [RTNConfig(bits=4, group_size=16, ignore=("lm_head", "re:.*experts.*"))], progress=False)
    assert find_fused_experts(model) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert model.config.quantization_config.patches == []


@pytest.mark.parametrize("then_rtn", [False, True], ids=["low_rank", "low_rank+rtn"])
def test_low_rank_factors_every_expert_and_reloads(then_rtn, tmp_path):
    # The factors low rank adds inside the experts are new layers, not experts left in float:
    # they were taken for an expert the recipe skipped, and low rank on a MoE was refused.
    model = _make("mixtral")
    stages = [hfcompress.LowRankConfig(ratio=0.5)] + ([RTNConfig(bits=8, group_size=-1)] if then_rtn else [])
    compress(model, stages, calibration_data=CALIB, progress=False)
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, LinearExperts)
    factored = [m for m in experts.modules() if type(m).__name__ == "LowRankLinear"]
    assert len(factored) == 2 * 4  # gate_up and down of 4 experts
    assert any(isinstance(m, QuantLinear) for m in experts.modules()) == then_rtn
    expected = model(HELD_OUT).logits
    hfcompress.save_pretrained(model, tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert torch.equal(reloaded(HELD_OUT).logits, expected)


def test_compressing_some_experts_of_a_layer_is_refused_before_anything_changes():
    model = _make("mixtral")
    with pytest.raises(RecipeError, match=r"compresses some experts of model.layers.0.mlp.experts but not"):
        compress(model, [RTNConfig(bits=4, group_size=16, ignore=("lm_head", "re:.*experts\\.0\\..*"))], progress=False)
    assert find_fused_experts(model) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_gptq_quantizes_an_expert_no_token_reached_with_rtn(caplog):
    model = _make("mixtral")

    def never_route_to_expert_3(router, args, output):
        logits = output[0].clone()
        logits[:, 3] = -float("inf")
        top, indices = torch.topk(logits.softmax(dim=-1), router.top_k, dim=-1)
        return output[0], top / top.sum(dim=-1, keepdim=True), indices

    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(never_route_to_expert_3)
    with caplog.at_level(logging.WARNING, logger="hfcompress.techniques.gptq.modifier"):
        compress(model, [GPTQConfig(bits=4, group_size=16)], calibration_data=CALIB, progress=False)
    never = [r.getMessage() for r in caplog.records if "saw no calibration token" in r.getMessage()]
    assert len(never) == 4 and all("experts.3." in m for m in never)
    assert isinstance(model.model.layers[0].mlp.experts[3].down_proj, QuantLinear)
