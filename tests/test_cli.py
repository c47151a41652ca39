import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from hfcompress import QuantEmbedding, QuantLinear
from hfcompress.cli import main

RECIPE = "stages:\n  - name: w4\n    technique: rtn\n    bits: 4\n    group_size: 32\n"


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "w4.yaml"
    path.write_text(RECIPE)
    return path


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "eval.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    return path


def test_compress_saves_and_reports(tiny_llama_dir, recipe, text, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--quiet", "compress", "--model", str(tiny_llama_dir), "--recipe", str(recipe), "--output", str(out)]
    args += ["--report", "--eval-data", str(text), "--seq-len", "16", "--max-windows", "3", "--decode-tokens", "4"]
    assert main(args) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)
    report = capsys.readouterr().out
    assert "first 3 non-overlapping windows of 16 tokens" in report
    rows = [line for line in report.splitlines() if "(original)" in line or "(compressed, reloaded)" in line]
    assert len(rows) == 2 and "(original)" in rows[0] and "(compressed, reloaded)" in rows[1]
    assert "| 32.00 | 2.000 |" in rows[0]  # float32 before
    # 4-bit codes plus a 16-bit scale and an 8-bit zero per group of 32; K = 80 and K = 96 both
    # need 3 groups (80 ends in a partial one): 4 + 3 * 24 * 512 rows / 42240 weights = 4.873.
    assert "| 4.87 | 0.305 |" in rows[1]
    # The model card carries the same measured rows, the plots and the Hub metadata.
    card = (out / "README.md").read_text()
    assert rows[0] in card and rows[1] in card
    assert "first 3 non-overlapping windows of 16 tokens" in card
    assert "![size against quality](hfcompress_size_quality.svg)" in card
    assert (out / "hfcompress_size_quality.svg").is_file() and (out / "hfcompress_layer_error.svg").is_file()
    assert f'base_model: "{tiny_llama_dir}"' in card and "license:" not in card  # unknown licence: left out


def test_eval_ppl_json(tiny_llama_dir, text, capsys):
    args = ["--quiet", "eval", "ppl", "--model", str(tiny_llama_dir), "--eval-data", str(text), "--seq-len", "16"]
    assert main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["windows"] == 900 // 16 and result["perplexity"] > 1


def test_quiet_silences_the_libraries_bars_too_and_restores_them(tiny_llama_dir, text, capsys):
    # transformers draws "Loading weights" and "Writing model shards" bars of its own; --quiet
    # (no progress bars) turns them off for the command and back on after it.
    from transformers.utils import logging as transformers_logging

    assert transformers_logging.is_progress_bar_enabled()
    args = ["--quiet", "eval", "ppl", "--model", str(tiny_llama_dir), "--eval-data", str(text), "--seq-len", "16"]
    assert main(args) == 0
    assert "%|" not in capsys.readouterr().err
    assert transformers_logging.is_progress_bar_enabled()
    assert main(args[1:]) == 0  # without --quiet: the bars are there
    assert "Loading weights" in capsys.readouterr().err


def test_bad_recipe_exits_2_before_loading(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  - technique: rtn\n    bits: 5\n")
    code = main(["compress", "--model", "does-not-matter", "--recipe", str(bad), "--output", str(tmp_path / "o")])
    assert code == 2
    assert "bits=5 is invalid" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_refuses_to_overwrite_output(tiny_llama_dir, recipe, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    args = ["compress", "--model", str(tiny_llama_dir), "--recipe", str(recipe), "--output", str(out)]
    assert main(args) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"


def test_unknown_model_is_a_clear_error(recipe, tmp_path, capsys):
    args = ["compress", "--model", "no-such-model", "--recipe", str(recipe), "--output", str(tmp_path / "o")]
    assert main(args) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err


def test_console_script_is_installed():
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "hfcompress"]
    assert script.value == "hfcompress.cli:main"


def test_compress_with_a_kv_cache_stage(tiny_llama_dir, text, tmp_path, capsys):
    from hfcompress.integrations.kv_cache import QuantizedKVCache, kv_config

    recipe = tmp_path / "w4kv4.yaml"
    recipe.write_text(RECIPE + "  - name: kv4\n    technique: kv_cache\n    bits: 4\n    group_size: 32\n")
    out = tmp_path / "out"
    args = ["--quiet", "compress", "--model", str(tiny_llama_dir), "--recipe", str(recipe), "--output", str(out)]
    args += ["--report", "--eval-data", str(text), "--seq-len", "16", "--max-windows", "3", "--decode-tokens", "4"]
    assert main(args) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert kv_config(model).bits == 4
    result = model.generate(
        model.dummy_inputs["input_ids"][:1], max_new_tokens=4, do_sample=False, return_dict_in_generate=True
    )
    assert isinstance(getattr(result, "cache", None) or result.past_key_values, QuantizedKVCache)
    assert "(compressed, reloaded)" in capsys.readouterr().out


def test_compress_with_error_compensation_reports_its_bits(tiny_llama_dir, text, tmp_path, capsys):
    from hfcompress import LowRankLinear

    recipe = tmp_path / "w4ec.yaml"
    recipe.write_text(
        RECIPE + "  - name: ec\n    technique: error_compensation\n    method: svd\n    rank: 4\n    factor_bits: 8\n"
    )
    out = tmp_path / "out"
    args = ["--quiet", "compress", "--model", str(tiny_llama_dir), "--recipe", str(recipe), "--output", str(out)]
    args += ["--report", "--eval-data", str(text), "--seq-len", "16", "--max-windows", "3", "--decode-tokens", "4"]
    assert main(args) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, LowRankLinear) and isinstance(layer.base, QuantLinear)
    rows = [line for line in capsys.readouterr().out.splitlines() if "(compressed, reloaded)" in line]
    bits = float(rows[0].split("|")[4])
    # Counted by hand: the W4 base as stored, plus 8-bit factor codes (A: [4, K], B: [N, 4])
    # with one float16 scale per row (per channel: 4 and K < the factor group of 128).
    layers = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    nbytes = sum(
        m.base.storage_bytes() + (4 * m.in_features + 2 * 4) + (m.out_features * 4 + 2 * m.out_features) for m in layers
    )
    weights = sum(m.in_features * m.out_features for m in layers)
    assert bits == pytest.approx(8 * nbytes / weights, abs=0.005)


def test_compress_with_a_calibrated_recipe_reads_the_calibration_text(tiny_llama_dir, text, tmp_path):
    # The text file is read before the model loads and reaches the GPTQ stage as text.
    recipe = tmp_path / "gptq.yaml"
    recipe.write_text("stages:\n  - name: w4\n    technique: gptq\n    bits: 4\n    group_size: 32\n")
    out = tmp_path / "out"
    args = ["--quiet", "compress", "--model", str(tiny_llama_dir), "--recipe", str(recipe), "--output", str(out)]
    assert (
        main([*args, "--calibration", str(text), "--num-calibration-samples", "4", "--calibration-seq-len", "16"]) == 0
    )
    assert isinstance(AutoModelForCausalLM.from_pretrained(out).model.layers[0].mlp.up_proj, QuantLinear)
    assert main([*args, "--overwrite"]) == 2  # no --calibration: refused before anything loads


def test_compress_calibrates_on_a_chat_jsonl_as_the_chat_template_lays_it_out(tiny_llama_dir, tmp_path):
    # A .jsonl of chat rows was read as raw text, JSON syntax and all; now its conversations are
    # laid out by the tokenizer's chat template, giving the model that the rendered text gives.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    tokenizer.save_pretrained(tiny_llama_dir)
    chats = [[{"role": "user", "content": f"tell me a fact number {i}"}, {"role": "assistant", "content": "ok"}]
             for i in range(12)]  # fmt: skip
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    (tmp_path / "chats.txt").write_text("\n\n".join(tokenizer.apply_chat_template(c, tokenize=False) for c in chats))
    recipe = tmp_path / "gptq.yaml"
    recipe.write_text("stages:\n  - name: w4\n    technique: gptq\n    bits: 4\n    group_size: 32\n")
    states = []
    for source in ("chats.jsonl", "chats.txt"):
        out = tmp_path / source.replace(".", "_")
        args = ["--quiet", "compress", "--model", str(tiny_llama_dir), "--recipe", str(recipe), "--output", str(out)]
        flags = ["--calibration", str(tmp_path / source), "--num-calibration-samples", "4"]
        assert main([*args, *flags, "--calibration-seq-len", "16"]) == 0
        states.append(AutoModelForCausalLM.from_pretrained(out).state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[1])


@pytest.mark.parametrize(
    "args,message",
    [
        (["eval", "ppl", "--model", "m", "--seq-len", "1"], "argument --seq-len: 1 is less than 2"),
        (["eval", "ppl", "--model", "m", "--batch-size", "0"], "argument --batch-size: 0 is less than 1"),
        (["eval", "ppl", "--model", "m", "--max-windows", "-3"], "argument --max-windows: -3 is less than 1"),
        (["eval", "ppl", "--model", "m", "--seq-len", "x"], "argument --seq-len: 'x' is not an integer"),
        (
            ["compress", "--model", "m", "--recipe", "r", "--output", "o", "--num-calibration-samples", "0"],
            "argument --num-calibration-samples: 0 is less than 1",
        ),
        (["eval", "glue", "--model", "m", "--limit", "0"], "argument --limit: 0 is less than 1"),
    ],
    ids=["seq-len", "batch-size", "max-windows", "not-a-number", "calibration-samples", "glue-limit"],
)
def test_bad_numbers_are_usage_errors_naming_the_flag(args, message, capsys):
    # they crashed deep in the run before (a division by zero, a reshape to [-3, 512])
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_perplexity_refuses_windows_it_cannot_score(tiny_llama):
    from hfcompress.errors import EvaluationError
    from hfcompress.eval.perplexity import perplexity

    ids = torch.randint(0, 100, (200,))
    for kwargs in (dict(seq_len=1), dict(seq_len=16, batch_size=0), dict(seq_len=16, max_windows=0)):
        with pytest.raises(EvaluationError, match="a window needs at least 2 tokens"):
            perplexity(tiny_llama, ids, progress=False, **kwargs)


def test_a_vision_language_model_compresses_and_evaluates_on_text(recipe, text, tmp_path, capsys):
    """A Llava folder loads as image-text-to-text (it loaded as a sequence classifier); its
    language model is compressed and its perplexity measured on text."""
    from transformers import LlavaForConditionalGeneration

    from tests.conftest import make_char_tokenizer, make_tiny_llava

    folder = tmp_path / "llava"
    make_tiny_llava().save_pretrained(folder)
    make_char_tokenizer().save_pretrained(folder)
    out = tmp_path / "out"
    args = ["--quiet", "compress", "--model", str(folder), "--recipe", str(recipe), "--output", str(out)]
    args += ["--report", "--eval-data", str(text), "--seq-len", "16", "--max-windows", "2", "--decode-tokens", "2"]
    assert main(args) == 0
    assert "first 2 non-overlapping windows of 16 tokens" in capsys.readouterr().out  # measured on text
    model = LlavaForConditionalGeneration.from_pretrained(out)
    assert isinstance(model.model.language_model.layers[0].mlp.up_proj, QuantLinear)
    assert not isinstance(model.model.vision_tower.encoder.layers[0].mlp.fc1, QuantLinear)
    args = ["--quiet", "eval", "ppl", "--model", str(out), "--eval-data", str(text), "--seq-len", "16", "--json"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["perplexity"] > 1


def _bert_config():
    """A 2-layer BERT config (vocab 100); seeds torch, so the model built from it is the same."""
    from transformers import BertConfig

    torch.manual_seed(0)
    return BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96)


@pytest.mark.parametrize("task", [["--task", "feature-extraction"], []], ids=["feature-extraction", "from-config"])
def test_compress_a_sentence_embedding_encoder_as_its_base_model(tmp_path, task):
    # --task feature-extraction loads AutoModel: no classifier head is added, and the saved
    # folder loads as the base model it was (what sentence-embedding users load). Without
    # --task, a config naming BertModel is read the same way (it loaded as a classifier with a
    # random head).
    from transformers import AutoModel, BertModel

    BertModel(_bert_config()).save_pretrained(tmp_path / "encoder")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "stages:\n  - {name: w8, technique: rtn, bits: 8, group_size: -1, symmetric: true}\n"
        "  - {name: emb, technique: embeddings}\n"
    )
    out = tmp_path / "out"
    args = ["--quiet", "compress", "--model", str(tmp_path / "encoder"), *task]
    assert main([*args, "--recipe", str(recipe), "--output", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertModel"]
    model = AutoModel.from_pretrained(out)
    assert type(model).__name__ == "BertModel" and "classifier" not in dict(model.named_modules())
    assert isinstance(model.embeddings.word_embeddings, QuantEmbedding)
    assert isinstance(model.pooler.dense, QuantLinear)
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    reference = BertModel.from_pretrained(tmp_path / "encoder")(ids).last_hidden_state
    assert ((model(ids).last_hidden_state - reference).norm() / reference.norm()) < 0.02


def test_a_head_no_task_covers_loads_as_its_own_class_and_a_new_classifier_is_warned_about(tmp_path, caplog):
    # BertForMaskedLM loaded as a sequence classifier and was refused as not loading cleanly (its
    # MLM head "unexpected"); a BertForTokenClassification would have lent its token head to a
    # sequence classifier of the same names.
    from transformers import AutoModelForMaskedLM, BertForMaskedLM, BertModel

    config = _bert_config()
    BertForMaskedLM(config).save_pretrained(tmp_path / "mlm")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - {technique: rtn, bits: 8, group_size: -1}\n")
    args = ["--quiet", "compress", "--recipe", str(recipe)]
    assert main([*args, "--model", str(tmp_path / "mlm"), "--output", str(tmp_path / "out")]) == 0
    model = AutoModelForMaskedLM.from_pretrained(tmp_path / "out")
    assert type(model).__name__ == "BertForMaskedLM" and isinstance(
        model.bert.encoder.layer[0].output.dense, QuantLinear
    )
    BertModel(config).save_pretrained(tmp_path / "encoder")
    with caplog.at_level(logging.WARNING, logger="hfcompress"):
        forced = ["--model", str(tmp_path / "encoder"), "--task", "sequence-classification"]
        assert main([*args, *forced, "--output", str(tmp_path / "cls")]) == 0
    assert "is a base model (BertModel) without a classification head" in caplog.text
    assert "--task feature-extraction" in caplog.text


@pytest.mark.parametrize("task", ["sequence-classification", "feature-extraction"])
def test_an_encoders_report_compares_its_outputs_with_the_originals(tmp_path, task, capsys):
    # The report gave an encoder sizes only ("-" for perplexity and speed): nothing said how far
    # the compressed model's outputs moved.
    from tests.conftest import save_tiny_bert_classifier

    folder = save_tiny_bert_classifier(tmp_path / "bert", layers=2)
    if task == "feature-extraction":  # the encoder alone, as a sentence-embedding model ships
        from transformers import AutoModelForSequenceClassification

        AutoModelForSequenceClassification.from_pretrained(folder).bert.save_pretrained(folder)
    text = tmp_path / "lines.txt"
    text.write_text("\n".join(f"line {i}: the film was good and the plot was fine" for i in range(40)) + "\n= A =\n")
    recipe = tmp_path / "r.yaml"
    out = tmp_path / "out"
    for bits, name in ((8, "w8"), (2, "w2")):
        recipe.write_text(f"stages:\n  - {{technique: rtn, bits: {bits}, group_size: 16}}\n")
        args = ["--quiet", "compress", "--model", str(folder), "--task", task, "--recipe", str(recipe)]
        args += ["--output", str(out / name), "--report", "--eval-data", str(text)]
        assert main(args) == 0
    reports = capsys.readouterr().out.split("Recipe:")[1:]
    what = "logits" if task == "sequence-classification" else "mean-pooled embeddings"
    cosines = []
    for report in reports:
        line = next(x for x in report.splitlines() if x.startswith("Outputs"))
        assert line.startswith(f"Outputs ({what}) of the reloaded model against the original's on 40 lines of ")
        assert ("the same class for" in line) == (task == "sequence-classification")
        cosines.append(float(line.split("mean cosine ")[1].split()[0]))
    assert 0.99 < cosines[0] <= 1.0 and cosines[1] < cosines[0]  # 8 bits follow the original closer than 2
    card = (out / "w2" / "README.md").read_text()
    assert f"Outputs ({what}) of the reloaded model" in card


def test_compress_loads_in_the_dtype_asked_and_saves_and_measures_in_it(tiny_llama_dir, text, tmp_path, capsys):
    recipe = tmp_path / "gptq.yaml"
    recipe.write_text("stages:\n  - name: w4\n    technique: gptq\n    bits: 4\n    group_size: 32\n")
    out = tmp_path / "out"
    args = ["--quiet", "compress", "--model", str(tiny_llama_dir), "--recipe", str(recipe), "--output", str(out)]
    args += ["--dtype", "float16", "--calibration", str(text), "--num-calibration-samples", "4"]
    args += ["--calibration-seq-len", "16", "--report", "--eval-data", str(text), "--seq-len", "16"]
    assert main([*args, "--max-windows", "3", "--decode-tokens", "0"]) == 0
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert model.model.norm.weight.dtype == torch.float16 and model.config.dtype == torch.float16
    rows = [line for line in capsys.readouterr().out.splitlines() if "(original)" in line]
    assert "| 16.00 | 1.000 |" in rows[0]  # the float16 model before
    ppl = ["--quiet", "eval", "ppl", "--model", str(out), "--eval-data", str(text), "--seq-len", "16", "--json"]
    assert main([*ppl, "--dtype", "auto"]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] > 1
