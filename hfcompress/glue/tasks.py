"""The GLUE tasks: their files in the original layout, their Hub names and their official metrics.

One :class:`GlueTask` per task. ``columns`` says where the text and the label sit in the
original TSV files (by header name, or by position for CoLA, whose files have no header);
``label_names`` gives the order of string labels, the same order as the Hub dataset
``nyu-mll/glue`` uses, so a model fine-tuned on one source scores the same on the other.
``class_names`` names each class id as that dataset does: :func:`class_order` reads a
classifier's ``id2label`` with them, so a Hub model whose classes come in another order
(``roberta-large-mnli``: contradiction, neutral, entailment) is scored right.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from hfcompress.errors import HfCompressError

__all__ = ["GLUE_TASKS", "GlueDataError", "GlueTask", "class_order", "eval_splits", "get_task"]


class GlueDataError(HfCompressError, ValueError):
    """A GLUE task name, data folder or file is unusable."""


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task.

    Attributes:
        name: Canonical name, which is also the config name in ``nyu-mll/glue`` (``"sst2"``).
        folder: Folder name in the original GLUE download (``"SST-2"``).
        text_columns: One or two text columns: header names, or int positions when the
            files have no header.
        hub_text_columns: The same columns as ``nyu-mll/glue`` names them.
        label_column: Label column, by header name or position.
        label_names: String labels in class-id order; empty when labels are already ints
            (or floats for regression).
        class_names: Each class id's name in ``nyu-mll/glue`` (its ``label`` feature's names);
            empty for regression.
        num_labels: Classes; 1 for the regression task STS-B.
        metrics: The keys the ``evaluate`` GLUE metric returns for this task.
        main_metric: The metric a single-number summary uses.
        splits: Split name to file name (without folder).
        has_header: Whether the TSV files start with a header row.
    """

    name: str
    folder: str
    text_columns: tuple[str | int, ...]
    hub_text_columns: tuple[str, ...]
    label_column: str | int
    num_labels: int
    metrics: tuple[str, ...]
    main_metric: str
    label_names: tuple[str, ...] = ()
    class_names: tuple[str, ...] = ()
    splits: tuple[tuple[str, str], ...] = (("train", "train.tsv"), ("validation", "dev.tsv"))
    has_header: bool = True

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    def split_name(self, split: str) -> str:
        """The split's name as the Hub has it; the original files' names (``"dev"``,
        ``"dev_matched"``) are taken too."""
        files = dict(self.splits)
        if split in files:
            return split
        by_file = {file.removesuffix(".tsv"): name for name, file in self.splits}
        if split in by_file:
            return by_file[split]
        raise GlueDataError(
            f"GLUE task {self.name!r} has no split {split!r}; splits: {', '.join(files)} (or by file: "
            f"{', '.join(by_file)})"
        )

    def split_file(self, split: str) -> str:
        return dict(self.splits)[self.split_name(split)]


_NLI2 = ("entailment", "not_entailment")
_PAIR = ("sentence1", "sentence2")

GLUE_TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in (
        GlueTask(
            name="cola",
            folder="CoLA",
            text_columns=(3,),
            hub_text_columns=("sentence",),
            label_column=1,
            num_labels=2,
            class_names=("unacceptable", "acceptable"),
            metrics=("matthews_correlation",),
            main_metric="matthews_correlation",
            has_header=False,
        ),
        GlueTask(
            name="sst2",
            folder="SST-2",
            text_columns=("sentence",),
            hub_text_columns=("sentence",),
            label_column="label",
            num_labels=2,
            class_names=("negative", "positive"),
            metrics=("accuracy",),
            main_metric="accuracy",
        ),
        GlueTask(
            name="mrpc",
            folder="MRPC",
            text_columns=("#1 String", "#2 String"),
            hub_text_columns=_PAIR,
            label_column="Quality",
            num_labels=2,
            class_names=("not_equivalent", "equivalent"),
            metrics=("accuracy", "f1"),
            main_metric="f1",
        ),
        GlueTask(
            name="qqp",
            folder="QQP",
            text_columns=("question1", "question2"),
            hub_text_columns=("question1", "question2"),
            label_column="is_duplicate",
            num_labels=2,
            class_names=("not_duplicate", "duplicate"),
            metrics=("accuracy", "f1"),
            main_metric="f1",
        ),
        GlueTask(
            name="stsb",
            folder="STS-B",
            text_columns=_PAIR,
            hub_text_columns=_PAIR,
            label_column="score",
            num_labels=1,
            metrics=("pearson", "spearmanr"),
            main_metric="pearson",
        ),
        GlueTask(
            name="mnli",
            folder="MNLI",
            text_columns=_PAIR,
            hub_text_columns=("premise", "hypothesis"),
            label_column="gold_label",
            label_names=("entailment", "neutral", "contradiction"),
            num_labels=3,
            class_names=("entailment", "neutral", "contradiction"),
            metrics=("accuracy",),
            main_metric="accuracy",
            splits=(
                ("train", "train.tsv"),
                ("validation_matched", "dev_matched.tsv"),
                ("validation_mismatched", "dev_mismatched.tsv"),
            ),
        ),
        GlueTask(
            name="qnli",
            folder="QNLI",
            text_columns=("question", "sentence"),
            hub_text_columns=("question", "sentence"),
            label_column="label",
            label_names=_NLI2,
            num_labels=2,
            class_names=_NLI2,
            metrics=("accuracy",),
            main_metric="accuracy",
        ),
        GlueTask(
            name="rte",
            folder="RTE",
            text_columns=_PAIR,
            hub_text_columns=_PAIR,
            label_column="label",
            label_names=_NLI2,
            num_labels=2,
            class_names=_NLI2,
            metrics=("accuracy",),
            main_metric="accuracy",
        ),
        GlueTask(
            name="wnli",
            folder="WNLI",
            text_columns=_PAIR,
            hub_text_columns=_PAIR,
            label_column="label",
            num_labels=2,
            class_names=("not_entailment", "entailment"),
            metrics=("accuracy",),
            main_metric="accuracy",
        ),
    )
}

# Spellings users type: the folder names, with or without the dash, any case.
_ALIASES = {alias: name for name, t in GLUE_TASKS.items() for alias in (name, t.folder.lower())}
_ALIASES.update({"sts-b": "stsb", "sst-2": "sst2"})


def get_task(name: str) -> GlueTask:
    """Look a task up by any usual spelling (``"SST-2"``, ``"sst2"``, ``"STS-B"``)."""
    key = str(name).strip().lower()
    if key not in _ALIASES:
        raise GlueDataError(f"unknown GLUE task {name!r}; GLUE tasks: {', '.join(GLUE_TASKS)}")
    return GLUE_TASKS[_ALIASES[key]]


def eval_splits(task: GlueTask) -> tuple[tuple[str, str], ...]:
    """The dev splits a task is scored on, as (result label, split): one per task, two for
    MNLI (``mnli-m`` matched and ``mnli-mm`` mismatched)."""
    if task.name == "mnli":
        return (("mnli-m", "validation_matched"), ("mnli-mm", "validation_mismatched"))
    return ((task.name, "validation"),)


logger = logging.getLogger(__name__)

# Names Hub classifiers give their classes, as the dataset's names.
_CLASS_ALIASES = {"neg": "negative", "pos": "positive", "non_entailment": "not_entailment"}


def _class_name(name: str) -> str:
    key = str(name).strip().lower().replace("-", "_").replace(" ", "_")
    return _CLASS_ALIASES.get(key, key)


def class_order(id2label: dict | None, task: GlueTask) -> np.ndarray | None:
    """How a classifier's class ids map onto the task's: ``order[model_id] = task_id`` when
    its ``id2label`` names the task's classes in another order; None when it names them in the
    task's order, names nothing (``LABEL_0``, ``0``, ...) or names other classes (a warning:
    they are taken in id order)."""
    if not task.class_names or not id2label:
        return None
    try:
        names = [_class_name(id2label[i]) for i in range(task.num_labels)]
    except KeyError:  # ids that are not 0..n-1: nothing to read the order from
        return None
    if all(n in (f"label_{i}", str(i)) for i, n in enumerate(names)):
        return None
    wanted = [_class_name(n) for n in task.class_names]
    if sorted(names) != sorted(wanted):
        logger.warning(
            "the model names its classes %s and GLUE %s's are %s; scoring its class i as the task's class i",
            [id2label[i] for i in range(task.num_labels)],
            task.name,
            list(task.class_names),
        )
        return None
    order = np.array([wanted.index(n) for n in names])
    return None if (order == np.arange(len(order))).all() else order
