"""PKD through the Trainer on tiny models: every term pulls the student toward the teacher;
compress() runs the stage; `accelerate launch` runs it on two CPU processes."""

from __future__ import annotations

import copy
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hfcompress
from hfcompress.glue import load_glue, load_glue_model, tokenize_glue
from hfcompress.integrations.trainer import DistillationTrainer, make_trainer
from hfcompress.techniques.pkd.loss import kd_loss, patient_loss, regression_kd_loss
from tests.conftest import make_char_tokenizer, make_tiny_bert, make_tiny_llama, save_tiny_bert_classifier

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def bert_setup(tmp_path, tiny_glue_dir):
    teacher, tokenizer = load_glue_model(save_tiny_bert_classifier(tmp_path / "teacher", seed=1, layers=4), "sst2")
    with torch.no_grad():  # a random head is near-uniform; a teacher must have opinions to teach
        teacher.classifier.weight.mul_(300)
    train = tokenize_glue(load_glue("sst2", "train", tiny_glue_dir), tokenizer)
    return teacher.eval(), tokenizer, train


def _student(teacher, seed: int = 5):
    """A 2-layer student from another random draw (far from the teacher, so every term has room
    to fall), without dropout so a few steps give a clean signal."""
    student = hfcompress.drop_layers(make_tiny_bert(seed, layers=4, num_labels=2, vocab=128), (1, 3))
    for module in student.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return student


def _terms(student, teacher, batch, pairs, temperature, cls_only=True):
    """(ce, kd, pkd) of the student on one fixed batch, without gradients."""
    student.eval()
    with torch.no_grad():
        s = student(**batch, output_hidden_states=True)
        t = teacher(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True)
    mask = None if cls_only else batch["attention_mask"]
    if s.logits.shape[-1] == 1:  # a regressor (STS-B): its KD term is the squared difference
        kd = regression_kd_loss(s.logits, t.logits).item()
    else:
        kd = kd_loss(s.logits, t.logits, temperature, mask=mask).item()
    pkd = patient_loss(
        [s.hidden_states[i + 1] for i, _ in pairs],
        [t.hidden_states[j + 1] for _, j in pairs],
        cls_only=cls_only,
        mask=mask,
    ).item()
    return s.loss.item(), kd, pkd


def _distil(student, teacher, train, tokenizer, tmp_path, pairs, **weights):
    trainer = make_trainer(
        student,
        train,
        tokenizer,
        output_dir=tmp_path / "trainer",
        teacher=teacher,
        layer_pairs=pairs,
        epochs=6,
        learning_rate=1e-3,
        batch_size=8,
        progress=False,
        **weights,
    )
    assert isinstance(trainer, DistillationTrainer)
    trainer.train()
    return trainer


@pytest.mark.parametrize(
    ("alpha", "beta", "falls"),
    [(1.0, 0.0, "kd"), (0.0, 100.0, "pkd"), (0.5, 10.0, "kd+pkd")],
    ids=["kd-only", "pkd-only", "full-loss"],
)
def test_each_term_moves_the_student_toward_the_teacher(bert_setup, tmp_path, alpha, beta, falls):
    teacher, tokenizer, train = bert_setup
    pairs = [(0, 1)]
    student = _student(teacher)
    trainer = make_trainer(student, train, tokenizer, output_dir=tmp_path / "probe", progress=False)
    batch = trainer.data_collator([train[i] for i in range(16)])
    before = _terms(student, teacher, batch, pairs, 5.0)
    _distil(student, teacher, train, tokenizer, tmp_path, pairs, alpha=alpha, beta=beta, temperature=5.0)
    after = _terms(student, teacher, batch, pairs, 5.0)
    names = ("ce", "kd", "pkd")
    for name in falls.split("+"):
        i = names.index(name)
        assert after[i] < before[i], f"{name}: {before[i]:.4f} -> {after[i]:.4f}"
    for p in teacher.parameters():
        assert p.grad is None  # the teacher never trains


def test_a_compressed_teacher_teaches(bert_setup, tmp_path):
    teacher, tokenizer, train = bert_setup
    student = _student(teacher)
    quantized = copy.deepcopy(teacher)
    hfcompress.compress(quantized, hfcompress.Recipe([hfcompress.RTNConfig(bits=4, group_size=32)]), progress=False)
    batch = make_trainer(student, train, tokenizer, output_dir=tmp_path / "p", progress=False).data_collator(
        [train[i] for i in range(16)]
    )
    before = _terms(student, quantized, batch, [(0, 1)], 5.0)
    _distil(student, quantized, train, tokenizer, tmp_path, [(0, 1)], alpha=0.7, beta=10.0)
    after = _terms(student, quantized, batch, [(0, 1)], 5.0)
    assert after[1] < before[1] and after[2] < before[2]


def test_causal_lm_student_learns_token_states(tmp_path):
    from datasets import Dataset

    tokenizer = make_char_tokenizer()
    tokenizer.pad_token = "<unk>"
    teacher = make_tiny_llama(3, tie=False, layers=4)
    with torch.no_grad():  # sharpen the random teacher's next-token distributions
        teacher.lm_head.weight.mul_(30)
    texts = [f"the {w} sat on the mat number {i}." for i, w in enumerate(["cat", "dog", "owl", "fox"] * 8)]
    train = Dataset.from_dict(dict(tokenizer(texts)))
    student = hfcompress.drop_layers(make_tiny_llama(7, tie=False, layers=4), (1, 3))
    trainer = make_trainer(student, train, tokenizer, output_dir=tmp_path / "p", progress=False)
    batch = trainer.data_collator([train[i] for i in range(8)])
    before = _terms(student, teacher, batch, [(0, 1)], 2.0, cls_only=False)
    _distil(student, teacher, train, tokenizer, tmp_path, [(0, 1)], alpha=0.8, beta=10.0, temperature=2.0)
    after = _terms(student, teacher, batch, [(0, 1)], 2.0, cls_only=False)
    assert after[1] < before[1] and after[2] < before[2]


def _pkd_recipe(**overrides):
    fields = dict(num_layers=2, epochs=1, batch_size=8, learning_rate=1e-3) | overrides
    return hfcompress.Recipe([hfcompress.PKDConfig(**fields)])


def test_compress_runs_the_stage_then_quantizes(bert_setup, tmp_path):
    model, tokenizer, train = bert_setup
    recipe = hfcompress.Recipe.from_yaml_str(
        "stages:\n"
        "  - {technique: pkd, strategy: last, num_layers: 2, epochs: 1, batch_size: 8}\n"
        "  - {technique: rtn, bits: 4, group_size: 32, ignore: [classifier]}\n"
    )
    hfcompress.compress(model, recipe, train_dataset=train, tokenizer=tokenizer, progress=False)
    assert model.config.num_hidden_layers == 2 and len(model.bert.encoder.layer) == 2
    assert model.config.hfcompress_layer_map == {"teacher_layers": [2, 3], "num_teacher_layers": 4}
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, hfcompress.QuantLinear)
    out = hfcompress.save_pretrained(model, tmp_path / "student", tokenizer=tokenizer)
    reloaded, _ = load_glue_model(out, "sst2")
    ids = tokenizer(["good good fun"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(reloaded(**ids).logits, model(**ids).logits)


def test_a_killed_distillation_resumes_from_its_training_checkpoint(bert_setup, tmp_path, monkeypatch, caplog):
    # The PKD stage trained in a temporary folder without checkpoints, whatever checkpoint_dir
    # said: a run killed after hours of training started again from step 0.
    from tests.conftest import killed_run

    teacher, tokenizer, train = bert_setup  # 48 rows: 6 steps of 8 per epoch, 12 in all
    recipe = _pkd_recipe(epochs=2, checkpoint_steps=4)

    def run(**kwargs):
        model = copy.deepcopy(teacher)
        hfcompress.compress(model, recipe, train_dataset=train, tokenizer=tokenizer, progress=False, **kwargs)
        return model.state_dict()

    expected = run()
    killed_run(monkeypatch, DistillationTrainer, "training_step", 9, lambda: run(checkpoint_dir=tmp_path / "ck"))
    assert sorted(p.name for p in (tmp_path / "ck" / "stage_0").glob("checkpoint-*")) == ["checkpoint-8"]
    # a checkpoint a kill cut short (no trainer_state.json, written last) is not resumed from
    partial = tmp_path / "ck" / "stage_0" / "checkpoint-12"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\0" * 64)
    steps = []
    real_step = DistillationTrainer.training_step
    monkeypatch.setattr(DistillationTrainer, "training_step", lambda *a, **k: steps.append(1) or real_step(*a, **k))
    with caplog.at_level("INFO", logger="hfcompress.techniques.pkd.modifier"):
        got = run(checkpoint_dir=tmp_path / "ck")
    assert "resuming the training from" in caplog.text and "checkpoint-8" in caplog.text
    assert f"removing {partial}, a training checkpoint cut short by a kill" in caplog.text
    assert len(steps) == 4  # steps 9-12, not 12 from the start
    # Not bit for bit: the Trainer draws the rest of a length-grouped epoch anew on resume.
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=2e-3)
    # a folder of another run (other training data) is refused, naming what differs
    with pytest.raises(hfcompress.CheckpointError, match="other calibration \\(or training\\) data"):
        hfcompress.compress(
            copy.deepcopy(teacher),
            recipe,
            train_dataset=train.select(range(40)),
            tokenizer=tokenizer,
            progress=False,
            checkpoint_dir=tmp_path / "ck",
        )


def test_compress_without_training_set_is_refused(bert_setup):
    model = bert_setup[0]
    with pytest.raises(hfcompress.TrainingDataError, match="needs a training set; pass train_dataset="):
        hfcompress.compress(model, _pkd_recipe())
    assert model.config.num_hidden_layers == 4  # untouched


def test_untokenized_training_set_is_refused(bert_setup, tiny_glue_dir):
    model = bert_setup[0]
    raw = load_glue("sst2", "train", tiny_glue_dir)
    with pytest.raises(hfcompress.RecipeError, match="no 'input_ids' column; tokenize it first"):
        hfcompress.compress(model, _pkd_recipe(), train_dataset=raw)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(strategy="explicit", num_layers=None, layers=(1, 7)), r"layers \[7\] do not exist in the teacher"),
        (dict(num_layers=5), "a student of 5 layers from a teacher of 4"),
    ],
    ids=["missing-layer", "more-layers"],
)
def test_bad_mapping_fails_before_training(bert_setup, overrides, message):
    model, _, train = bert_setup
    with pytest.raises(hfcompress.RecipeError, match=message):
        hfcompress.compress(model, _pkd_recipe(**overrides), train_dataset=train)
    assert model.config.num_hidden_layers == 4


def test_quantized_model_cannot_be_distilled(bert_setup):
    model, _, train = bert_setup
    hfcompress.compress(model, hfcompress.Recipe([hfcompress.RTNConfig(bits=4, group_size=32)]), progress=False)
    with pytest.raises(hfcompress.RecipeError, match="is already compressed"):
        hfcompress.compress(model, _pkd_recipe(), train_dataset=train)


@pytest.mark.skipif(
    shutil.which("accelerate", path=os.path.dirname(sys.executable)) is None, reason="no accelerate CLI"
)
def test_accelerate_launch_two_cpu_processes(tmp_path, tiny_glue_dir):
    teacher = save_tiny_bert_classifier(tmp_path / "teacher", seed=1, layers=4)
    recipe = tmp_path / "pkd.yaml"
    recipe.write_text("stages:\n  - {technique: pkd, num_layers: 2, epochs: 2, batch_size: 8, learning_rate: 0.001}\n")
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            accelerate,
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "hfcompress.cli",
            "distill",
            "--teacher",
            str(teacher),
            "--task",
            "rte",
            "--recipe",
            str(recipe),
            "--output",
            str(tmp_path / "student"),
            "--data-dir",
            str(tiny_glue_dir),
            "--checkpoint-dir",
            str(tmp_path / "ck"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "distilling on 2 process(es), backend gloo" in result.stderr
    student, _ = load_glue_model(tmp_path / "student", "rte")
    assert student.config.num_hidden_layers == 2
    assert student.config.hfcompress_layer_map["teacher_layers"] == [1, 3]
    # the Trainer's checkpoint at the last step, written once by the main process
    (checkpoint,) = (tmp_path / "ck" / "stage_0").glob("checkpoint-*")
    assert (checkpoint / "trainer_state.json").is_file() and (checkpoint / "optimizer.pt").is_file()


@pytest.mark.parametrize("task", ["sst2", "stsb"])
def test_unlabelled_rows_train_through_the_distillation_terms(tmp_path, tiny_glue_dir, task):
    """Rows labelled -100 (classes) or NaN (scores), as augment_glue writes them, add no task
    loss but do pull the student toward the teacher; the loss never turns NaN."""
    from hfcompress.glue import UNLABELLED

    num_labels = 1 if task == "stsb" else 2
    if task == "stsb":  # scores that follow the words, like the tiny SST-2's labels
        (tiny_glue_dir / "STS-B").mkdir()
        head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
        rows = [
            f"{i}\tg\tf\ty\t{i}\ts\ts\tit is {w}.\tit was {w}.\t{4.5 if w == 'good' else 0.5}"
            for i, w in enumerate(["good", "bad", "bad", "good"] * 12)
        ]
        (tiny_glue_dir / "STS-B" / "train.tsv").write_text("\n".join([head, *rows]) + "\n")
    path = save_tiny_bert_classifier(tmp_path / "teacher", seed=1, layers=4, num_labels=num_labels)
    teacher, tokenizer = load_glue_model(path, task)
    with torch.no_grad():
        teacher.classifier.weight.mul_(300)
    teacher.eval()
    raw = load_glue(task, "train", tiny_glue_dir)
    blank = float("nan") if task == "stsb" else UNLABELLED
    # Every row but the first two loses its label.
    raw = raw.map(lambda row, i: {"label": row["label"] if i < 2 else blank}, with_indices=True)
    train = tokenize_glue(raw, tokenizer)
    student = hfcompress.drop_layers(make_tiny_bert(5, layers=4, num_labels=num_labels, vocab=128), (1, 3))
    labelled = tokenize_glue(load_glue(task, "train", tiny_glue_dir), tokenizer)
    batch = make_trainer(student, labelled, tokenizer, output_dir=tmp_path / "p", progress=False).data_collator(
        [labelled[i] for i in range(8)]
    )
    before = _terms(student, teacher, batch, [(0, 1)], 5.0)
    trainer = _distil(student, teacher, train, tokenizer, tmp_path, [(0, 1)], alpha=0.5, beta=10.0, temperature=5.0)
    after = _terms(student, teacher, batch, [(0, 1)], 5.0)
    losses = [log["train_loss"] for log in trainer.state.log_history if "train_loss" in log]
    assert losses and all(math.isfinite(v) for v in losses)
    assert after[1] < before[1] and after[2] < before[2]
