"""The knapsack and layer-order plans, and the plan's accounting."""

import itertools
import random

import pytest

from hfcompress.mixed_precision import Choice, PrecisionPlan, plan_by_layer_order, solve_budget


def _brute_force(costs, losses, capacity):
    best = None
    for picks in itertools.product(*[range(len(row)) for row in costs]):
        if sum(costs[i][j] for i, j in enumerate(picks)) <= capacity:
            loss = sum(losses[i][j] for i, j in enumerate(picks))
            best = loss if best is None else min(best, loss)
    return best


@pytest.mark.parametrize("seed", range(6), ids=lambda s: f"seed{s}")
def test_knapsack_finds_the_brute_force_optimum(seed):
    rng = random.Random(seed)
    costs = [sorted(rng.randint(10, 90) for _ in range(3)) for _ in range(6)]
    losses = [sorted((rng.random() * 10 for _ in range(3)), reverse=True) for _ in range(6)]
    capacity = sum(min(r) for r in costs) + rng.randint(0, 150)
    picks = solve_budget(costs, losses, capacity)  # capacity < resolution: one byte per unit, exact
    assert sum(costs[i][j] for i, j in enumerate(picks)) <= capacity
    assert sum(losses[i][j] for i, j in enumerate(picks)) == pytest.approx(_brute_force(costs, losses, capacity))


def test_coarse_units_never_exceed_the_budget():
    rng = random.Random(7)
    costs = [[rng.randint(1000, 5000) for _ in range(4)] for _ in range(40)]
    losses = [[rng.random() for _ in range(4)] for _ in range(40)]
    capacity = sum(sorted(r)[1] for r in costs)
    picks = solve_budget(costs, losses, capacity, resolution=100)
    assert sum(costs[i][j] for i, j in enumerate(picks)) <= capacity


def test_more_loss_buys_more_bits():
    costs = [[3, 4]] * 3  # W3 or W4 on three equal layers, room for one W4
    losses = [[1.0, 0.5], [9.0, 1.0], [2.0, 1.5]]
    assert solve_budget(costs, losses, 10) == [0, 1, 0]


def test_a_budget_below_the_smallest_plan_is_refused():
    with pytest.raises(ValueError, match="below the smallest plan"):
        solve_budget([[3, 4], [3, 4]], [[1, 0], [1, 0]], 5)
    with pytest.raises(ValueError, match="below the smallest plan"):
        plan_by_layer_order([[3, 4], [3, 4]], 5)


def test_layer_order_gives_the_first_layers_the_largest_candidate():
    assert plan_by_layer_order([[3, 4]] * 4, 14) == [1, 1, 0, 0]
    assert plan_by_layer_order([[2, 3, 8]] * 3, 12) == [2, 0, 0]  # 8 + 2 + 2: nothing left for a 3
    assert plan_by_layer_order([[2, 3, 8]] * 3, 13) == [2, 1, 0]


def test_plan_accounting_and_table():
    layers = {
        "m.layers.0.q": Choice(3, 128),
        "m.layers.0.v": Choice(8, -1),
        "m.layers.1.q": Choice(4, 64),
        "head": Choice(2, 64),
    }
    plan = PrecisionPlan(
        layers=layers,
        weights=dict.fromkeys(layers, 1000),
        bytes={"m.layers.0.q": 400, "m.layers.0.v": 1000, "m.layers.1.q": 550, "head": 300},
        budget_bytes=2400,
        strategy="sensitivity",
        estimated_loss=1.5,
    )
    assert plan.bits_per_weight == pytest.approx(8 * 2250 / 4000)
    assert plan.budget_bits_per_weight == pytest.approx(4.8)
    assert "w3g128 x1" in plan.summary() and "w8pc x1" in plan.summary()
    table = plan.table().splitlines()
    assert table[0] == "| layer | q | v | (itself) |"
    assert table[2] == "| m.layers.0 | w3g128 | w8pc |  |"
    assert table[3] == "| m.layers.1 | w4g64 |  |  |"
    assert table[4] == "| head |  |  | w2g64 |"
    assert plan.to_dict()["layers"]["m.layers.0.v"] == {"bits": 8, "group_size": -1}
