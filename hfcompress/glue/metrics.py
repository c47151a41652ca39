"""The official GLUE metrics, as pure functions on predictions and references.

Keys and conventions follow the ``evaluate`` GLUE metric: values are fractions in [0, 1]
(correlations in [-1, 1]); F1 is binary with class 1 positive; Spearman's correlation uses
average ranks for ties. Written with numpy alone so scoring needs neither scikit-learn nor scipy;
the tests hold every value to those libraries.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hfcompress.glue.tasks import GlueTask, get_task

__all__ = ["accuracy", "binary_f1", "glue_metrics", "matthews_correlation", "pearson", "spearman"]


def accuracy(predictions: np.ndarray, references: np.ndarray) -> float:
    return float(np.mean(predictions == references))


def binary_f1(predictions: np.ndarray, references: np.ndarray) -> float:
    tp = float(np.sum((predictions == 1) & (references == 1)))
    fp = float(np.sum((predictions == 1) & (references != 1)))
    fn = float(np.sum((predictions != 1) & (references == 1)))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def matthews_correlation(predictions: np.ndarray, references: np.ndarray) -> float:
    """Multi-class Matthews correlation (Gorodkin's R_K), as scikit-learn defines it; 0 when
    either side is constant."""
    classes = np.union1d(predictions, references)
    cm = np.zeros((len(classes), len(classes)), dtype=np.float64)
    np.add.at(cm, (np.searchsorted(classes, references), np.searchsorted(classes, predictions)), 1)
    t, p = cm.sum(axis=1), cm.sum(axis=0)
    c, s = np.trace(cm), cm.sum()
    denominator = np.sqrt((s * s - p @ p) * (s * s - t @ t))
    return 0.0 if denominator == 0 else float((c * s - t @ p) / denominator)


def pearson(predictions: np.ndarray, references: np.ndarray) -> float:
    x = predictions.astype(np.float64) - predictions.mean()
    y = references.astype(np.float64) - references.mean()
    denominator = np.sqrt((x @ x) * (y @ y))
    return 0.0 if denominator == 0 else float(x @ y / denominator)


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    # Each run of equal values gets the mean of the ranks it spans.
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    ranks = np.empty(len(values), dtype=np.float64)
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + end + 1) / 2  # ranks are 1-based
    return ranks


def spearman(predictions: np.ndarray, references: np.ndarray) -> float:
    return pearson(_average_ranks(predictions), _average_ranks(references))


_METRICS = {
    "accuracy": accuracy,
    "f1": binary_f1,
    "matthews_correlation": matthews_correlation,
    "pearson": pearson,
    "spearmanr": spearman,
}


def glue_metrics(
    task: GlueTask | str, predictions: Sequence | np.ndarray, references: Sequence | np.ndarray
) -> dict[str, float]:
    """The task's official metrics, keyed as ``evaluate.load("glue", task)`` keys them.

    Args:
        task: A GLUE task or its name.
        predictions: Class ids ``[N]`` (int), or scores ``[N]`` (float) for STS-B.
        references: Gold labels ``[N]``, same kind.
    """
    task = get_task(task) if isinstance(task, str) else task
    p, r = np.asarray(predictions), np.asarray(references)
    if p.shape != r.shape or p.ndim != 1 or len(p) == 0:
        raise ValueError(f"predictions {p.shape} and references {r.shape} must be the same non-empty 1-D shape")
    return {key: _METRICS[key](p, r) for key in task.metrics}
