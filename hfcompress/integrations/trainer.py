"""The one adapter to transformers' ``Trainer``: training arguments with our defaults, and the
``DistillationTrainer`` that adds a teacher and the PKD loss.

The loss itself lives in :mod:`hfcompress.techniques.pkd.loss` as plain functions; this module
only runs the two models and feeds those functions, so an upstream ``Trainer`` change touches
this file alone.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from hfcompress.techniques.pkd.loss import (
    distillation_loss,
    kd_loss,
    patient_loss,
    regression_kd_loss,
    task_loss,
)

__all__ = ["DistillationTrainer", "make_trainer", "training_arguments"]

logger = logging.getLogger(__name__)


def training_arguments(
    output_dir: str | os.PathLike,
    *,
    epochs: float = 3.0,
    learning_rate: float = 5e-5,
    batch_size: int = 32,
    seed: int = 42,
    progress: bool = True,
    bf16: bool = False,
    **overrides: Any,
) -> TrainingArguments:
    """``TrainingArguments`` for our fine-tuning and distillation runs: AdamW with weight decay
    0.01, linear decay after a 10% warm-up, length-grouped batches (less padding), no
    checkpoints and no reporting integrations; the CPU when no GPU is present."""
    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir),
        num_train_epochs=epochs,
        learning_rate=learning_rate,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=2 * batch_size,
        weight_decay=0.01,
        warmup_steps=0.1,
        seed=seed,
        data_seed=seed,
        train_sampling_strategy="group_by_length",
        save_strategy="no",
        report_to="none",
        logging_steps=50,
        disable_tqdm=not progress,
        bf16=bf16,
        use_cpu=not torch.cuda.is_available(),
        # Every parameter of a distilled student takes part in the loss; skip DDP's extra search.
        ddp_find_unused_parameters=False,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


class DistillationTrainer(Trainer):
    """A ``Trainer`` whose loss is PKD's: ``(1 - alpha) CE + alpha T^2 KL + beta L_PT``.

    The teacher runs in eval mode without gradients, on the trainer's device; it may be any
    model with the student's output shape, compressed ones included. The terms, unweighted,
    are logged beside the loss as ``ce``, ``kd`` and ``pkd``.

    Args:
        teacher: The teacher model.
        layer_pairs: ``(student_layer, teacher_layer)`` pairs for the patient loss (0-based
            block indices); empty disables it.
        temperature: Softmax temperature T of the KD term.
        alpha: Weight of the KD term (``1 - alpha`` weighs the task loss).
        beta: Weight of the patient loss.
        *args, **kwargs: As for ``Trainer``.
    """

    def __init__(
        self,
        *args: Any,
        teacher: nn.Module,
        layer_pairs: Sequence[tuple[int, int]] = (),
        temperature: float = 5.0,
        alpha: float = 0.5,
        beta: float = 100.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)
        self.layer_pairs = tuple(layer_pairs)
        self.temperature = temperature
        self.alpha = alpha
        self.beta = beta
        # Our loss is a per-batch mean; tell the Trainer not to rescale it by token counts.
        self.model_accepts_loss_kwargs = False
        self._term_sums: dict[str, float] = {}
        self._term_count = 0

    def _is_causal_lm(self, logits: torch.Tensor) -> bool:
        return logits.dim() == 3

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ):
        need_hidden = self.beta > 0 and bool(self.layer_pairs)
        teacher_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        labels = inputs.get("labels")
        # A classifier's task loss is ours, on the labelled rows only (augmented rows carry
        # -100 or NaN); a causal LM keeps its own shifted next-token loss.
        own_task_loss = labels is not None and labels.dim() == 1
        student = model(**(teacher_inputs if own_task_loss else inputs), output_hidden_states=need_hidden)
        with torch.no_grad():
            teacher = self.teacher(**teacher_inputs, output_hidden_states=need_hidden)
        s_logits, t_logits = student.logits, teacher.logits
        causal = self._is_causal_lm(s_logits)
        mask = inputs.get("attention_mask") if causal else None
        if s_logits.shape[-1] == 1 and not causal:
            kd = regression_kd_loss(s_logits, t_logits)
        else:
            kd = kd_loss(s_logits, t_logits, self.temperature, mask=mask)
        if need_hidden:
            # hidden_states[0] is the embedding output; block i's output is hidden_states[i + 1].
            pkd = patient_loss(
                [student.hidden_states[s + 1] for s, _ in self.layer_pairs],
                [teacher.hidden_states[t + 1] for _, t in self.layer_pairs],
                cls_only=not causal,
                mask=mask,
            )
        else:
            pkd = s_logits.new_zeros(())
        if own_task_loss:
            ce = task_loss(s_logits, labels)
        else:
            ce = student.loss if student.loss is not None else s_logits.new_zeros(())
        loss = distillation_loss(ce, kd, pkd, alpha=self.alpha, beta=self.beta)
        for name in ("ce", "kd", "pkd"):
            self._term_sums[name] = self._term_sums.get(name, 0.0) + float(getattr(loss, name).detach())
        self._term_count += 1
        return (loss.total, student) if return_outputs else loss.total

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._term_count:
            logs.update({k: round(v / self._term_count, 6) for k, v in self._term_sums.items()})
            self._term_sums, self._term_count = {}, 0
        super().log(logs, start_time)


def _collator(model: nn.Module, tokenizer: Any):
    from transformers import DataCollatorForLanguageModeling, DataCollatorWithPadding

    if tokenizer is None:
        from transformers import default_data_collator

        return default_data_collator
    if getattr(model.config, "is_decoder", False) or type(model).__name__.endswith("ForCausalLM"):
        return DataCollatorForLanguageModeling(tokenizer, mlm=False)
    return DataCollatorWithPadding(tokenizer)


def make_trainer(
    model: nn.Module,
    train_dataset: Any,
    tokenizer: Any,
    *,
    output_dir: str | os.PathLike,
    teacher: nn.Module | None = None,
    eval_dataset: Any = None,
    layer_pairs: Sequence[tuple[int, int]] = (),
    temperature: float = 5.0,
    alpha: float = 0.5,
    beta: float = 100.0,
    callbacks: Sequence[Any] = (),
    **args: Any,
) -> Trainer:
    """A plain ``Trainer`` (no ``teacher``) or a :class:`DistillationTrainer`, with
    :func:`training_arguments` built from ``args`` and a padding collator (causal LMs: labels
    are the inputs, padding masked)."""
    common = dict(
        model=model,
        args=training_arguments(output_dir, **args),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=_collator(model, tokenizer),
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
    if teacher is None:
        return Trainer(**common)
    return DistillationTrainer(
        **common, teacher=teacher, layer_pairs=layer_pairs, temperature=temperature, alpha=alpha, beta=beta
    )
