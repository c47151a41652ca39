"""Load a GLUE split from a local folder in the original layout, or from the Hub.

Every loader returns a ``datasets.Dataset`` with the columns ``text_a``, ``text_b`` (pair
tasks only) and ``label`` (int class ids; float scores for STS-B), whatever the source.

A source is:

* ``None``: the ``glue`` folder under :func:`hfcompress.data.data_dir` when present (the
  ``shared/data`` copy), else the Hub;
* a path: either the GLUE root (holding ``SST-2/``, ``MRPC/``, ...) or one task's folder;
* ``"nyu-mll/glue"`` (or ``"glue"``): the Hub dataset, when online.

The original files are read as tab-separated values without quote handling (GLUE sentences
contain unbalanced quotes) and with a byte-order mark stripped (MRPC's files start with one).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from hfcompress.data import data_dir
from hfcompress.glue.tasks import GlueDataError, GlueTask, get_task

__all__ = ["HUB_DATASET", "load_glue", "read_glue_tsv", "resolve_glue_source"]

HUB_DATASET = "nyu-mll/glue"
_HUB_NAMES = {HUB_DATASET, "glue"}


def resolve_glue_source(source: str | os.PathLike | None) -> Path | str:
    """The local GLUE root (a ``Path``) or the Hub dataset name the ``source`` stands for."""
    if source is None:
        root = data_dir()
        if root is not None and (root / "glue").is_dir():
            return root / "glue"
        return HUB_DATASET
    if isinstance(source, str) and source in _HUB_NAMES:
        return HUB_DATASET
    path = Path(source)
    if not path.is_dir():
        raise GlueDataError(
            f"GLUE data folder {str(source)!r} does not exist; pass a folder in the original GLUE layout "
            f"(holding SST-2/, MRPC/, ... or one task's train.tsv and dev.tsv) or {HUB_DATASET!r} to download"
        )
    return path


def _task_file(root: Path, task: GlueTask, split: str) -> Path:
    name = task.split_file(split)
    for folder in (root / task.folder, root):
        if (folder / name).is_file():
            return folder / name
    raise GlueDataError(
        f"GLUE {task.name}: no {name} in {root / task.folder} (nor in {root}); the original GLUE layout has "
        f"{task.folder}/{', '.join(f for _, f in task.splits)}"
    )


def _column_index(task: GlueTask, header: list[str] | None, column: str | int, path: Path) -> int:
    if isinstance(column, int):
        return column
    assert header is not None  # a task with named columns has a header (see GLUE_TASKS)
    if column not in header:
        raise GlueDataError(f"{path}: header has no column {column!r} (GLUE {task.name}); header: {header}")
    return header.index(column)


def _label(task: GlueTask, raw: str, path: Path, line: int) -> int | float:
    try:
        if task.is_regression:
            return float(raw)
        if task.label_names:
            return task.label_names.index(raw)
        value = int(raw)
        if not 0 <= value < task.num_labels:
            raise ValueError
        return value
    except ValueError:
        accepted = "a number" if task.is_regression else ", ".join(task.label_names) or f"0..{task.num_labels - 1}"
        raise GlueDataError(
            f"{path}:{line}: label {raw!r} is not valid for GLUE {task.name}; accepted: {accepted}"
        ) from None


def read_glue_tsv(path: str | os.PathLike, task: GlueTask | str) -> dict[str, list[Any]]:
    """Read one original-layout GLUE file into columns ``text_a``, [``text_b``,] ``label``."""
    task = get_task(task) if isinstance(task, str) else task
    path = Path(path)
    with path.open(encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    header = rows.pop(0) if task.has_header and rows else None
    first_line = 2 if header is not None else 1
    text_idx = [_column_index(task, header, c, path) for c in task.text_columns]
    label_idx = _column_index(task, header, task.label_column, path)
    needed = max([*text_idx, label_idx]) + 1
    columns: dict[str, list[Any]] = {"text_a": [], "label": []}
    if len(text_idx) == 2:
        columns["text_b"] = []
    for offset, row in enumerate(rows):
        line = first_line + offset
        if not row:
            continue
        if len(row) < needed:
            raise GlueDataError(f"{path}:{line}: {len(row)} fields, GLUE {task.name} needs at least {needed}")
        columns["text_a"].append(row[text_idx[0]])
        if len(text_idx) == 2:
            columns["text_b"].append(row[text_idx[1]])
        columns["label"].append(_label(task, row[label_idx], path, line))
    if not columns["label"]:
        raise GlueDataError(f"{path} holds no examples")
    return columns


def _load_hub(task: GlueTask, split: str):
    from datasets import load_dataset

    try:
        ds = load_dataset(HUB_DATASET, task.name, split=split)
    except Exception as exc:  # the datasets library raises many types for "offline"
        raise GlueDataError(
            f"could not load {HUB_DATASET!r} ({task.name}, {split}) from the Hub: {exc}. Offline, pass a "
            "local folder in the original GLUE layout (data_dir=... / --data-dir)"
        ) from exc
    text = task.hub_text_columns
    rename = {text[0]: "text_a", **({text[1]: "text_b"} if len(text) == 2 else {})}
    keep = [*rename, "label"]
    ds = ds.remove_columns([c for c in ds.column_names if c not in keep]).rename_columns(rename)
    return ds


def load_glue(task: GlueTask | str, split: str, source: str | os.PathLike | None = None, *, limit: int | None = None):
    """Load one split of a GLUE task as a ``datasets.Dataset`` (columns ``text_a``, [``text_b``,]
    ``label``).

    Args:
        task: A task or its name (``"sst2"``, ``"SST-2"``, ...).
        split: ``"train"``, ``"validation"`` (MNLI: ``"validation_matched"`` /
            ``"validation_mismatched"``), or the original files' names (``"dev"``, ...).
        source: See the module docstring.
        limit: Keep only the first ``limit`` examples (quick runs).
    """
    from datasets import Dataset

    task = get_task(task) if isinstance(task, str) else task
    split = task.split_name(split)  # refuse an unknown split before any I/O
    where = resolve_glue_source(source)
    if isinstance(where, Path):
        ds = Dataset.from_dict(read_glue_tsv(_task_file(where, task, split), task))
    else:
        ds = _load_hub(task, split)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return ds
