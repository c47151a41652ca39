"""Every registered technique honours the same contract on tiny Llama and BERT models."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import hfcompress
from hfcompress import Recipe, compress, registered_techniques

# One example config per technique, valid on the tiny models. A technique registered without
# an entry here fails `test_every_technique_has_an_example`.
EXAMPLES = {
    "rtn": {"bits": 4, "group_size": 32},
    "gptq": {"bits": 4, "group_size": 32, "act_order": True},
    "learned_rounding": {"bits": 4, "group_size": 32, "steps": 3, "batch_size": 2},
    "pkd": {"num_layers": 1, "epochs": 1, "batch_size": 2},
    "smoothquant": {"alpha": 0.5},
    "awq": {"bits": 4, "group_size": 32, "grid": 4},
    "int8_activations": {"strategy": "tensor", "dynamic": False, "observer": "mse"},
    "kv_cache": {"bits": 4, "group_size": 32, "residual_length": 8, "sink_tokens": 2},
    "low_rank": {"method": "whitened", "ratio": 0.25},
    "error_compensation": {"rank": 4, "factor_bits": 8},
    "block_sparse": {"layout": "calibrated", "density": 0.5, "block_size": 16},
    "rotate": {"seed": 3},
    "embeddings": {"bits": 4, "group_size": 32, "symmetric": False},
}
# Techniques that serve one kind of model only; on the other the stage must be refused, by name,
# before the model changes (a KV cache needs a model that generates; rotation, a pre-norm
# RMSNorm residual stream).
ONLY = {"kv_cache": "llama", "rotate": "llama"}
# Stages a technique needs before it (activations are quantized on layers a weight stage made).
BEFORE = {
    "int8_activations": [{"technique": "rtn", "bits": 8, "group_size": -1, "symmetric": True}],
    "error_compensation": [{"technique": "rtn", "bits": 3, "group_size": 32}],
}
# Stages a technique needs after it (smoothing quantizes nothing itself: alone it is refused).
AFTER = {
    "awq": [{"technique": "rtn", "bits": 4, "group_size": 32}],
    "smoothquant": [
        {"technique": "rtn", "bits": 8, "group_size": -1, "symmetric": True},
        {"technique": "int8_activations"},
    ],
}
TECHNIQUES = sorted(registered_techniques())


def test_every_technique_has_an_example():
    assert set(TECHNIQUES) == set(EXAMPLES)


def _config(name):
    return registered_techniques()[name].config_cls.from_dict(EXAMPLES[name])


@pytest.mark.parametrize("name", TECHNIQUES)
def test_config_round_trips(name):
    config = _config(name)
    cls = type(config)
    assert cls.from_dict(config.to_dict()) == config
    assert Recipe.from_yaml_str(Recipe([config]).to_yaml()).stages[0].config == config


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("name", TECHNIQUES)
def test_compress_save_reload(name, arch, tiny_llama, tiny_bert, llama_ids, bert_ids, tmp_path):
    model, ids, auto = (
        (tiny_llama, llama_ids, AutoModelForCausalLM)
        if arch == "llama"
        else (tiny_bert, bert_ids, AutoModelForSequenceClassification)
    )
    shape = model(ids).logits.shape
    config = _config(name)
    if ONLY.get(name, arch) != arch:
        with pytest.raises(hfcompress.RecipeError, match=f"stage 'stage_0' \\({name}\\)"):
            compress(model, [config], progress=False)
        assert not hasattr(model.config, "quantization_config")
        return
    train = None
    if config.needs_training:
        from datasets import Dataset

        labels = ids.tolist() if arch == "llama" else [0] * len(ids)
        train = Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels})
    before, after = (
        [registered_techniques()[b["technique"]].config_cls.from_dict({k: v for k, v in b.items() if k != "technique"})
         for b in table.get(name, [])]
        for table in (BEFORE, AFTER)
    )  # fmt: skip
    compress(model, [*before, config, *after], calibration_data=ids, train_dataset=train, progress=False)
    logits = model(ids).logits
    assert logits.shape == shape and torch.isfinite(logits).all()
    hfcompress.save_pretrained(model, tmp_path / "m")
    reloaded = auto.from_pretrained(tmp_path / "m")
    assert (reloaded(ids).logits - logits).abs().max() <= 1e-5


def test_every_kind_of_technique_in_one_recipe(tiny_llama, tmp_path):
    # Weights (GPTQ with error compensation), activations (SmoothQuant, INT8), low rank,
    # the token embedding (shared with the tied head), block-sparse attention and the
    # quantized KV cache in one compress() call: it saves,
    # reloads patched, and gives the same logits and the same greedy generation.
    ids = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(0))
    stages = [
        _config("smoothquant"),
        _config("low_rank"),
        _config("gptq"),
        _config("error_compensation"),
        registered_techniques()["int8_activations"].config_cls(),
        _config("embeddings"),
        _config("block_sparse"),
        _config("kv_cache"),
    ]
    compress(tiny_llama, stages, calibration_data=ids, progress=False)
    kinds = {type(m).__name__ for m in tiny_llama.modules()}
    assert {"LowRankLinear", "QuantLinear", "TiedQuantEmbedding"} <= kinds
    assert tiny_llama.config._attn_implementation == "hfcompress_kv"
    logits = tiny_llama(ids).logits
    generated = tiny_llama.generate(ids[:1, :40], max_new_tokens=16, do_sample=False)
    hfcompress.save_pretrained(tiny_llama, tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert {n: type(m) for n, m in reloaded.named_modules()} == {n: type(m) for n, m in tiny_llama.named_modules()}
    assert torch.equal(reloaded(ids).logits, logits)
    assert torch.equal(reloaded.generate(ids[:1, :40], max_new_tokens=16, do_sample=False), generated)
