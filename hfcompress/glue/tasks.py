"""The GLUE tasks: their files in the original layout, their Hub names and their official metrics.

One :class:`GlueTask` per task. ``columns`` says where the text and the label sit in the
original TSV files (by header name, or by position for CoLA, whose files have no header);
``label_names`` gives the order of string labels, the same order as the Hub dataset
``nyu-mll/glue`` uses, so a model fine-tuned on one source scores the same on the other.
"""

from __future__ import annotations

from dataclasses import dataclass

from hfcompress.errors import HfCompressError

__all__ = ["GLUE_TASKS", "GlueDataError", "GlueTask", "eval_splits", "get_task"]


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
