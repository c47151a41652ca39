"""The one adapter to transformers' ``Trainer``: training arguments with our defaults, the
``DistillationTrainer`` that adds a teacher and the PKD loss, and ``DistillationCallback``
that adds the same to a ``Trainer`` you already have.

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
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from hfcompress.architectures import text_config
from hfcompress.errors import ModelError
from hfcompress.layerwise import bfloat16_or_warn
from hfcompress.techniques.pkd.loss import (
    UNLABELLED,
    distillation_loss,
    kd_loss,
    patient_loss,
    regression_kd_loss,
    task_loss,
)

__all__ = ["DistillationCallback", "DistillationTrainer", "Distiller", "make_trainer", "training_arguments"]

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
    checkpoints and no reporting integrations; the CPU when no GPU is present. ``bf16`` is a
    speed setting: where the training device has no fast bfloat16 matmul (an AVX2-only CPU, or
    one where it is measured slower than float32: ``hfcompress.matmul_speed``) training runs
    in float32 instead, with a warning."""
    if bf16:
        bf16 = bfloat16_or_warn("cuda" if torch.cuda.is_available() else "cpu", "bf16: true", "bf16: false")
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


def _blocks(model: nn.Module) -> int | None:
    """The model's number of blocks (``num_hidden_layers``), or None when it does not say."""
    return getattr(text_config(model), "num_hidden_layers", None)


# Keyword arguments of a student forward that are not model inputs the teacher should see.
_NOT_INPUTS = frozenset({"labels", "num_items_in_batch", "output_hidden_states", "output_attentions", "return_dict"})


class Distiller:
    """The teacher and PKD's loss ``(1 - alpha) CE + alpha T^2 KL + beta L_PT``, shared by
    :class:`DistillationTrainer` and :class:`DistillationCallback` (so both give the same
    numbers). The teacher runs in eval mode without gradients; it may be any model with the
    student's output shape, compressed ones included.

    Args:
        teacher: The teacher model.
        layer_pairs: ``(student_layer, teacher_layer)`` pairs for the patient loss (0-based
            block indices); empty disables it.
        temperature: Softmax temperature T of the KD term.
        alpha: Weight of the KD term (``1 - alpha`` weighs the task loss).
        beta: Weight of the patient loss.
    """

    def __init__(
        self,
        teacher: nn.Module,
        *,
        layer_pairs: Sequence[tuple[int, int]] = (),
        temperature: float = 5.0,
        alpha: float = 0.5,
        beta: float = 100.0,
    ) -> None:
        if temperature <= 0 or not 0 <= alpha <= 1 or beta < 0:
            raise ModelError(
                f"distillation needs temperature > 0, 0 <= alpha <= 1 and beta >= 0; got temperature={temperature}, "
                f"alpha={alpha}, beta={beta}"
            )
        self.teacher = teacher.eval().requires_grad_(False)
        self.layer_pairs = tuple((int(s), int(t)) for s, t in layer_pairs)
        self.temperature = temperature
        self.alpha = alpha
        self.beta = beta
        self._term_sums: dict[str, float] = {}
        self._term_count = 0
        # a negative index would pick a hidden state from the end (-1: the embeddings) silently
        self._check_pairs("teacher", 1, _blocks(teacher))

    def _check_pairs(self, role: str, side: int, blocks: int | None) -> None:
        bad = [p for p in self.layer_pairs if p[side] < 0 or (blocks is not None and p[side] >= blocks)]
        if bad:
            have = f"its blocks are 0..{blocks - 1}" if blocks is not None else "indices start at 0"
            raise ModelError(
                f"layer_pairs {bad} name {role} blocks that do not exist ({have}); pairs are (student_block, "
                "teacher_block), 0-based"
            )

    def check_student(self, student: nn.Module) -> None:
        """A :class:`ModelError` before training when the patient loss cannot pair ``student``
        with the teacher: a pair naming a block the student lacks, or hidden states of
        different widths (PKD compares them without a projection)."""
        self._check_pairs("student", 0, _blocks(student))
        if not self.needs_hidden_states:
            return
        widths = [getattr(text_config(m), "hidden_size", None) for m in (student, self.teacher)]
        if None not in widths and widths[0] != widths[1]:
            raise ModelError(
                f"the patient loss compares hidden states, but the student's are {widths[0]} wide and the teacher's "
                f"{widths[1]}; distil into a student of the teacher's width, or pass beta=0 (no patient loss)"
            )

    @property
    def needs_hidden_states(self) -> bool:
        return self.beta > 0 and bool(self.layer_pairs)

    def to(self, device: torch.device | str) -> Distiller:
        self.teacher.to(device)
        return self

    def loss(self, student: Any, inputs: dict[str, Any], labels: torch.Tensor | None) -> torch.Tensor:
        """The total loss of a student output on ``inputs`` (without labels); the terms are
        accumulated for :meth:`pop_terms`.

        A classifier's task loss is computed here on the labelled rows only (augmented rows
        carry -100 or NaN); a causal LM's is the shifted next-token cross-entropy over labels
        other than -100, as the model's own loss.
        """
        need_hidden = self.needs_hidden_states
        teacher_inputs = {k: v for k, v in inputs.items() if k not in _NOT_INPUTS}
        with torch.no_grad():
            teacher = self.teacher(**teacher_inputs, output_hidden_states=need_hidden)
        s_logits, t_logits = student.logits, teacher.logits
        causal = s_logits.dim() == 3
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
        if labels is None:
            ce = s_logits.new_zeros(())
        elif causal:
            ce = F.cross_entropy(
                s_logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=UNLABELLED
            )
        else:
            ce = task_loss(s_logits, labels)
        loss = distillation_loss(ce, kd, pkd, alpha=self.alpha, beta=self.beta)
        for name in ("ce", "kd", "pkd"):
            self._term_sums[name] = self._term_sums.get(name, 0.0) + float(getattr(loss, name).detach())
        self._term_count += 1
        return loss.total

    def pop_terms(self) -> dict[str, float]:
        """The mean of each unweighted term since the last call (logged as ce, kd, pkd)."""
        if not self._term_count:
            return {}
        terms = {k: round(v / self._term_count, 6) for k, v in self._term_sums.items()}
        self._term_sums, self._term_count = {}, 0
        return terms


class DistillationTrainer(Trainer):
    """A ``Trainer`` whose loss is PKD's (see :class:`Distiller`); the terms, unweighted, are
    logged beside the loss as ``ce``, ``kd`` and ``pkd``. To keep your own ``Trainer`` (or
    subclass) instead, use :class:`DistillationCallback`.

    Args:
        teacher, layer_pairs, temperature, alpha, beta: As for :class:`Distiller`.
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
        self.distiller = Distiller(
            teacher, layer_pairs=layer_pairs, temperature=temperature, alpha=alpha, beta=beta
        ).to(self.args.device)
        self.distiller.check_student(self.model)
        self.teacher = self.distiller.teacher
        # Our loss is a per-batch mean; tell the Trainer not to rescale it by token counts.
        self.model_accepts_loss_kwargs = False

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ):
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        student = model(**model_inputs, output_hidden_states=self.distiller.needs_hidden_states)
        loss = self.distiller.loss(student, model_inputs, inputs.get("labels"))
        return (loss, student) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs.update(self.distiller.pop_terms())
        super().log(logs, start_time)


class DistillationCallback(TrainerCallback):
    """Distillation for a ``Trainer`` you already have: pass the callback and its
    :meth:`compute_loss_func` to your (unmodified) ``Trainer``::

        distill = DistillationCallback(teacher, layer_pairs=[(0, 1), (1, 3), (2, 5)], alpha=0.7, beta=100)
        trainer = Trainer(model=student, args=args, train_dataset=train,
                          callbacks=[distill], compute_loss_func=distill.compute_loss_func)

    The loss is :class:`Distiller`'s, computed exactly as :class:`DistillationTrainer` does
    (same seed, same loss curve). ``compute_loss_func`` sees only the student's outputs and
    the labels, so while training the callback keeps a forward pre-hook on the student that
    records its inputs (for the teacher) and asks for hidden states when the patient loss
    needs them; the hook is removed when training ends. The terms are logged as ``ce``,
    ``kd`` and ``pkd``.

    Args:
        teacher: The teacher model.
        **loss_args: ``layer_pairs``, ``temperature``, ``alpha``, ``beta``: as for
            :class:`Distiller` (and with its defaults).
    """

    def __init__(self, teacher: nn.Module, **loss_args: Any) -> None:
        self.distiller = Distiller(teacher, **loss_args)
        self._inputs: dict[str, Any] | None = None
        self._hook: Any = None
        self._accumulation = 1

    def _record_inputs(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        if args:
            raise TypeError("DistillationCallback expects the Trainer to call the student with keyword inputs")
        self._inputs = dict(kwargs)
        if self.distiller.needs_hidden_states:
            kwargs = {**kwargs, "output_hidden_states": True}
        return args, kwargs

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("DistillationCallback needs the Trainer's model")
        self.distiller.check_student(model)
        self.distiller.to(args.device)
        self._accumulation = args.gradient_accumulation_steps
        self._hook = model.register_forward_pre_hook(self._record_inputs, with_kwargs=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def compute_loss_func(self, outputs: Any, labels: torch.Tensor | None, num_items_in_batch: Any = None):
        """The ``Trainer``'s ``compute_loss_func``: the distillation loss of the batch the
        student just ran on. A ``Trainer`` does not divide a custom loss by the gradient
        accumulation steps, so it is divided here (the per-batch mean, as
        ``DistillationTrainer``'s)."""
        if self._inputs is None:
            raise RuntimeError(
                "DistillationCallback.compute_loss_func ran before the student's forward was recorded: pass the "
                "callback in the Trainer's callbacks too"
            )
        return self.distiller.loss(outputs, self._inputs, labels) / self._accumulation

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:
            terms = self.distiller.pop_terms()
            logs.update(terms)
            if state.log_history:
                state.log_history[-1].update(terms)


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
