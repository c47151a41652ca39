"""``model.dequantize()``: a compressed model back to a plain float transformers model."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

import hfcompress
from hfcompress import CompressedModule
from hfcompress.integrations.kv_cache import kv_config
from hfcompress.quant.dispatch import reference_path
from tests.conftest import make_tiny_bert, make_tiny_llama

W4 = {"stages": [{"name": "w", "technique": "rtn", "bits": 4, "group_size": 16, "ignore": ["lm_head"]}]}
CALIB = torch.randint(2, 128, (8, 24), generator=torch.Generator().manual_seed(5))
IDS = torch.randint(2, 100, (2, 20), generator=torch.Generator().manual_seed(6))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _plain_reload(model, path):
    """Saved by transformers alone and loaded back: a plain model, no hfcompress config."""
    model.save_pretrained(path)
    assert "quantization_config" not in (path / "config.json").read_text()
    return type(model).from_pretrained(path).eval()


def test_a_weight_only_model_dequantizes_to_the_weights_it_computed_with(tmp_path):
    model = make_tiny_llama()
    hfcompress.compress(model, W4, progress=False)
    with reference_path():  # the float computation of the dequantized weights
        want = _logits(model)
    assert model.dequantize() is model
    assert not any(isinstance(m, CompressedModule) for m in model.modules())
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert not getattr(model, "is_quantized", False) and not hasattr(model.config, "quantization_config")
    torch.testing.assert_close(_logits(model), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(_plain_reload(model, tmp_path / "plain")(IDS).logits, _logits(model))


def test_a_reloaded_checkpoint_dequantizes_and_keeps_its_kinds_of_layer(tmp_path):
    """GPT-2's Conv1D projections come back as Conv1D (weight stored [K, N]): an nn.Linear in
    their place would save transposed weights that reload wrongly (silently, for square ones)."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64)).eval()
    hfcompress.compress(
        model, {"stages": [{"name": "w", "technique": "rtn", "bits": 8, "group_size": -1}]}, progress=False
    )
    hfcompress.save_pretrained(model, tmp_path / "q")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    with reference_path():
        want = _logits(loaded)
    loaded.dequantize()
    assert all(type(loaded.transformer.h[0].attn.get_submodule(n)) is Conv1D for n in ("c_attn", "c_proj"))
    torch.testing.assert_close(_logits(loaded), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(_plain_reload(loaded, tmp_path / "plain")(IDS).logits, _logits(loaded))


def test_input_quantization_and_low_rank_layers_dequantize_to_their_float_maps(tmp_path):
    """W8A8 drops its int8 inputs; an error-compensated layer (low-rank factors over a quantized
    base) becomes one Linear of ``B A`` plus the dequantized base, its bias kept."""
    model = make_tiny_bert()
    recipe = {
        "stages": [
            {"name": "w", "technique": "gptq", "bits": 4, "group_size": 16},
            {"name": "ec", "technique": "error_compensation", "rank": 8, "factor_bits": 8, "factor_group_size": -1},
            {"name": "a", "technique": "int8_activations"},
        ]
    }
    hfcompress.compress(model, recipe, calibration_data=CALIB[:, :16] % 100, progress=False)
    layer = model.bert.encoder.layer[0].intermediate.dense
    assert isinstance(layer, hfcompress.LowRankLinear) and isinstance(layer.base, hfcompress.QuantLinear)
    assert isinstance(layer.factor_in, hfcompress.QuantLinear)  # 8-bit factors
    before = _logits(model)
    model.dequantize()
    assert not any(isinstance(m, CompressedModule) for m in model.modules())
    after = _logits(model)
    assert (after - before).abs().max() < 0.05 * before.abs().max()  # only the int8 inputs' rounding
    assert torch.equal(_logits(_plain_reload(model, tmp_path / "plain")), after)


def test_attention_patches_are_switched_off_and_structural_ones_refused():
    model = make_tiny_llama(hidden_size=64)
    recipe = {"stages": [*W4["stages"], {"name": "kv", "technique": "kv_cache", "bits": 4, "group_size": 16}]}
    hfcompress.compress(model, recipe, progress=False)
    assert kv_config(model) is not None
    model.dequantize()
    assert kv_config(model) is None and model.config._attn_implementation == "sdpa"

    rotated = make_tiny_llama(hidden_size=64)
    hfcompress.compress(rotated, {"stages": [{"name": "r", "technique": "rotate"}, *W4["stages"]]}, progress=False)
    with pytest.raises(hfcompress.ModelError, match="patch 'rotation' changed its structure"):
        rotated.dequantize()
    assert sum(isinstance(m, CompressedModule) for m in rotated.modules()) == 14  # untouched


def test_a_lora_adapter_merges_into_the_dequantized_model(tmp_path):
    """QLoRA's way to a float model with the adapter in it: dequantize the base, then merge."""
    from hfcompress.integrations.peft import add_lora

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64)).eval()
    hfcompress.compress(
        model, {"stages": [{"name": "w", "technique": "rtn", "bits": 4, "group_size": 16}]}, progress=False
    )
    peft_model = add_lora(model, r=4, lora_alpha=8)
    with torch.no_grad():  # a trained adapter: B is no longer zero
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    with pytest.raises(hfcompress.ModelError, match=r"call model.dequantize\(\) first"):
        peft_model.merge_and_unload()
    with reference_path():
        want = _logits(peft_model)
    peft_model.dequantize()
    torch.testing.assert_close(_logits(peft_model), want, rtol=1e-4, atol=1e-4)
    merged = peft_model.merge_and_unload()
    assert type(merged.transformer.h[0].attn.c_proj) is Conv1D  # unwrapped, and still Conv1D
    torch.testing.assert_close(_logits(merged), want, rtol=1e-4, atol=1e-4)
    assert torch.equal(_plain_reload(merged, tmp_path / "plain")(IDS).logits, _logits(merged))
