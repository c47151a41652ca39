"""Checkpoints written by earlier hfcompress versions keep loading (tests/fixtures/README.md)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import hfcompress
from hfcompress import CheckpointError, QuantLinear
from hfcompress.integrations.transformers_quantizer import FORMAT_VERSION
from hfcompress.quant.dispatch import FORCE_REFERENCE_ENV

FIXTURES = Path(__file__).parent.parent / "fixtures"


@pytest.fixture
def reference_path(monkeypatch):
    # The fixture's logits were computed on the reference path; compare like with like. Float32
    # matmuls round differently across CPUs (6e-8 on logits of 0.67 between two of our VMs), so
    # the comparison allows float32 round-off; a mis-decoded layer is off by orders more.
    monkeypatch.setenv(FORCE_REFERENCE_ENV, "1")


def test_format_1_checkpoint_loads_with_its_logits(reference_path):
    model = AutoModelForCausalLM.from_pretrained(FIXTURES / "format_v1")
    expected = load_file(FIXTURES / "format_v1_expected.safetensors")
    layers = model.model.layers[0]
    assert layers.mlp.up_proj.bits == 8 and layers.mlp.up_proj.symmetric
    assert layers.self_attn.q_proj.zeros.dtype == torch.float16  # float zero points
    assert layers.self_attn.v_proj.bits == 3 and isinstance(model.lm_head, QuantLinear)
    with torch.no_grad():
        torch.testing.assert_close(model(expected["input_ids"]).logits, expected["logits"], rtol=1e-5, atol=1e-6)


def test_format_1_checkpoint_resaves_as_the_current_format(reference_path, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(FIXTURES / "format_v1")
    hfcompress.save_pretrained(model, tmp_path / "resaved")
    config = json.loads((tmp_path / "resaved" / "config.json").read_text())["quantization_config"]
    assert config["format_version"] == FORMAT_VERSION
    assert config["layers"]["lm_head"]["scheme"]["weights"]["symmetric"] is True
    expected = load_file(FIXTURES / "format_v1_expected.safetensors")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "resaved")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(expected["input_ids"]).logits, expected["logits"], rtol=1e-5, atol=1e-6)


def test_unknown_future_format_is_refused(tmp_path):
    folder = tmp_path / "future"
    shutil.copytree(FIXTURES / "format_v1", folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"format_version=99; this hfcompress reads \[1, 2\]"):
        AutoModelForCausalLM.from_pretrained(folder)
