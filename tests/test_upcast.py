"""A float16 model on a CPU without a float16 matmul compresses in float32 and comes back float16
(hfcompress.upcast)."""

import copy
import logging

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import hfcompress
import hfcompress.layerwise as layerwise
import hfcompress.upcast as upcast
from hfcompress.recipe import Recipe
from hfcompress.registry import technique_for_config
from hfcompress.techniques.activations import ActivationQuantConfig
from tests.conftest import make_tiny_bert, make_tiny_llama
from tests.test_recipe import RECIPES

IDS = torch.randint(2, 100, (8, 128), generator=torch.Generator().manual_seed(0))
SHORT = IDS[:, :32]  # for make_tiny_llama()'s 64 positions
STATIC = [
    {"technique": "rtn", "bits": 4, "group_size": 16, "name": "w4"},
    {"technique": "int8_activations", "strategy": "tensor", "dynamic": False, "name": "a8"},
]


def _float16_matmul(monkeypatch, fast: bool) -> None:
    """As on a CPU with (``fast``) or without a float16 matrix multiply, whatever this one has."""
    monkeypatch.setattr(layerwise, "native_float16", lambda device_type: fast)


def _tensor_dtypes(model):
    return {
        **{n: t.dtype for n, t in model.named_parameters(remove_duplicate=False)},
        **{n: t.dtype for n, t in model.named_buffers(remove_duplicate=False)},
    }


def _input_dtypes(model, run):
    """The dtypes the first block's MLP saw while ``run`` ran."""
    seen = set()
    layer = model.model.layers[0].mlp
    handle = layer.register_forward_pre_hook(lambda module, args: seen.add(args[0].dtype))
    try:
        run()
    finally:
        handle.remove()
    return seen


# Recipes whose stages add tensors of every kind: quantized layers' biases and a quantized
# embedding's output dtype (BERT), low-rank factors, a norm fused into int8 activations and a KV
# cache, and a Fisher budget that takes gradients.
SHAPES = ["bert_w8a8_dynamic_emb8", "llama_lowrank_ffn20", "llama_w4a8_sparse50_kv4", "llama_mixed_3.5bpw_gptq"]


@pytest.mark.parametrize("name", SHAPES)
def test_a_float16_model_comes_back_as_compressing_it_in_float16_leaves_it(name, monkeypatch, tmp_path):
    path = next(p for p in RECIPES if p.stem == name)
    if name.startswith("bert"):
        model = make_tiny_bert(hidden_size=128, num_attention_heads=2, intermediate_size=256)
        auto = AutoModelForSequenceClassification
    else:
        model = make_tiny_llama(hidden_size=256, intermediate_size=512, max_position_embeddings=256)
        auto = AutoModelForCausalLM
    model.save_pretrained(tmp_path / "float")
    base = auto.from_pretrained(tmp_path / "float", dtype=torch.float16)  # rotary tables stay float32
    native = copy.deepcopy(base)
    _float16_matmul(monkeypatch, True)  # the passes run in float16
    hfcompress.compress(native, Recipe.from_yaml(path), calibration_data=IDS, progress=False)
    model = copy.deepcopy(base)
    _float16_matmul(monkeypatch, False)  # they run in float32
    hfcompress.compress(model, Recipe.from_yaml(path), calibration_data=IDS, progress=False)
    assert _tensor_dtypes(model) == _tensor_dtypes(native)
    assert {n: type(m) for n, m in model.named_modules()} == {n: type(m) for n, m in native.named_modules()}
    with torch.no_grad():
        logits = model(IDS[:2]).logits
        reference = base.float()(IDS[:2]).logits
        error = (logits.float() - reference).abs().mean()
        native_error = (native(IDS[:2]).logits.float() - reference).abs().mean()
    assert logits.dtype == torch.float16
    assert error < 1.5 * native_error + 1e-3  # calibrated in float32: as close to the float model
    hfcompress.save_pretrained(model, tmp_path / "m", card=False)
    reloaded = auto.from_pretrained(tmp_path / "m")
    saved = {k: v.dtype for k, v in model.state_dict().items()}
    assert {k: v.dtype for k, v in reloaded.state_dict().items()} == saved
    with torch.no_grad():
        assert torch.equal(reloaded(IDS[:2]).logits, logits)


def test_the_passes_run_in_float32_and_say_so(monkeypatch, caplog):
    _float16_matmul(monkeypatch, False)
    model = make_tiny_llama().half()
    with caplog.at_level(logging.INFO, logger="hfcompress"):
        seen = _input_dtypes(model, lambda: hfcompress.compress(model, STATIC, calibration_data=SHORT, progress=False))
    assert seen == {torch.float32}
    assert "stage 'a8' run in float32, and the model is cast back to float16 afterwards" in caplog.text
    assert "matrix multiply, so" not in caplog.text  # no slowness warning
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    # Where float16 is fast, and for stages that run no pass, nothing is cast.
    _float16_matmul(monkeypatch, True)
    model = make_tiny_llama().half()
    assert _input_dtypes(model, lambda: hfcompress.compress(model, STATIC, calibration_data=SHORT, progress=False)) == {
        torch.float16
    }
    _float16_matmul(monkeypatch, False)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hfcompress"):
        hfcompress.compress(make_tiny_llama().half(), STATIC[:1], progress=False)
    assert "float32" not in caplog.text


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_without_the_memory_for_a_float32_copy_the_passes_run_slowly_and_say_why(dtype, monkeypatch, caplog):
    # As on a CPU without AVX-512-FP16 (float16) / an AVX2-only one (bfloat16).
    monkeypatch.setattr(layerwise, "native_float16" if dtype == torch.float16 else "native_bfloat16", lambda d: False)
    monkeypatch.setattr(upcast, "_available_memory", lambda device: 0)
    model = make_tiny_llama().to(dtype)
    name = str(dtype).removeprefix("torch.")
    with caplog.at_level(logging.WARNING, logger="hfcompress"):
        seen = _input_dtypes(model, lambda: hfcompress.compress(model, STATIC, calibration_data=SHORT, progress=False))
    assert seen == {dtype}
    assert f"the model is {name}, and this cpu has no fast {name} matrix multiply" in caplog.text
    assert "stage 'a8' run slower than in float32 (a float32 copy needs 0.0 GiB more memory on cpu" in caplog.text
    assert f"model.to(torch.{name})" in caplog.text


def test_a_stage_that_fails_leaves_the_model_in_its_own_dtype(monkeypatch):
    _float16_matmul(monkeypatch, False)
    model = make_tiny_llama().half()
    modifier = technique_for_config(ActivationQuantConfig()).modifier_cls
    applied = modifier.apply

    def fail(self, model, context):
        applied(self, model, context)
        raise RuntimeError("out of memory in the last block")

    monkeypatch.setattr(modifier, "apply", fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        hfcompress.compress(model, STATIC, calibration_data=SHORT, progress=False)
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert model(SHORT[:1]).logits.dtype == torch.float16  # it runs
    with pytest.raises(hfcompress.ModelError, match="interrupted in stage 'a8'"):
        hfcompress.compress(model, STATIC, calibration_data=SHORT, progress=False)


def test_added_parameters_take_the_dtype_of_the_layer_they_replace_and_buffers_keep_theirs(monkeypatch):
    _float16_matmul(monkeypatch, False)
    model = nn.Sequential(nn.Linear(8, 8).half(), nn.Linear(8, 8))  # the second kept in float32
    with upcast.float32_while(model, torch.device("cpu"), ["stage"]):
        assert model[0].weight.dtype == torch.float32
        for i in range(2):  # as a stage replaces a layer by a new module in float32
            layer = nn.Module()
            layer.inner = nn.Linear(8, 8)
            layer.register_buffer("scale", torch.ones(8))
            model[i] = layer
    assert model[0].inner.weight.dtype == model[0].inner.bias.dtype == torch.float16
    assert model[1].inner.weight.dtype == torch.float32
    assert model[0].scale.dtype == model[1].scale.dtype == torch.float32


def test_a_killed_run_resumes_in_float32_to_the_uninterrupted_result(monkeypatch, tmp_path):
    from hfcompress import GPTQConfig
    from hfcompress.techniques.gptq.modifier import GPTQModifier
    from tests.conftest import assert_resume_gives_the_uninterrupted_result

    _float16_matmul(monkeypatch, False)
    config = [GPTQConfig(bits=4, group_size=16)]
    # block 0 comes from the checkpoint, saved in float32
    got = assert_resume_gives_the_uninterrupted_result(
        monkeypatch, tmp_path, config, SHORT, GPTQModifier, "_quantize_block", 1, dtype=torch.float16
    )
    assert {v.dtype for v in got.values() if v.is_floating_point()} == {torch.float16}
