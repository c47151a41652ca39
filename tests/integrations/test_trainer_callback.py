"""A vanilla transformers Trainer plus DistillationCallback trains exactly as DistillationTrainer."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Trainer

import hfcompress
from hfcompress.glue import load_glue, load_glue_model, tokenize_glue
from hfcompress.integrations.trainer import (
    DistillationCallback,
    DistillationTrainer,
    _collator,
    training_arguments,
)
from tests.conftest import make_char_tokenizer, make_tiny_llama, save_tiny_bert_classifier

WEIGHTS = {"layer_pairs": [(0, 1), (1, 3)], "temperature": 5.0, "alpha": 0.7, "beta": 100.0}


def _args(tmp_path, name, accumulation=1):
    return training_arguments(
        tmp_path / name,
        epochs=1,
        learning_rate=1e-3,
        batch_size=4,
        seed=7,
        progress=False,
        max_steps=10,
        logging_steps=1,
        gradient_accumulation_steps=accumulation,
    )


def _with_callback(student, callback, train, tokenizer, args) -> Trainer:
    """An unmodified ``Trainer`` distilling through ``callback``, as its docstring shows."""
    return Trainer(
        model=student,
        args=args,
        train_dataset=train,
        data_collator=_collator(student, tokenizer),
        callbacks=[callback],
        compute_loss_func=callback.compute_loss_func,
    )


def _both(student, teacher, train, tokenizer, tmp_path, accumulation=1, **weights):
    """Loss curves and final weights of DistillationTrainer and of Trainer + callback, from
    the same student copy and seed (dropout left on: the random streams must match too)."""
    ours = DistillationTrainer(
        model=copy.deepcopy(student),
        args=_args(tmp_path, "trainer", accumulation),
        train_dataset=train,
        data_collator=_collator(student, tokenizer),
        teacher=teacher,
        **weights,
    )
    ours.train()
    callback = DistillationCallback(teacher, **weights)
    vanilla = _with_callback(
        copy.deepcopy(student), callback, train, tokenizer, _args(tmp_path, "vanilla", accumulation)
    )
    vanilla.train()
    curves = [[e for e in t.state.log_history if "loss" in e] for t in (ours, vanilla)]
    assert len(curves[0]) == len(curves[1]) == 10
    return curves, ours.model, vanilla.model


def _assert_same(curves, a, b):
    for x, y in zip(*curves, strict=True):
        for key in ("loss", "ce", "kd", "pkd"):
            assert abs(x[key] - y[key]) <= 1e-6, (key, x, y)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)


@pytest.fixture
def classifier_setup(tmp_path, tiny_glue_dir):
    teacher, tokenizer = load_glue_model(save_tiny_bert_classifier(tmp_path / "teacher", seed=1, layers=4), "sst2")
    with torch.no_grad():
        teacher.classifier.weight.mul_(300)
    train = tokenize_glue(load_glue("sst2", "train", tiny_glue_dir), tokenizer)
    return teacher.eval(), tokenizer, train


@pytest.mark.parametrize("accumulation", [1, 2], ids=["no-accumulation", "accumulate-2"])
def test_callback_equals_distillation_trainer_on_a_classifier(classifier_setup, tmp_path, accumulation):
    teacher, tokenizer, train = classifier_setup
    student = hfcompress.drop_layers(copy.deepcopy(teacher), (1, 3)).train()
    curves, a, b = _both(student, teacher, train, tokenizer, tmp_path, accumulation, **WEIGHTS)
    _assert_same(curves, a, b)


def test_callback_equals_distillation_trainer_on_a_causal_lm(tmp_path):
    from datasets import Dataset

    teacher = make_tiny_llama(seed=1, layers=4)
    student = hfcompress.drop_layers(make_tiny_llama(seed=2, layers=4), (1, 3)).train()
    rows = torch.randint(2, 128, (24, 16), generator=torch.Generator().manual_seed(0))
    train = Dataset.from_dict({"input_ids": rows.tolist(), "attention_mask": torch.ones_like(rows).tolist()})
    tokenizer = make_char_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    curves, a, b = _both(student, teacher, train, tokenizer, tmp_path, **WEIGHTS)
    _assert_same(curves, a, b)


def test_callback_hook_is_removed_after_training(classifier_setup, tmp_path):
    teacher, tokenizer, train = classifier_setup
    student = hfcompress.drop_layers(copy.deepcopy(teacher), (1, 3))
    callback = DistillationCallback(teacher, **WEIGHTS)
    _with_callback(student, callback, train, tokenizer, _args(tmp_path, "t")).train()
    assert not student._forward_pre_hooks
    ids = torch.tensor([[2, 5, 6]])
    assert student(input_ids=ids).hidden_states is None  # no hidden states asked for after training


def test_compute_loss_func_without_the_callback_is_a_clear_error(classifier_setup):
    teacher, _, _ = classifier_setup
    callback = DistillationCallback(teacher)
    with pytest.raises(RuntimeError, match="pass the callback in the Trainer's callbacks"):
        callback.compute_loss_func(None, None)


def test_layer_pairs_and_weights_that_cannot_work_are_named_before_training(classifier_setup, tmp_path):
    # A pair past the last block failed at the first step with an IndexError; a negative one
    # silently took a hidden state from the end (-1: the embeddings).
    from tests.conftest import make_tiny_bert

    teacher, tokenizer, train = classifier_setup
    blocks = teacher.config.num_hidden_layers
    for pairs in ([(0, blocks)], [(0, -1)]):
        with pytest.raises(hfcompress.ModelError, match=r"name teacher blocks that do not exist"):
            DistillationCallback(teacher, layer_pairs=pairs)
    with pytest.raises(hfcompress.ModelError, match=r"need.*alpha <= 1.*got temperature=5.0, alpha=1.5"):
        DistillationCallback(teacher, alpha=1.5)
    student = hfcompress.drop_layers(copy.deepcopy(teacher), (1, 3))  # 2 blocks
    with pytest.raises(hfcompress.ModelError, match=r"\[\(2, 3\)\] name student blocks .* 0\.\.1"):
        DistillationTrainer(
            model=student, args=_args(tmp_path, "s"), train_dataset=train, teacher=teacher, layer_pairs=[(2, 3)]
        )
    narrow = make_tiny_bert(layers=2, hidden_size=32, num_labels=teacher.config.num_labels)
    trainer = _with_callback(
        narrow, DistillationCallback(teacher, layer_pairs=[(0, 1)]), train, tokenizer, _args(tmp_path, "n")
    )
    with pytest.raises(hfcompress.ModelError, match=r"student's are 32 wide and the teacher's \d+; .* beta=0"):
        trainer.train()


@pytest.mark.real_model
def test_vanilla_trainer_distils_a_3_layer_minilm_like_distillation_trainer(tmp_path, tiny_glue_dir):
    """The issue's check: a 3-layer PKD-Skip MiniLM student, 10 steps, equal within 1e-6."""
    from hfcompress.models import load_model, load_tokenizer

    torch.manual_seed(0)
    teacher = load_model("minilm-l6", task="sequence-classification").eval()
    tokenizer = load_tokenizer("minilm-l6")
    train = tokenize_glue(load_glue("sst2", "train", tiny_glue_dir), tokenizer)
    student = hfcompress.drop_layers(
        copy.deepcopy(teacher), hfcompress.layer_map(6, "skip", num_student_layers=3)
    ).train()
    weights = {"layer_pairs": [(0, 1), (1, 3), (2, 5)], "temperature": 10.0, "alpha": 0.7, "beta": 100.0}
    curves, a, b = _both(student, teacher, train, tokenizer, tmp_path, **weights)
    _assert_same(curves, a, b)
