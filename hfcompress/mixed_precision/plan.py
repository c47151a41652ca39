"""Choosing one candidate grid per layer under a byte budget: pure functions on numbers.

``solve_budget`` is the multiple-choice knapsack of the textbook's mixed-precision section:
each layer picks exactly one candidate, each candidate has a size and an estimated loss
growth, and the plan minimises the summed growth with the summed size within the budget.
It is solved exactly by dynamic programming over the budget cut into ``resolution`` units;
each size is rounded *up* to whole units, so a plan never exceeds the budget, at the price of
leaving at most one unit per layer unused.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Choice", "PrecisionPlan", "grid_table", "plan_by_layer_order", "solve_budget"]


@dataclass(frozen=True, order=True)
class Choice:
    """One candidate grid: ``bits`` per weight, ``group_size`` columns per scale (-1: one per
    output channel)."""

    bits: int
    group_size: int

    @property
    def name(self) -> str:
        return f"w{self.bits}" + ("pc" if self.group_size == -1 else f"g{self.group_size}")


def _check(costs: Sequence[Sequence[int]], capacity: int) -> None:
    if any(not row for row in costs):
        raise ValueError("every layer needs at least one candidate")
    least = sum(min(row) for row in costs)
    if least > capacity:
        raise ValueError(f"the budget of {capacity} bytes is below the smallest plan ({least} bytes)")


def solve_budget(
    costs: Sequence[Sequence[int]],
    losses: Sequence[Sequence[float]],
    capacity: int,
    *,
    resolution: int = 50_000,
) -> list[int]:
    """The candidate index per layer that minimises ``sum(losses)`` with ``sum(costs) <= capacity``.

    Args:
        costs: ``costs[i][j]``: bytes of layer ``i`` with candidate ``j``.
        losses: ``losses[i][j]``: its estimated loss growth (same shape as ``costs``).
        capacity: The budget in bytes.
        resolution: Units the budget is cut into (the DP table is layers x resolution).

    Raises:
        ValueError: if even the smallest candidates exceed the budget.
    """
    _check(costs, capacity)
    unit = max(capacity / resolution, 1.0)
    slots = int(capacity // unit)
    best = np.zeros(slots + 1)  # best[c]: least loss of the layers so far within c units
    picks = np.zeros((len(costs), slots + 1), dtype=np.int16)
    for i, (row, loss_row) in enumerate(zip(costs, losses, strict=True)):
        nxt = np.full(slots + 1, np.inf)
        for j, (cost, loss) in enumerate(zip(row, loss_row, strict=True)):
            units = int(np.ceil(cost / unit - 1e-9))
            if units > slots:
                continue
            cand = np.full(slots + 1, np.inf)
            cand[units:] = best[: slots + 1 - units] + loss
            better = cand < nxt
            nxt[better] = cand[better]
            picks[i, better] = j
        best = nxt
    if not np.isfinite(best[slots]):  # the rounding up made the smallest plan too big
        return [int(np.argmin(row)) for row in costs]
    chosen, c = [], slots
    for i in range(len(costs) - 1, -1, -1):
        j = int(picks[i, c])
        chosen.append(j)
        c -= int(np.ceil(costs[i][j] / unit - 1e-9))
    return chosen[::-1]


def plan_by_layer_order(costs: Sequence[Sequence[int]], capacity: int) -> list[int]:
    """Each layer in order takes its largest candidate that leaves room for the smallest
    candidate of every later layer (no sensitivity measured: the baseline to beat)."""
    _check(costs, capacity)
    rest = [0] * (len(costs) + 1)  # rest[i]: smallest bytes of layers i.. onwards
    for i in range(len(costs) - 1, -1, -1):
        rest[i] = rest[i + 1] + min(costs[i])
    chosen, used = [], 0
    for i, row in enumerate(costs):
        fits = [j for j, cost in enumerate(row) if used + cost + rest[i + 1] <= capacity]
        j = max(fits, key=lambda j: row[j])
        chosen.append(j)
        used += row[j]
    return chosen


_BLOCK = re.compile(r"^(?P<prefix>.*?)\.(?P<index>\d+)\.(?P<rest>.+)$")


def grid_table(layers: dict[str, Choice]) -> str:
    """Markdown: one row per block, one column per layer of a block, each cell the layer's
    grid (``w3g128``); layers outside the blocks get a row each."""
    rows: dict[str, dict[str, str]] = {}
    columns: list[str] = []
    for name, choice in layers.items():
        m = _BLOCK.match(name)
        row, column = (f"{m['prefix']}.{m['index']}", m["rest"]) if m else (name, "")
        if column not in columns:
            columns.append(column)
        rows.setdefault(row, {})[column] = choice.name
    head = ["layer", *[c or "(itself)" for c in columns]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, cells in rows.items():
        lines.append("| " + " | ".join([row, *[cells.get(c, "") for c in columns]]) + " |")
    return "\n".join(lines)


@dataclass(frozen=True)
class PrecisionPlan:
    """The grid chosen for each layer, and what it costs.

    Attributes:
        layers: Layer name -> its :class:`Choice`, in model order.
        weights: Layer name -> ``in_features * out_features``.
        bytes: Layer name -> stored bytes with its choice.
        budget_bytes: The budget the plan was chosen under.
        strategy: ``"sensitivity"`` or ``"layer_order"``.
        estimated_loss: Summed sensitivity of the chosen candidates (None for layer order).
    """

    layers: dict[str, Choice]
    weights: dict[str, int]
    bytes: dict[str, int]
    budget_bytes: int
    strategy: str
    estimated_loss: float | None = None

    @property
    def bits_per_weight(self) -> float:
        return 8 * sum(self.bytes.values()) / sum(self.weights.values())

    @property
    def budget_bits_per_weight(self) -> float:
        return 8 * self.budget_bytes / sum(self.weights.values())

    def summary(self) -> str:
        """One line: the size reached, the budget, and how many layers got each grid."""
        counts = Counter(c.name for c in self.layers.values())
        mix = ", ".join(f"{name} x{n}" for name, n in sorted(counts.items()))
        return (
            f"{self.strategy} plan: {self.bits_per_weight:.3f} bits per weight (budget "
            f"{self.budget_bits_per_weight:.3f}) over {len(self.layers)} layers: {mix}"
        )

    def table(self) -> str:
        """The chosen grids as :func:`grid_table` lays them out."""
        return grid_table(self.layers)

    def to_dict(self) -> dict:
        return {
            "strategy": self.strategy,
            "bits_per_weight": self.bits_per_weight,
            "budget_bits_per_weight": self.budget_bits_per_weight,
            "budget_bytes": self.budget_bytes,
            "estimated_loss": self.estimated_loss,
            "layers": {n: {"bits": c.bits, "group_size": c.group_size} for n, c in self.layers.items()},
        }
