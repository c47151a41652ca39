"""``from_pretrained(float_dir, quantization_config=HfCompressQuantizationConfig(recipe=...))``
compresses a float checkpoint as it loads, as bitsandbytes, torchao or HQQ configs do."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import hfcompress
from hfcompress import HfCompressQuantizationConfig, RecipeError, RTNConfig
from hfcompress.errors import CheckpointError
from hfcompress.integrations.kv_cache import QuantizedKVCache

from ..conftest import make_tiny_bert, make_tiny_llama

RECIPES = Path(__file__).resolve().parents[2] / "recipes"  # the repository's, whatever the working folder
STAGES = [
    RTNConfig(bits=4, group_size=16),
    {"name": "kv4", "technique": "kv_cache", "bits": 4, "group_size": 16, "residual_length": 16, "sink_tokens": 4},
]
IDS = torch.randint(1, 128, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def float_dir(tmp_path):
    make_tiny_llama(head_dim=16).save_pretrained(tmp_path / "float")
    return tmp_path / "float"


def _modules(model):
    return {name: type(m) for name, m in model.named_modules()}


def test_loading_with_a_recipe_gives_the_model_compress_gives(float_dir, tmp_path):
    expected = AutoModelForCausalLM.from_pretrained(float_dir)
    hfcompress.compress(expected, STAGES, progress=False)

    model = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=HfCompressQuantizationConfig(STAGES))
    assert _modules(model) == _modules(expected)
    assert isinstance(model.model.layers[0].self_attn.q_proj, hfcompress.QuantLinear)
    assert torch.equal(model(IDS).logits, expected(IDS).logits)
    # the recorded config is the one compress() records: the stages once, the layers they made
    config = model.config.quantization_config
    assert config.recipe == expected.config.quantization_config.recipe
    assert [s["name"] for s in config.recipe["stages"]] == ["stage_0", "kv4"]
    assert config.layers == expected.config.quantization_config.layers
    out = model.generate(IDS[:1], max_new_tokens=40, do_sample=False, return_dict_in_generate=True)
    assert isinstance(getattr(out, "cache", None) or out.past_key_values, QuantizedKVCache)

    # and it saves and reloads like any compressed model
    hfcompress.save_pretrained(model, tmp_path / "saved", card=False)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert _modules(reloaded) == _modules(model)
    assert torch.equal(reloaded(IDS).logits, model(IDS).logits)
    assert torch.equal(reloaded.generate(IDS[:1], max_new_tokens=40, do_sample=False), out.sequences)


def test_a_shipped_recipe_by_path(tmp_path):
    # rotation, int8 weights and dynamic int8 activations: a recipe that needs no data
    make_tiny_llama(hidden_size=256, intermediate_size=512).save_pretrained(tmp_path / "float")
    recipe = str(RECIPES / "llama_w8a8_dynamic.yaml")
    expected = AutoModelForCausalLM.from_pretrained(tmp_path / "float")
    hfcompress.compress(expected, recipe, progress=False)
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "float", quantization_config=HfCompressQuantizationConfig(recipe)
    )
    assert _modules(model) == _modules(expected)
    assert torch.equal(model(IDS).logits, expected(IDS).logits)


def test_a_classifier_in_bfloat16(tmp_path):
    make_tiny_bert().save_pretrained(tmp_path / "bert")
    stages = [
        {"technique": "rtn", "bits": 8, "group_size": -1, "symmetric": True, "ignore": ["classifier"]},
        {"technique": "int8_activations", "ignore": ["classifier"]},
    ]
    ids = torch.randint(2, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    expected = AutoModelForSequenceClassification.from_pretrained(tmp_path / "bert", dtype=torch.bfloat16)
    hfcompress.compress(expected, stages, progress=False)
    model = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "bert", dtype=torch.bfloat16, quantization_config=HfCompressQuantizationConfig(stages)
    )
    assert model.dtype == torch.bfloat16 and _modules(model) == _modules(expected)
    assert torch.equal(model(ids).logits, expected(ids).logits)


def test_stages_that_need_data_or_nothing_to_apply_are_refused_before_loading(float_dir, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the weights were read before the refusal")

    monkeypatch.setattr("safetensors.torch.load_file", never)
    gptq = HfCompressQuantizationConfig([{"name": "w4", "technique": "gptq", "bits": 4, "group_size": 16}])
    with pytest.raises(RecipeError, match=r"stage 'w4' \(gptq\) needs calibration data: pass .*calibration_data="):
        AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=gptq)
    pkd = HfCompressQuantizationConfig([{"name": "d", "technique": "pkd", "num_layers": 1}])
    with pytest.raises(RecipeError, match=r"stage 'd' \(pkd\) trains the model and needs a training set"):
        AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=pkd)
    smooth = HfCompressQuantizationConfig(str(RECIPES / "bert_w8a8_dynamic.yaml"))  # SmoothQuant measures activations
    with pytest.raises(RecipeError, match=r"stage 'smooth' \(smoothquant\) needs calibration data"):
        AutoModelForSequenceClassification.from_pretrained(float_dir, quantization_config=smooth)
    with pytest.raises(RecipeError, match="needs a recipe"):
        AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=HfCompressQuantizationConfig())
    with pytest.raises(RecipeError, match="bits=5"):
        HfCompressQuantizationConfig([{"technique": "rtn", "bits": 5}])


def test_a_checkpoints_own_config_on_a_float_checkpoint_is_refused(float_dir, tmp_path):
    model = make_tiny_llama(head_dim=16)
    hfcompress.compress(model, STAGES[:1], progress=False)
    recorded = model.config.quantization_config
    with pytest.raises(CheckpointError, match="describes the layers of a compressed checkpoint"):
        AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=recorded)


GPTQ = [{"name": "w4", "technique": "gptq", "bits": 4, "group_size": 16}]


def test_calibrating_stages_take_data_from_the_config(float_dir, tmp_path):
    # token ids: the model compress() gives with the same ids
    ids = torch.randint(1, 128, (8, 32), generator=torch.Generator().manual_seed(2))
    expected = AutoModelForCausalLM.from_pretrained(float_dir)
    hfcompress.compress(expected, GPTQ, calibration_data=ids, progress=False)
    config = HfCompressQuantizationConfig(GPTQ, calibration_data=ids)
    model = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=config)
    assert _modules(model) == _modules(expected)
    assert torch.equal(model(IDS).logits, expected(IDS).logits)
    # the data stays out of what is saved
    assert not {"calibration_data", "tokenizer"} & set(model.config.quantization_config.to_dict())
    hfcompress.save_pretrained(model, tmp_path / "saved", card=False)
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "saved")(IDS).logits, model(IDS).logits)


def test_calibration_text_uses_the_checkpoints_tokenizer(tiny_llama_dir):
    text = ["the quick brown fox jumps over the lazy dog " * 8] * 4
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    options = dict(num_calibration_samples=4, calibration_seq_len=32)
    expected = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    hfcompress.compress(expected, GPTQ, calibration_data=text, tokenizer=tokenizer, progress=False, **options)
    config = HfCompressQuantizationConfig(GPTQ, calibration_data=text, **options)  # no tokenizer given
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=config)
    assert torch.equal(model(IDS).logits, expected(IDS).logits)
    # a Dataset's text column too
    from datasets import Dataset

    dataset = HfCompressQuantizationConfig(GPTQ, calibration_data=Dataset.from_dict({"text": text}), **options)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=dataset)
    assert torch.equal(model(IDS).logits, expected(IDS).logits)
    # a generator of texts: read once (transformers copies the config, and the tokenizer's
    # choice reads the data before compress() does; it failed with "cannot pickle 'generator'")
    generated = HfCompressQuantizationConfig(GPTQ, calibration_data=(t for t in text), **options)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=generated)
    assert torch.equal(model(IDS).logits, expected(IDS).logits)
    # a folder without a tokenizer: the error names the argument that fixes it
    plain = tiny_llama_dir.parent / "plain"
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir).save_pretrained(plain)
    with pytest.raises(RecipeError, match=r"could not load a tokenizer from .*plain.* pass .*tokenizer=\.\.\."):
        AutoModelForCausalLM.from_pretrained(plain, quantization_config=config)


def test_one_stage_mapping_as_the_recipe(float_dir):
    # compress() takes {"technique": "rtn", ...} as a one-stage recipe; the config refused it as a
    # saved recipe with unknown keys
    config = HfCompressQuantizationConfig({"technique": "rtn", "bits": 4, "group_size": 16})
    assert [s["technique"] for s in config.recipe["stages"]] == ["rtn"]
    model = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=config)
    assert isinstance(model.model.layers[0].mlp.up_proj, hfcompress.QuantLinear)


def test_a_float16_load_compresses_as_compress_does_and_stays_float16(float_dir, monkeypatch):
    # As on a CPU without a float16 matmul: the passes run in float32 (hfcompress.upcast).
    monkeypatch.setattr("hfcompress.layerwise.native_float16", lambda device_type: False)
    ids = torch.randint(1, 128, (8, 32), generator=torch.Generator().manual_seed(2))
    expected = AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float16)
    hfcompress.compress(expected, GPTQ, calibration_data=ids, progress=False)
    config = HfCompressQuantizationConfig(GPTQ, calibration_data=ids)
    model = AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float16, quantization_config=config)
    assert _modules(model) == _modules(expected)
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert torch.equal(model(IDS).logits, expected(IDS).logits)
