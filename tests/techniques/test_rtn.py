"""RTN beyond the in-memory case: accelerate-offloaded models."""

import torch
from transformers import AutoModelForCausalLM

import hfcompress
from hfcompress import QuantLinear, RTNConfig, compress
from tests.conftest import make_tiny_llama

DEVICE_MAP = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.layers.2": "disk",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "cpu",
}


def test_rtn_on_an_offloaded_model_equals_the_in_memory_result_and_reloads(tmp_path):
    # Defect: the offloaded layers became QuantLinears of meta tensors (wrong logits, then NaN)
    # and save_pretrained raised a TypeError.
    make_tiny_llama(seed=4, layers=3).save_pretrained(tmp_path / "float")
    config = [RTNConfig(bits=4, group_size=16)]
    in_memory = AutoModelForCausalLM.from_pretrained(tmp_path / "float")
    compress(in_memory, config, progress=False)
    offloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "float", device_map=DEVICE_MAP, offload_folder=tmp_path / "offload"
    )
    assert offloaded.model.layers[2].mlp.up_proj.weight.is_meta
    compress(offloaded, config, progress=False)

    expected, got = in_memory.state_dict(), offloaded.state_dict()
    packed = [k for k in expected if k.endswith((".qweight", ".scales", ".zeros"))]
    assert len(packed) == 3 * 7 * 3
    assert all(not got[k].is_meta and torch.equal(got[k], expected[k]) for k in packed)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(offloaded(ids).logits, in_memory(ids).logits)

    hfcompress.save_pretrained(offloaded, tmp_path / "w4")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "w4")
    assert isinstance(reloaded.model.layers[2].mlp.up_proj, QuantLinear)
    torch.testing.assert_close(reloaded(ids).logits, in_memory(ids).logits)
