"""Our GLUE metrics against scikit-learn and scipy on the same predictions, for every task."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from hfcompress.glue import GLUE_TASKS, glue_metrics


def _reference(task, p, r) -> dict[str, float]:
    if task.is_regression:
        return {"pearson": float(pearsonr(p, r)[0]), "spearmanr": float(spearmanr(p, r)[0])}
    if task.name == "cola":
        return {"matthews_correlation": float(matthews_corrcoef(r, p))}
    if task.name in ("mrpc", "qqp"):
        return {"accuracy": float(accuracy_score(r, p)), "f1": float(f1_score(r, p))}
    return {"accuracy": float(accuracy_score(r, p))}


@pytest.mark.parametrize("seed", [0, 1, 2], ids=lambda s: f"seed{s}")
@pytest.mark.parametrize("name", sorted(GLUE_TASKS), ids=sorted(GLUE_TASKS))
def test_metrics_equal_sklearn_scipy(name, seed):
    task = GLUE_TASKS[name]
    rng = np.random.default_rng(seed)
    n = 200
    if task.is_regression:
        r = np.round(rng.uniform(0, 5, n), 1)  # rounded: ties, as STS-B scores have
        p = r + rng.normal(0, 1.5, n)
        p[:20] = np.round(p[:20])
    else:
        r = rng.integers(0, task.num_labels, n)
        p = np.where(rng.random(n) < 0.7, r, rng.integers(0, task.num_labels, n))
    ours = glue_metrics(task, p, r)
    reference = _reference(task, p, r)
    assert list(ours) == list(reference)  # the same keys as evaluate's GLUE metric, same order
    for key in ours:
        assert ours[key] == pytest.approx(reference[key], abs=1e-12), key


def test_constant_predictions_give_zero_mcc_like_sklearn():
    r = np.array([0, 1, 1, 0])
    assert glue_metrics("cola", np.ones(4, dtype=int), r)["matthews_correlation"] == matthews_corrcoef(r, np.ones(4))


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="same non-empty 1-D shape"):
        glue_metrics("sst2", [0, 1], [0])
