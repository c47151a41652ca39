"""Model cards: Hub metadata, the run's numbers, and well-formed plots."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
import torch
import yaml

import hfcompress
from hfcompress.card import CardInfo, layer_errors, render_card
from hfcompress.eval.perplexity import PerplexityResult
from hfcompress.eval.size import size_report
from hfcompress.report import ModelMeasurement
from tests.conftest import make_tiny_bert, make_tiny_llama

W4 = {"stages": [{"name": "w4", "technique": "rtn", "bits": 4, "group_size": 16, "symmetric": True}]}


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def _rows(model, before_ppl=20.0, after_ppl=21.5):
    size = size_report(model)

    def ppl(p):
        return PerplexityResult(perplexity=p, nll=float(torch.log(torch.tensor(p))), tokens=100, windows=2, seq_len=50)

    return [
        ModelMeasurement("base (original)", size, ppl(before_ppl), None, None),
        ModelMeasurement("out (compressed, reloaded)", size, ppl(after_ppl), None, 3.5),
    ]


def test_card_metadata_numbers_and_plots():
    model = make_tiny_llama()
    hfcompress.compress(model, W4, progress=False)
    errors = layer_errors(model)
    assert len(errors) == 14 and all(0 < e < 0.5 for e in errors.values())  # every Linear but the tied lm_head
    info = CardInfo(base_model="org/tiny", license="apache-2.0", measurements=_rows(model), protocol="two windows")
    card, files = render_card(model, info)
    meta = _front_matter(card)
    assert meta["base_model"] == "org/tiny" and meta["base_model_relation"] == "quantized"
    assert meta["library_name"] == "transformers" and meta["license"] == "apache-2.0"
    assert meta["pipeline_tag"] == "text-generation"
    assert {"hfcompress", "rtn", "4-bit"} <= set(meta["tags"])
    assert "| 20.000 |" in card and "| 21.500 |" in card and "two windows" in card
    assert '"technique": "rtn"' in card  # the recipe
    assert "## Bits per layer" not in card  # one grid for every layer
    assert set(files) == {"hfcompress_layer_error.svg", "hfcompress_size_quality.svg"}
    bars = ET.fromstring(files["hfcompress_layer_error.svg"]).findall(".//{http://www.w3.org/2000/svg}rect")
    assert len(bars) == 1 + 14  # the background and one bar per layer
    points = ET.fromstring(files["hfcompress_size_quality.svg"]).findall(".//{http://www.w3.org/2000/svg}circle")
    assert len(points) == 2


def test_save_pretrained_writes_a_card_for_compressed_models_only(tmp_path):
    model = make_tiny_bert()
    hfcompress.compress(model, W4, progress=False)
    hfcompress.save_pretrained(model, tmp_path / "q")
    card = (tmp_path / "q" / "README.md").read_text()
    assert _front_matter(card)["pipeline_tag"] == "text-classification"
    assert "Nothing was measured" in card and (tmp_path / "q" / "hfcompress_layer_error.svg").is_file()
    hfcompress.save_pretrained(model, tmp_path / "none", card=False)
    assert not (tmp_path / "none" / "README.md").exists()
    hfcompress.save_pretrained(make_tiny_bert(), tmp_path / "float")
    assert not (tmp_path / "float" / "README.md").exists()


@pytest.mark.real_model
def test_main_job_card_names_the_bundled_base_model(tmp_path, capsys):
    """The README's main job, shortened (2 windows, 4 decode tokens): the card renders with the
    run's numbers and both plots, and names SmolLM2 and its licence."""
    from hfcompress.cli import main

    out = tmp_path / "demo"
    args = ["--quiet", "compress", "--model", "smollm2-135m", "--recipe", "recipes/smollm2_w4a16_rtn_g128.yaml"]
    args += ["--output", str(out), "--report", "--max-windows", "2", "--decode-tokens", "4"]
    assert main(args) == 0
    report = capsys.readouterr().out
    card = (out / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"
    rows = [line for line in report.splitlines() if line.startswith("| smollm2-135m") or line.startswith("| demo")]
    assert len(rows) == 2 and all(row in card for row in rows)
    for plot in ("hfcompress_layer_error.svg", "hfcompress_size_quality.svg"):
        ET.parse(out / plot)
        assert f"]({plot})" in card
