"""The kv_cache recipe stage: config checks, saving, and from_pretrained switching it back on."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import hfcompress
from hfcompress import KVCacheConfig, RecipeError, RTNConfig, compress
from hfcompress.integrations.kv_cache import ATTENTION, QuantizedKVCache, kv_config

from ..integrations.test_kv_cache import SPEC, make_model


def test_config_round_trips_and_refuses_bad_values():
    config = KVCacheConfig(bits=2, group_size=16, residual_length=128, sink_tokens=64)
    assert KVCacheConfig.from_dict(config.to_dict()) == config
    with pytest.raises(RecipeError, match="bits=3"):
        KVCacheConfig(bits=3)
    with pytest.raises(RecipeError, match="residual_length=-1"):
        KVCacheConfig(residual_length=-1)
    with pytest.raises(RecipeError, match="unknown key"):
        KVCacheConfig.from_dict({"nbits": 4})


@torch.no_grad()
def test_saved_model_reloads_with_the_cache_on(tmp_path):
    model = make_model()
    compress(model, [RTNConfig(bits=4, group_size=16), KVCacheConfig(bits=4, **SPEC)], progress=False)
    ids = torch.randint(1, 128, (1, 30), generator=torch.Generator().manual_seed(0))
    before = model.generate(ids, max_new_tokens=60, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    hfcompress.save_pretrained(model, tmp_path / "m")
    patches = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]["patches"]
    assert patches == [{"name": "kv_cache", **KVCacheConfig(bits=4, **SPEC).to_dict()}]

    card = (tmp_path / "m" / "README.md").read_text()
    assert "## KV cache" in card and "in 4 bits" in card and "kv_cache" in card

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert kv_config(reloaded) == KVCacheConfig(bits=4, **SPEC)
    assert reloaded.config._attn_implementation == ATTENTION
    after = reloaded.generate(ids, max_new_tokens=60, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    cache = getattr(after, "cache", None) or after.past_key_values
    assert isinstance(cache, QuantizedKVCache) and cache.layers[0].packed_tokens > 0
    assert torch.equal(after.sequences, before.sequences)


def test_stage_refuses_an_encoder(tiny_bert):
    with pytest.raises(RecipeError, match=r"stage 'stage_0' \(kv_cache\).*does not generate"):
        compress(tiny_bert, [KVCacheConfig()], progress=False)


def test_one_kv_stage_per_model():
    model = make_model()
    with pytest.raises(RecipeError, match="already has a quantized KV cache"):
        compress(model, [KVCacheConfig(), KVCacheConfig()], progress=False)
    compress(model, [KVCacheConfig()], progress=False)
    with pytest.raises(RecipeError, match="already has a quantized KV cache"):
        compress(model, [KVCacheConfig()], progress=False)
