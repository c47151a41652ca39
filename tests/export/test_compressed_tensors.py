"""compressed-tensors export: what plain transformers loads from it, and what is refused."""

from __future__ import annotations

import json

import pytest
import torch

import hfcompress
from hfcompress.errors import ExportError
from hfcompress.export import check_with_transformers, export_compressed_tensors, plan_compressed_tensors
from hfcompress.quant.dispatch import FORCE_REFERENCE_ENV
from tests.conftest import make_tiny_bert, make_tiny_llama

pytest.importorskip("compressed_tensors")


def _w(bits, group_size, symmetric=True, **extra):
    return {"name": "w", "technique": "rtn", "bits": bits, "group_size": group_size, "symmetric": symmetric, **extra}


def _reference_logits(model, ids, monkeypatch):
    monkeypatch.setenv(FORCE_REFERENCE_ENV, "1")  # the float32 reference path: what the export computes
    with torch.no_grad():
        out = model(input_ids=ids).logits
    monkeypatch.delenv(FORCE_REFERENCE_ENV)
    return out


@pytest.mark.parametrize(
    ("stages", "fmt", "tol"),
    [
        ([_w(4, 16)], "pack-quantized", 1e-5),
        ([_w(8, -1)], "pack-quantized", 1e-5),
        (
            [_w(8, -1), {"name": "a", "technique": "int8_activations", "dynamic": False, "strategy": "tensor"}],
            "int-quantized",
            1e-5,
        ),
        # compressed-tensors' dynamic per-token grid is absmax / 127.5, ours absmax / 127.
        ([_w(8, -1), {"name": "a", "technique": "int8_activations"}], "int-quantized", 3e-2),
        # Mixed precision: one config group per grid.
        (
            [
                {
                    **_w(4, 128),
                    "budget": {"bits_per_weight": 5.0, "bits": [4, 8], "group_sizes": [16], "strategy": "layer_order"},
                }
            ],
            "pack-quantized",
            1e-5,
        ),
    ],
    ids=["w4a16-g16", "w8a16-channel", "w8a8-static", "w8a8-dynamic", "mixed-w4-w8"],
)
def test_export_loads_in_plain_transformers_with_our_logits(tmp_path, llama_ids, monkeypatch, stages, fmt, tol):
    model = make_tiny_llama()
    hfcompress.compress(model, {"stages": stages}, calibration_data=torch.randint(0, 128, (4, 12)), progress=False)
    ours = _reference_logits(model, llama_ids, monkeypatch)
    summary = hfcompress.save_pretrained(model, tmp_path / "ct", format="compressed-tensors")
    config = json.loads((summary / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == fmt
    assert config["quantization_status"] == "compressed"
    theirs, info = check_with_transformers(summary, llama_ids)
    assert info["class"] == "LlamaForCausalLM"
    assert (theirs - ours).abs().max().item() <= tol * ours.abs().max().item()


def test_bert_classifier_export(tmp_path, bert_ids, monkeypatch):
    model = make_tiny_bert()
    hfcompress.compress(model, {"stages": [_w(4, 32, ignore=["classifier"])]}, progress=False)
    ours = _reference_logits(model, bert_ids, monkeypatch)
    export_compressed_tensors(model, tmp_path / "ct")
    theirs, info = check_with_transformers(tmp_path / "ct", bert_ids)
    assert info["class"] == "BertForSequenceClassification"
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_partial_groups_are_refused_naming_the_layer(tmp_path):
    model = make_tiny_llama()  # hidden 80: group 32 leaves a partial last group of 16
    hfcompress.compress(model, {"stages": [_w(4, 32)]}, progress=False)
    with pytest.raises(
        ExportError, match=r"layer 'model\.layers\.0\.self_attn\.q_proj' has 80 input features.*divides"
    ):
        export_compressed_tensors(model, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()  # nothing written


def test_partial_groups_regrouped_losslessly_at_a_divisor(tmp_path, llama_ids, monkeypatch):
    model = make_tiny_llama()
    hfcompress.compress(model, {"stages": [_w(4, 32)]}, progress=False)
    ours = _reference_logits(model, llama_ids, monkeypatch)
    summary = export_compressed_tensors(model, tmp_path / "ct", requantize_group_size=16)
    assert "model.layers.0.self_attn.q_proj" in summary.requantized
    assert "model.layers.0.mlp.down_proj" not in summary.requantized  # 96 inputs: full groups of 32
    theirs, _ = check_with_transformers(tmp_path / "ct", llama_ids)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)  # 16 divides 32: nothing rounded again


def test_regrouping_at_a_size_that_does_not_divide_in_features_is_refused(tmp_path):
    model = make_tiny_llama()
    hfcompress.compress(model, {"stages": [_w(4, 32)]}, progress=False)
    with pytest.raises(ExportError, match="does not divide layer"):
        export_compressed_tensors(model, tmp_path / "ct", requantize_group_size=24)


@pytest.mark.parametrize(
    ("stage", "match"),
    [
        (_w(4, 16, symmetric=False), "asymmetric weights"),
        (_w(4, 16, symmetric=False, zero_point="float"), "float zero points"),
    ],
)
def test_what_the_format_cannot_load_is_refused(stage, match):
    model = make_tiny_llama()
    hfcompress.compress(model, {"stages": [stage]}, progress=False)
    with pytest.raises(ExportError, match=match):
        plan_compressed_tensors(model)


def test_static_per_channel_activations_are_refused():
    model = make_tiny_llama()
    stages = [_w(8, -1), {"name": "a", "technique": "int8_activations", "dynamic": False, "strategy": "channel"}]
    hfcompress.compress(model, {"stages": stages}, calibration_data=torch.randint(0, 128, (4, 12)), progress=False)
    with pytest.raises(ExportError, match="per-channel input scales"):
        plan_compressed_tensors(model)


def test_float_model_and_unknown_format_are_refused(tmp_path):
    with pytest.raises(ExportError, match="no quantized layers"):
        plan_compressed_tensors(make_tiny_llama())
    with pytest.raises(ValueError, match="accepted: 'hfcompress', 'compressed-tensors'"):
        hfcompress.save_pretrained(make_tiny_llama(), tmp_path / "x", format="gguf")


@pytest.mark.real_model
def test_smollm2_w4a16_export_loads_in_plain_transformers(tmp_path, monkeypatch):
    from hfcompress.models import load_model

    model = load_model("smollm2-135m")
    stage = _w(4, 64, ignore=["lm_head"])  # 64 divides 576 and 1536: no partial groups
    hfcompress.compress(model, {"stages": [stage]}, progress=False)
    ids = torch.randint(0, model.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(0))
    ours = _reference_logits(model, ids, monkeypatch)
    export_compressed_tensors(model, tmp_path / "ct")
    theirs, info = check_with_transformers(tmp_path / "ct", ids)
    assert info["class"] == "LlamaForCausalLM"
    # The stated tolerance: the float32 reference path and transformers compute the same weights.
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


def test_cli_export_checks_and_refuses(tmp_path, tiny_llama_dir, capsys):
    from hfcompress.cli import main
    from hfcompress.models import load_model, load_tokenizer

    for group, name in ((16, "w4-g16"), (32, "w4-g32")):
        model = load_model(str(tiny_llama_dir))
        hfcompress.compress(model, {"stages": [_w(4, group)]}, progress=False)
        hfcompress.save_pretrained(model, tmp_path / name, tokenizer=load_tokenizer(str(tiny_llama_dir)))
    assert (
        main(["--quiet", "export", "--model", str(tmp_path / "w4-g16"), "--output", str(tmp_path / "ct"), "--check"])
        == 0
    )
    out = capsys.readouterr().out
    assert "plain transformers loaded it as LlamaForCausalLM" in out
    assert "max |logit difference| against our float32 reference path: 0 " in out
    # A partial group: refused with the way out, nothing written.
    assert main(["--quiet", "export", "--model", str(tmp_path / "w4-g32"), "--output", str(tmp_path / "ct2")]) == 2
    assert "--requantize-group-size" in capsys.readouterr().err and not (tmp_path / "ct2").exists()


def test_requantizing_export_refuses_other_problems_before_changing_the_model(tmp_path):
    model = make_tiny_llama()
    hfcompress.compress(model, {"stages": [_w(4, 32, symmetric=False)]}, progress=False)
    layer = model.model.layers[0].self_attn.q_proj
    with pytest.raises(ExportError, match="asymmetric weights"):
        export_compressed_tensors(model, tmp_path / "ct", requantize_group_size=16)
    assert model.model.layers[0].self_attn.q_proj is layer and layer.group_size == 32  # not re-grouped
    assert not (tmp_path / "ct").exists()


def test_a_vision_language_model_exports_and_loads_as_one(tmp_path, monkeypatch):
    """The check loaded every non-causal export as a sequence classifier: a Llava export
    failed it. Its language model's layers are the compressed ones."""
    from tests.conftest import make_tiny_llava

    model = make_tiny_llava()
    hfcompress.compress(model, {"stages": [_w(4, 16, ignore=["lm_head"])]}, progress=False)
    ids = torch.randint(3, 140, (1, 16), generator=torch.Generator().manual_seed(0))
    ours = _reference_logits(model, ids, monkeypatch)
    export_compressed_tensors(model, tmp_path / "ct")
    theirs, info = check_with_transformers(tmp_path / "ct", ids)
    assert info["class"] == "LlavaForConditionalGeneration"
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
