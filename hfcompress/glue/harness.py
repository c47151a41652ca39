"""Score any sequence-classification model on GLUE, and fine-tune one per task.

``evaluate_glue`` runs a model over a dev split and returns the official metrics;
``finetune_glue`` trains a model on a task's training split through the ``Trainer``;
``markdown_table`` puts several models side by side with the score each keeps of the first's.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hfcompress.errors import EvaluationError
from hfcompress.glue.data import load_glue
from hfcompress.glue.metrics import glue_metrics
from hfcompress.glue.tasks import GlueDataError, GlueTask, class_order, eval_splits, get_task
from hfcompress.modes import evaluating

__all__ = [
    "GlueResult",
    "evaluate_glue",
    "finetune_glue",
    "labels_in_model_order",
    "load_glue_model",
    "markdown_table",
    "predict",
    "tokenize_glue",
    "write_results",
]

logger = logging.getLogger(__name__)


@dataclass
class GlueResult:
    """One model's scores on one dev split.

    Attributes:
        task: Result label: the task name, or ``mnli-m`` / ``mnli-mm``.
        metrics: The official metrics (fractions), keyed as the ``evaluate`` GLUE metric.
        main_metric: The key of the task's headline metric.
        num_examples: Examples scored.
        seconds: Wall time of the scoring pass.
    """

    task: str
    metrics: dict[str, float]
    main_metric: str
    num_examples: int
    seconds: float = 0.0

    @property
    def main(self) -> float:
        return self.metrics[self.main_metric]


def tokenize_glue(dataset, tokenizer, *, max_length: int = 128):
    """Tokenize a :func:`load_glue` dataset into ``input_ids``, ``attention_mask`` (and
    ``token_type_ids`` when the tokenizer makes them) plus ``labels``; pairs are truncated
    longest-first to ``max_length`` tokens. Padding is left to the collator."""

    def encode(batch: dict[str, list]) -> dict[str, list]:
        args = (batch["text_a"], batch["text_b"]) if "text_b" in batch else (batch["text_a"],)
        out = tokenizer(*args, truncation=True, max_length=max_length)
        out["labels"] = batch["label"]
        return out

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="tokenize")


def labels_in_model_order(dataset, model: nn.Module, task: GlueTask | str):
    """A :func:`tokenize_glue` dataset whose ``labels`` are the model's class ids: the task's ids
    mapped by name when the model's ``id2label`` orders the classes otherwise (see
    :func:`~hfcompress.glue.tasks.class_order`), so training keeps the head's meaning; unlabelled
    rows (negative labels) and other models' datasets are returned as they are."""
    task = get_task(task) if isinstance(task, str) else task
    order = class_order(getattr(getattr(model, "config", None), "id2label", None), task)
    if order is None:
        return dataset
    to_model = np.argsort(order)  # task id -> model id

    def relabel(batch: dict[str, list]) -> dict[str, list]:
        return {"labels": [int(to_model[y]) if y >= 0 else y for y in batch["labels"]]}

    return dataset.map(relabel, batched=True, desc="labels in the model's class order")


def load_glue_model(
    name_or_path: str | os.PathLike,
    task: GlueTask | str,
    *,
    strict: bool = False,
    verify: bool | None = None,
    **kwargs: Any,
):
    """Load a sequence-classification model (and its tokenizer) for ``task``.

    A model without a classification head (a base encoder) gets a new one with the task's
    number of labels; a saved classifier whose head does not fit the task is refused, and so
    is a causal LM. ``strict`` and ``verify`` are :func:`hfcompress.models.load_model`'s.
    """
    from transformers import AutoConfig

    from hfcompress.models import load_model, load_tokenizer, resolve_model_path

    task = get_task(task) if isinstance(task, str) else task
    path = resolve_model_path(name_or_path)
    config = AutoConfig.from_pretrained(path)
    architectures = config.architectures or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        raise GlueDataError(
            f"{name_or_path} is a causal LM ({architectures[0]}); the GLUE harness scores encoder classifiers "
            "(BERT-style models such as minilm-l6). Score a causal LM with `hfcompress eval ppl`"
        )
    is_classifier = any(a.endswith("ForSequenceClassification") for a in architectures)
    if is_classifier and config.num_labels != task.num_labels:
        raise GlueDataError(
            f"{name_or_path} is a classifier with num_labels={config.num_labels}, but GLUE {task.name} needs "
            f"{task.num_labels}; fine-tune a model for {task.name} first (--finetune)"
        )
    if not is_classifier:
        kwargs.setdefault("num_labels", task.num_labels)
        if task.is_regression:
            kwargs.setdefault("problem_type", "regression")
        if task.class_names and "id2label" not in kwargs:  # the new head's classes, named as the dataset's
            kwargs["id2label"] = dict(enumerate(task.class_names))
            kwargs["label2id"] = {name: i for i, name in enumerate(task.class_names)}
    model = load_model(path, task="sequence-classification", strict=strict, verify=verify, **kwargs)
    return model, load_tokenizer(path)


def _collator(tokenizer):
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer)


@torch.no_grad()
def predict(model: nn.Module, tokenizer, dataset, *, task: GlueTask, batch_size: int = 64) -> np.ndarray:
    """Predictions ``[N]`` of ``model`` on a :func:`tokenize_glue` dataset: class ids, or the
    regression output for STS-B. Batches are sorted by length so little padding is computed."""
    device = next(model.parameters()).device
    lengths = np.array([len(ids) for ids in dataset["input_ids"]])
    order = np.argsort(lengths, kind="stable")
    collate = _collator(tokenizer)
    columns = [c for c in dataset.column_names if c != "labels"]
    out = np.empty(len(dataset), dtype=np.float64 if task.is_regression else np.int64)
    with evaluating(model):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = collate([{c: dataset[int(i)][c] for c in columns} for i in idx])
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float()
            bad = ~logits.isfinite().all(dim=-1)
            if bad.any():
                first = int(idx[bad.cpu().numpy()].min())
                raise EvaluationError(
                    f"the model's output is NaN or Inf on {task.name} dev example {first}; its weights or compute "
                    "dtype overflow there, so no score is reported"
                )
            out[idx] = logits[:, 0].cpu().numpy() if task.is_regression else logits.argmax(-1).cpu().numpy()
    return out


def evaluate_glue(
    model: nn.Module,
    tokenizer,
    task: GlueTask | str,
    *,
    source: str | os.PathLike | None = None,
    batch_size: int = 64,
    max_length: int = 128,
    limit: int | None = None,
) -> list[GlueResult]:
    """Score ``model`` on the task's dev split(s) (two for MNLI), with the official metrics.

    Args:
        model: A sequence-classification model whose head fits the task.
        tokenizer: Its tokenizer.
        task: A GLUE task or its name.
        source: Where the data comes from (see :mod:`hfcompress.glue.data`).
        batch_size: Examples per forward pass.
        max_length: Tokens kept per example (pairs truncated longest-first).
        limit: Score only the first ``limit`` dev examples (quick checks).
    """
    task = get_task(task) if isinstance(task, str) else task
    num_labels = getattr(getattr(model, "config", None), "num_labels", task.num_labels)
    if num_labels != task.num_labels:
        raise GlueDataError(f"the model has num_labels={num_labels}; GLUE {task.name} needs {task.num_labels}")
    order = class_order(getattr(getattr(model, "config", None), "id2label", None), task)
    if order is not None:
        names = model.config.id2label
        logger.info(
            "the model's classes are %s; GLUE %s's order is %s: its predictions are mapped by name",
            [names[i] for i in range(task.num_labels)],
            task.name,
            list(task.class_names),
        )
    results = []
    for label, split in eval_splits(task):
        data = load_glue(task, split, source, limit=limit)
        encoded = tokenize_glue(data, tokenizer, max_length=max_length)
        start = time.perf_counter()
        predictions = predict(model, tokenizer, encoded, task=task, batch_size=batch_size)
        seconds = time.perf_counter() - start
        if order is not None:
            predictions = order[predictions]  # the model's class ids as the task's
        metrics = glue_metrics(task, predictions, np.asarray(data["label"]))
        results.append(GlueResult(label, metrics, task.main_metric, len(data), seconds))
        logger.info("GLUE %s: %s", label, metrics)
    return results


def finetune_glue(
    model: nn.Module,
    tokenizer,
    task: GlueTask | str,
    *,
    output_dir: str | os.PathLike,
    source: str | os.PathLike | None = None,
    epochs: float = 3.0,
    learning_rate: float = 5e-5,
    batch_size: int = 32,
    max_length: int = 128,
    seed: int = 42,
    limit: int | None = None,
    progress: bool = True,
    bf16: bool = False,
) -> nn.Module:
    """Fine-tune ``model`` on the task's training split with the ``Trainer`` (AdamW, linear
    decay after 10% warm-up, length-grouped batches) and return it; nothing is saved unless
    the caller saves it. ``output_dir`` receives the Trainer's scratch files only."""
    from hfcompress.integrations.trainer import make_trainer

    task = get_task(task) if isinstance(task, str) else task
    train = tokenize_glue(load_glue(task, "train", source, limit=limit), tokenizer, max_length=max_length)
    train = labels_in_model_order(train, model, task)
    trainer = make_trainer(
        model,
        train,
        tokenizer,
        output_dir=output_dir,
        epochs=epochs,
        learning_rate=learning_rate,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
        bf16=bf16,
    )
    trainer.train()
    return trainer.model


def _fmt(value: float) -> str:
    return f"{100 * value:.1f}"


def markdown_table(results: dict[str, list[GlueResult]], *, baseline: str | None = None) -> str:
    """A markdown table: one row per model, one column per task (its headline metric, x100;
    MRPC shows F1/accuracy and STS-B Pearson/Spearman), the average of the headline metrics,
    and the percentage of the baseline's average each model keeps (baseline: the first model).
    """
    if not results:
        raise ValueError("no results to tabulate")
    baseline = baseline or next(iter(results))
    tasks: list[str] = []
    for rows in results.values():
        tasks += [r.task for r in rows if r.task not in tasks]
    header = ["model", *tasks, "avg", f"% of {baseline}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    averages = {}
    for model, rows in results.items():
        by_task = {r.task: r for r in rows}
        if all(t in by_task for t in tasks):
            averages[model] = float(np.mean([by_task[t].main for t in tasks]))
    for model, rows in results.items():
        by_task = {r.task: r for r in rows}
        cells = [model]
        for t in tasks:
            r = by_task.get(t)
            if r is None:
                cells.append("–")
            elif len(r.metrics) == 2:
                others = [v for k, v in r.metrics.items() if k != r.main_metric]
                cells.append("/".join(_fmt(v) for v in (r.main, *others)))
            else:
                cells.append(_fmt(r.main))
        avg = averages.get(model)
        base = averages.get(baseline)
        cells.append(_fmt(avg) if avg is not None else "–")
        cells.append(f"{100 * avg / base:.1f}%" if avg is not None and base else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(results: dict[str, list[GlueResult]], path: str | os.PathLike) -> Path:
    """Write ``{model: {task: GlueResult as dict}}`` as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {model: {r.task: asdict(r) for r in rows} for model, rows in results.items()}
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)  # a crash mid-write leaves the old file, never half a JSON
    return path
