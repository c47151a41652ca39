import copy
import dataclasses
import logging

import pytest
import torch

import hfcompress
from hfcompress import (
    CalibrationDataError,
    EmbeddingQuantConfig,
    ModelError,
    QuantLinear,
    RecipeError,
    RTNConfig,
    compress,
    registry,
)
from hfcompress.techniques.rtn import RTNModifier
from tests.conftest import make_tiny_llama


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    after = model.state_dict()
    return set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_compress_returns_the_same_model_with_packed_layers(tiny_llama, llama_ids):
    ref = tiny_llama(llama_ids).logits
    out = compress(tiny_llama, hfcompress.Recipe([RTNConfig(bits=4, group_size=32)]), progress=False)
    assert out is tiny_llama
    quantized = [n for n, m in out.named_modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 14 and "lm_head" not in quantized
    logits = out(llama_ids).logits
    assert logits.shape == ref.shape
    # 4-bit RTN on a random model: close, not equal.
    assert 0 < (logits - ref).abs().max() < 0.5 * ref.abs().max()
    assert out.config.quantization_config.layers["model.layers.0.mlp.up_proj"]["scheme"]["weights"]["num_bits"] == 4


def test_recipe_may_be_a_path_or_configs(tiny_llama, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("stages:\n  - technique: rtn\n    bits: 8\n    group_size: -1\n")
    compress(tiny_llama, str(path), progress=False)
    assert tiny_llama.model.layers[0].mlp.up_proj.bits == 8


def test_quantizing_a_tied_lm_head_unties_it(tiny_llama, llama_ids, caplog):
    embed = tiny_llama.model.embed_tokens.weight.clone()
    with caplog.at_level(logging.WARNING, logger="hfcompress"):
        compress(tiny_llama, [RTNConfig(bits=8, group_size=-1, targets=("lm_head",), ignore=())], progress=False)
    assert isinstance(tiny_llama.lm_head, QuantLinear)
    assert tiny_llama.config.tie_word_embeddings is False
    assert torch.equal(tiny_llama.model.embed_tokens.weight, embed)
    # the checkpoint now stores the float embedding and the head: said, with the stage that stores it once
    assert "'lm_head' shared its weight with the input embedding" in caplog.text
    assert "add an `embeddings` stage" in caplog.text


def test_the_embeddings_stage_unties_nothing_silently(caplog):
    model = make_tiny_llama(tie=True)
    with caplog.at_level(logging.WARNING, logger="hfcompress"):
        compress(model, [EmbeddingQuantConfig()], progress=False)
    assert "shared its weight" not in caplog.text


def test_two_stages_apply_in_order(tiny_llama):
    recipe = hfcompress.Recipe(
        [RTNConfig(bits=8, group_size=-1, targets=("re:.*mlp.*",)), RTNConfig(bits=4, group_size=16)]
    )
    compress(tiny_llama, recipe, progress=False)
    assert tiny_llama.model.layers[0].mlp.up_proj.bits == 8
    assert tiny_llama.model.layers[0].self_attn.q_proj.bits == 4
    assert len(tiny_llama.config.quantization_config.recipe["stages"]) == 2


FAILS = [
    (RTNConfig(bits=4, group_size=128), RecipeError, r"stage 'stage_1' \(rtn\): group_size=128 exceeds in_features=80"),
    (RTNConfig(targets=("re:.*nothing.*",)), RecipeError, r"select no linear layer"),
    (
        RTNConfig(bits=8, targets=("lm_head",)),
        RecipeError,
        r"\['lm_head'\] is both a target and ignored .*ignore: \[\]",
    ),
    # Defect: the first stage takes every MLP layer, so this one is left with nothing to do.
    (
        RTNConfig(bits=8, group_size=-1, targets=("re:.*mlp.*",)),
        RecipeError,
        r"stage 'stage_1' \(rtn\): .* select no layer left to quantize: the 6 layer\(s\) they match .* are "
        r"compressed by the earlier stage\(s\) \['stage_0'\]",
    ),
]


@pytest.mark.parametrize(
    "bad,error,message", FAILS, ids=["group-too-large", "no-targets", "head-ignored-by-default", "nothing-left"]
)
def test_invalid_stage_fails_before_any_stage_touches_the_model(tiny_llama, bad, error, message):
    before = _state(tiny_llama)
    recipe = hfcompress.Recipe([RTNConfig(bits=4, group_size=16, targets=("re:.*mlp.*",)), bad])
    with pytest.raises(error, match=message):
        compress(tiny_llama, recipe, progress=False)
    assert _unchanged(tiny_llama, before)
    assert not hasattr(tiny_llama.config, "quantization_config")


def test_a_compressed_model_refuses_a_second_weight_stage_by_name(tiny_llama):
    compress(tiny_llama, [RTNConfig(bits=8, group_size=-1)], progress=False)
    before = _state(tiny_llama)
    with pytest.raises(RecipeError, match=r"14 layer\(s\) of this model are compressed already .* a QuantLinear"):
        compress(tiny_llama, [RTNConfig(bits=4, group_size=16)], progress=False)
    assert _unchanged(tiny_llama, before)


def test_calls_in_turn_record_a_recipe_that_rebuilds_the_model(tiny_llama, llama_ids):
    # Each call names its stages stage_0, stage_1, ...; the recorded recipe appends them and
    # must stay a valid recipe (unique names) that gives the same model in one call (the model
    # card prints it for that).
    fresh = copy.deepcopy(tiny_llama)
    compress(tiny_llama, [RTNConfig(bits=8, group_size=-1, symmetric=True)], progress=False)
    compress(tiny_llama, [hfcompress.ActivationQuantConfig(), hfcompress.KVCacheConfig(bits=4)], progress=False)
    recorded = tiny_llama.config.quantization_config.recipe
    assert [s["name"] for s in recorded["stages"]] == ["stage_0", "stage_0_2", "stage_1"]
    compress(fresh, hfcompress.Recipe.from_dict(recorded), progress=False)
    assert fresh.config.quantization_config.to_dict() == tiny_llama.config.quantization_config.to_dict()
    assert torch.equal(fresh(llama_ids).logits, tiny_llama(llama_ids).logits)


def test_nan_weight_is_refused_and_nothing_changes(tiny_llama):
    with torch.no_grad():
        tiny_llama.model.layers[1].mlp.up_proj.weight[3, 4] = float("nan")
    before = _state(tiny_llama)
    with pytest.raises(ModelError, match=r"'model.layers.1.mlp.up_proj' has NaN or infinite weights"):
        compress(tiny_llama, [RTNConfig(bits=4, group_size=16)], progress=False)
    assert set(tiny_llama.state_dict()) == set(before)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _CalibratedConfig(RTNConfig):
    technique = "test_calibrated"
    needs_calibration = True


def test_missing_calibration_data_is_a_clear_error(tiny_llama, monkeypatch):
    monkeypatch.setitem(
        registry._REGISTRY, "test_calibrated", registry.Technique("test_calibrated", _CalibratedConfig, RTNModifier)
    )
    before = _state(tiny_llama)
    with pytest.raises(CalibrationDataError, match=r"stage 'stage_0' \(test_calibrated\) needs calibration data"):
        compress(tiny_llama, [_CalibratedConfig(group_size=16)], progress=False)
    assert _unchanged(tiny_llama, before)
    compress(tiny_llama, [_CalibratedConfig(group_size=16)], calibration_data=["some text"], progress=False)


def test_register_twice_raises():
    with pytest.raises(ValueError, match="already registered"):
        hfcompress.register_technique(RTNConfig, RTNModifier)


def test_compress_needs_a_module():
    with pytest.raises(RecipeError, match=r"needs a torch\.nn\.Module"):
        compress("model", [RTNConfig()])


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_layers_a_recipe_puts_in_follow_the_models_train_or_eval_mode(mode):
    """New modules are made in training mode; in a model compressed in eval mode they must not
    stay so (model.training says eval), nor the other way round."""
    model = make_tiny_llama(head_dim=16).train(mode == "train")
    stages = [
        {"name": "rot", "technique": "rotate"},
        {"name": "lr", "technique": "low_rank", "ratio": 0.2, "targets": ["re:.*down_proj$"]},
        {"name": "w", "technique": "rtn", "bits": 4, "group_size": 16, "ignore": ["lm_head"]},
        {"name": "a", "technique": "int8_activations"},
        {"name": "emb", "technique": "embeddings"},
        {"name": "kv", "technique": "kv_cache", "bits": 4, "group_size": 16, "residual_length": 0},
    ]
    hfcompress.compress(model, {"stages": stages}, calibration_data=torch.randint(0, 128, (2, 16)), progress=False)
    modes = {name: m.training for name, m in model.named_modules()}
    assert len(set(modes.values())) == 1 and modes[""] == (mode == "train"), modes


def test_calibration_reads_the_model_without_dropout_whatever_its_mode():
    """A model left training (as a Trainer leaves it) calibrated through its dropout: GPTQ's
    Hessians, SmoothQuant's scales and static activation ranges came out of dropout samples
    and differed from the eval-mode result. The stages now run in eval mode, and every module
    gets its own mode back."""
    from tests.conftest import make_tiny_bert

    base = make_tiny_bert(hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    stages = [
        {"technique": "smoothquant", "ignore": ["classifier"]},
        {"technique": "gptq", "bits": 4, "group_size": 16, "ignore": ["classifier"]},
        {"technique": "int8_activations", "dynamic": False, "strategy": "tensor", "ignore": ["classifier"]},
    ]
    ids = torch.randint(2, 100, (16, 32), generator=torch.Generator().manual_seed(0))
    results = {}
    for mode in ("eval", "train"):
        model = copy.deepcopy(base).train(mode == "train")
        model.bert.embeddings.dropout.eval()  # one module in the other mode: kept as it was
        compress(model, stages, calibration_data=ids, progress=False)
        results[mode] = model.state_dict()
        assert model.training == (mode == "train") and model.classifier.training == (mode == "train")
        assert model.bert.embeddings.dropout.training is False
        assert model.bert.encoder.layer[0].attention.self.query.training == (mode == "train")
    assert results["eval"].keys() == results["train"].keys()
    assert all(torch.equal(results["eval"][k], results["train"][k]) for k in results["eval"])


def test_a_refused_recipe_leaves_every_modules_mode_as_it_was():
    model = make_tiny_llama().train()
    model.model.layers[0].eval()
    with pytest.raises(CalibrationDataError):
        compress(model, [{"technique": "gptq", "bits": 4, "group_size": 16}], progress=False)
    assert model.training and model.model.layers[1].training and not model.model.layers[0].training


@pytest.mark.parametrize("technique", ["rtn", "gptq"])
def test_a_model_without_its_weights_is_refused_before_any_stage(technique):
    # built under init_empty_weights: GPTQ failed deep inside ("Tensor.item() cannot be called
    # on meta tensors"); now every stage is refused up front, naming a tensor and the fix
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(make_tiny_llama().config)
    stage = {"technique": technique, "bits": 4, "group_size": 16}
    with pytest.raises(
        ModelError, match=r"tensor 'model\.embed_tokens\.weight' is on the meta device .*from_pretrained"
    ):
        compress(model, [stage], calibration_data=torch.randint(1, 128, (4, 16)), progress=False)
    assert not hasattr(model.config, "quantization_config")


def test_a_float16_bert_calibrates_under_a_bfloat16_compute_dtype(tiny_bert, monkeypatch):
    """bfloat16 activations reached float16 LayerNorm parameters: "mixed dtype (CPU)"."""
    # As where float16 is fast (a GPU), so that the passes run in float16 (hfcompress.upcast)
    monkeypatch.setattr("hfcompress.layerwise.native_float16", lambda device_type: True)
    model = copy.deepcopy(tiny_bert).half()
    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits.float()
    gptq = {"technique": "gptq", "bits": 8, "group_size": 16, "compute_dtype": "bfloat16", "ignore": ["classifier"]}
    hfcompress.compress(model, [gptq], calibration_data=ids, progress=False)
    with torch.no_grad():
        after = model(ids).logits.float()
    assert torch.isfinite(after).all()
    torch.testing.assert_close(after, before, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_layer_a_stage_replaces_is_freed_with_its_float_weights_when_it_is_replaced(dtype, monkeypatch):
    """compress() held every module it started with (the checks' view of the model, the
    train/eval modes to restore) until it returned: each float Linear GPTQ replaced stayed alive
    with its weights, and every block of an offloaded model, loaded to be quantized, stayed in
    memory in float, not quantized as the README says. So did the float32 copy of a float16
    model's layers (hfcompress.upcast)."""
    import gc
    import weakref

    from hfcompress import GPTQConfig
    from hfcompress.techniques.gptq.modifier import GPTQModifier

    monkeypatch.setattr("hfcompress.layerwise.native_float16", lambda device_type: False)
    model = make_tiny_llama(layers=3).to(dtype)
    first = [weakref.ref(m) for m in model.model.layers[0].modules() if isinstance(m, torch.nn.Linear)]
    alive = []
    original = GPTQModifier._quantize_block

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        gc.collect()
        alive.append(sum(ref() is not None for ref in first))
        return out

    monkeypatch.setattr(GPTQModifier, "_quantize_block", spy)
    calib = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    compress(model, [GPTQConfig(bits=4, group_size=16)], calibration_data=calib, progress=False)
    assert len(first) == 7 and alive == [0, 0, 0]
