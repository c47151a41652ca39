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
    with pytest.raises(CheckpointError, match=r"format_version=99; this hfcompress reads \[1, 2, 3\]"):
        AutoModelForCausalLM.from_pretrained(folder)


def _saved_w4(tmp_path) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """A compressed tiny Llama saved in the current format, some ids and its logits on them."""
    from hfcompress import RTNConfig, compress

    from ..conftest import make_tiny_llama

    model = compress(make_tiny_llama(), [RTNConfig(bits=4, group_size=32)], progress=False)
    hfcompress.save_pretrained(model, tmp_path / "w4")
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return tmp_path / "w4", ids, model(ids).logits


def test_a_load_without_hfcompress_is_an_error_not_a_random_model(tmp_path):
    """Without `import hfcompress`, transformers skips the unknown quant method with a warning
    and builds the float model: the load guard (an empty tensor stored as the first compressed
    layer's weight) makes that a size-mismatch error instead of randomly initialised layers."""
    import subprocess
    import sys

    folder, _, _ = _saved_w4(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    assert tensors["model.layers.0.mlp.down_proj.weight"].shape == (0,)  # the first layer by name
    code = (
        "import sys; from transformers import AutoModelForCausalLM; "
        "AutoModelForCausalLM.from_pretrained(sys.argv[1]); print('loaded')"
    )
    result = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "loaded" not in result.stdout
    assert "ignore_mismatched_sizes" in result.stderr and "hfcompress" in result.stderr


def test_the_load_guard_is_not_an_unexpected_key(tmp_path, caplog):
    folder, ids, logits = _saved_w4(tmp_path)
    with caplog.at_level("WARNING"):
        reloaded = AutoModelForCausalLM.from_pretrained(folder)
    assert "UNEXPECTED" not in caplog.text and "down_proj.weight" not in caplog.text
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, logits)


def test_format_2_checkpoint_without_the_guard_loads_and_resaves_as_3(tmp_path):
    folder, ids, logits = _saved_w4(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.0.mlp.down_proj.weight"]
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(folder / "model.safetensors", framework="pt") as f:
        metadata = f.metadata()
    save_file(tensors, folder / "model.safetensors", metadata=metadata)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["format_version"] = 2
    (folder / "config.json").write_text(json.dumps(config))
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, logits)
    hfcompress.save_pretrained(reloaded, tmp_path / "resaved")
    resaved = json.loads((tmp_path / "resaved" / "config.json").read_text())["quantization_config"]
    assert resaved["format_version"] == FORMAT_VERSION == 3
    assert "model.layers.0.mlp.down_proj.weight" in load_file(tmp_path / "resaved" / "model.safetensors")


def test_an_edited_load_guard_is_refused(tmp_path):
    folder, _, _ = _saved_w4(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.weight"] = torch.zeros(3, dtype=torch.uint8)
    from safetensors.torch import save_file

    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="empty uint8 load guard"):
        AutoModelForCausalLM.from_pretrained(folder)
