"""The harness end to end on tiny models: scoring a saved compressed model, fine-tuning, tables,
the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import hfcompress
from hfcompress.cli import main
from hfcompress.glue import (
    GlueDataError,
    GlueResult,
    evaluate_glue,
    finetune_glue,
    glue_metrics,
    load_glue,
    load_glue_model,
    markdown_table,
    tokenize_glue,
)
from tests.conftest import save_tiny_bert_classifier


@pytest.fixture
def compressed_dir(tmp_path):
    """A tiny BERT classifier compressed to W4 RTN and saved."""
    source = save_tiny_bert_classifier(tmp_path / "fp32", layers=2)
    model, tokenizer = load_glue_model(source, "sst2")
    hfcompress.compress(model, hfcompress.Recipe([hfcompress.RTNConfig(bits=4, group_size=32)]), progress=False)
    return hfcompress.save_pretrained(model, tmp_path / "w4", tokenizer=tokenizer)


def test_scores_a_saved_compressed_model(compressed_dir, tiny_glue_dir):
    model, tokenizer = load_glue_model(compressed_dir, "sst2")
    assert any(isinstance(m, hfcompress.QuantLinear) for m in model.modules())
    (result,) = evaluate_glue(model, tokenizer, "sst2", source=tiny_glue_dir, batch_size=5)

    # The same predictions computed one example at a time, without the harness's batching.
    data = load_glue("sst2", "validation", tiny_glue_dir)
    with torch.no_grad():
        predictions = [int(model(**tokenizer(t, return_tensors="pt")).logits.argmax()) for t in data["text_a"]]
    assert result.metrics == glue_metrics("sst2", predictions, data["label"])
    assert result.num_examples == len(data) and result.task == "sst2"


def test_finetune_learns_the_task(tmp_path, tiny_glue_dir):
    model, tokenizer = load_glue_model(save_tiny_bert_classifier(tmp_path / "m", layers=2), "sst2")
    (before,) = evaluate_glue(model, tokenizer, "sst2", source=tiny_glue_dir)
    finetune_glue(
        model,
        tokenizer,
        "sst2",
        output_dir=tmp_path / "scratch",
        source=tiny_glue_dir,
        epochs=8,
        learning_rate=2e-3,
        batch_size=8,
        progress=False,
    )
    (after,) = evaluate_glue(model, tokenizer, "sst2", source=tiny_glue_dir)
    assert after.main == 1.0 > before.main


def _save_base_encoder(path):
    """A tiny BERT without a head, with the character tokenizer."""
    from transformers import BertConfig, BertModel

    from tests.conftest import make_char_tokenizer

    BertModel(
        BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).save_pretrained(path)
    make_char_tokenizer().save_pretrained(path)
    return path


def test_base_encoder_gets_a_regression_head_for_stsb(tmp_path):
    model, _ = load_glue_model(_save_base_encoder(tmp_path / "base"), "stsb")
    assert model.config.num_labels == 1 and model.config.problem_type == "regression"


def test_a_classifier_naming_its_classes_in_another_order_is_scored_by_name(tmp_path, tiny_glue_dir, caplog):
    # A Hub classifier whose id2label orders the classes otherwise than the dataset
    # (roberta-large-mnli: contradiction, neutral, entailment) was scored in id order: its
    # predictions were read as the wrong classes, silently. They are now mapped by name.
    import logging

    path = save_tiny_bert_classifier(tmp_path / "m", layers=1)
    model, tokenizer = load_glue_model(path, "sst2")
    (plain,) = evaluate_glue(model, tokenizer, "sst2", source=tiny_glue_dir)
    data = load_glue("sst2", "validation", tiny_glue_dir)
    with torch.no_grad():  # the same model with its two classes swapped, and named so
        head = model.classifier
        head.weight.copy_(head.weight.flip(0))
        head.bias.copy_(head.bias.flip(0))
    model.config.id2label, model.config.label2id = {0: "POSITIVE", 1: "NEGATIVE"}, {"POSITIVE": 0, "NEGATIVE": 1}
    with caplog.at_level(logging.INFO, logger="hfcompress"):
        (swapped,) = evaluate_glue(model, tokenizer, "sst2", source=tiny_glue_dir)
    assert swapped.metrics == plain.metrics and "mapped by name" in caplog.text
    model.config.id2label = {0: "bad", 1: "good"}  # names that are not the task's: id order, with a warning
    with caplog.at_level(logging.WARNING, logger="hfcompress"):
        (unmatched,) = evaluate_glue(model, tokenizer, "sst2", source=tiny_glue_dir)
    with torch.no_grad():
        ids = [int(model(**tokenizer(t, return_tensors="pt")).logits.argmax()) for t in data["text_a"]]
    assert unmatched.metrics == glue_metrics("sst2", ids, data["label"]) != plain.metrics
    assert "scoring its class i as the task's class i" in caplog.text


def test_finetuning_a_classifier_with_its_classes_in_another_order_keeps_its_head_meaning(tmp_path, tiny_glue_dir):
    # Trained on the task's ids, a head that names class 0 "positive" learnt the opposite of its
    # names; the labels are now mapped into its order (unlabelled augmentation rows stay -100).
    import datasets

    from hfcompress.glue import labels_in_model_order

    model, tokenizer = load_glue_model(save_tiny_bert_classifier(tmp_path / "m", layers=2), "sst2")
    model.config.id2label, model.config.label2id = {0: "positive", 1: "negative"}, {"positive": 0, "negative": 1}
    rows = datasets.Dataset.from_dict({"labels": [0, 1, -100, 1]})
    assert labels_in_model_order(rows, model, "sst2")["labels"] == [1, 0, -100, 0]
    finetune_glue(model, tokenizer, "sst2", output_dir=tmp_path / "scratch", source=tiny_glue_dir, epochs=8,
                  learning_rate=2e-3, batch_size=8, progress=False)  # fmt: skip
    assert model.config.id2label == {0: "positive", 1: "negative"}
    (after,) = evaluate_glue(model, tokenizer, "sst2", source=tiny_glue_dir)
    assert after.main == 1.0


def test_a_new_head_is_named_as_the_dataset_and_mnli_maps_three_classes(tmp_path):
    from hfcompress.glue.tasks import class_order, get_task

    model, _ = load_glue_model(_save_base_encoder(tmp_path / "base"), "rte")
    assert model.config.id2label == {0: "entailment", 1: "not_entailment"}
    assert model.config.label2id == {"entailment": 0, "not_entailment": 1}
    mnli = get_task("mnli")
    roberta_large_mnli = {0: "CONTRADICTION", 1: "NEUTRAL", 2: "ENTAILMENT"}
    assert class_order(roberta_large_mnli, mnli).tolist() == [2, 1, 0]
    assert class_order({0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}, mnli) is None
    assert class_order({0: "entailment", 1: "neutral", 2: "contradiction"}, mnli) is None
    assert class_order({0: "Not Entailment", 1: "entailment"}, get_task("rte")).tolist() == [1, 0]


def test_classifier_head_that_does_not_fit_is_refused(tmp_path):
    path = save_tiny_bert_classifier(tmp_path / "m", layers=1, num_labels=2)
    with pytest.raises(GlueDataError, match="num_labels=2, but GLUE stsb needs 1"):
        load_glue_model(path, "stsb")


def test_tokenize_pairs_and_labels(tmp_path, tiny_glue_dir):
    _, tokenizer = load_glue_model(save_tiny_bert_classifier(tmp_path / "m", layers=1), "rte")
    encoded = tokenize_glue(load_glue("rte", "validation", tiny_glue_dir), tokenizer, max_length=10)
    assert {"input_ids", "attention_mask", "labels"} <= set(encoded.column_names)
    assert max(len(x) for x in encoded["input_ids"]) == 10  # truncated


def _result(task, value, metric="accuracy"):
    return GlueResult(task=task, metrics={metric: value}, main_metric=metric, num_examples=10)


def test_markdown_table_side_by_side_with_retained_percentage():
    mrpc = {"accuracy": 0.5, "f1": 0.8}
    table = markdown_table(
        {
            "teacher": [_result("sst2", 0.9), GlueResult("mrpc", mrpc, "f1", 10)],
            "student": [_result("sst2", 0.81), GlueResult("mrpc", {"accuracy": 0.4, "f1": 0.72}, "f1", 10)],
        }
    )
    lines = table.strip().splitlines()
    assert lines[0] == "| model | sst2 | mrpc | avg | % of teacher |"
    assert lines[2] == "| teacher | 90.0 | 80.0/50.0 | 85.0 | 100.0% |"
    assert lines[3] == "| student | 81.0 | 72.0/40.0 | 76.5 | 90.0% |"


def test_cli_eval_glue_writes_json_and_markdown(compressed_dir, tiny_glue_dir, tmp_path, capsys):
    out_json, out_md = tmp_path / "s.json", tmp_path / "s.md"
    rc = main(
        [
            "--quiet",
            "eval",
            "glue",
            "--model",
            f"q={compressed_dir}",
            "--model",
            str(compressed_dir),
            "--tasks",
            "SST-2",
            "--data-dir",
            str(tiny_glue_dir),
            "--json",
            str(out_json),
            "--markdown",
            str(out_md),
        ]
    )
    assert rc == 0
    scores = json.loads(out_json.read_text())
    assert set(scores) == {"q", compressed_dir.name}
    assert scores["q"]["sst2"]["metrics"] == scores[compressed_dir.name]["sst2"]["metrics"]
    assert out_md.read_text() in capsys.readouterr().out


def test_cli_task_placeholder_and_finetune(tmp_path, tiny_glue_dir, monkeypatch):
    save_tiny_bert_classifier(tmp_path / "m-sst2", layers=1)
    save_tiny_bert_classifier(tmp_path / "m-rte", layers=1)
    args = ["--quiet", "eval", "glue", "--model", f"m={tmp_path}/m-{{task}}", "--tasks", "sst2,rte", "--finetune"]
    args += ["--data-dir", str(tiny_glue_dir), "--output-dir", str(tmp_path / "ft"), "--json", str(tmp_path / "s.json")]
    assert main([*args, "--epochs", "1"]) == 0
    scores = json.loads((tmp_path / "s.json").read_text())["m"]
    assert sorted(scores) == ["rte", "sst2"]
    assert (tmp_path / "ft" / "m-rte" / "config.json").is_file()

    # A rerun (after a kill, or to add a task) scores the tasks already fine-tuned with the same
    # settings instead of training them again; other settings train again.
    from hfcompress.glue import harness

    trained = []
    real = harness.finetune_glue
    monkeypatch.setattr(
        harness,
        "finetune_glue",
        lambda model, tok, task, **kw: trained.append(task.name) or real(model, tok, task, **kw),
    )
    assert main([*args, "--epochs", "1"]) == 0
    again = json.loads((tmp_path / "s.json").read_text())["m"]
    assert trained == [] and {t: r["metrics"] for t, r in again.items()} == {t: r["metrics"] for t, r in scores.items()}
    (tmp_path / "ft" / "m-rte" / "hfcompress_finetune.json").unlink()  # as a kill between save and record leaves it
    assert main([*args, "--epochs", "1"]) == 0
    assert trained == ["rte"]
    assert main([*args, "--epochs", "2"]) == 0
    assert trained == ["rte", "sst2", "rte"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tasks", "sst3"], "unknown GLUE task 'sst3'"),
        (["--tasks", "rte", "--data-dir", "/nonexistent/glue"], "does not exist"),
        (["--model", "/elsewhere/w4", "--tasks", "rte"], "--model name 'w4' given twice"),
    ],
    ids=["unknown-task", "missing-folder", "duplicate-name"],
)
def test_cli_bad_input_exits_2_with_the_reason(compressed_dir, args, message, capsys):
    assert main(["--quiet", "eval", "glue", "--model", str(compressed_dir), *args]) == 2
    assert message in capsys.readouterr().err


def test_predictions_are_independent_of_batch_size(compressed_dir, tiny_glue_dir):
    from hfcompress.glue import get_task, predict

    model, tokenizer = load_glue_model(compressed_dir, "rte")
    encoded = tokenize_glue(load_glue("rte", "validation", tiny_glue_dir), tokenizer)
    task = get_task("rte")
    assert np.array_equal(
        predict(model, tokenizer, encoded, task=task, batch_size=1),
        predict(model, tokenizer, encoded, task=task, batch_size=7),
    )
