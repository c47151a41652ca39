"""Block-sparse layouts as pure functions: shapes, causality, budgets, token masks."""

import pytest
import torch

from hfcompress.techniques.block_sparse.layout import (
    allowed,
    attention_mass,
    density,
    distance_table,
    expand,
    local_layout,
    num_blocks,
    pooled_scores,
    random_layout,
    sink_layout,
    strided_layout,
    table_scores,
    topk_layout,
)


@pytest.mark.parametrize("block", [3, 0, 96], ids=["odd", "zero", "not-power-of-two"])
def test_block_size_must_be_a_power_of_two(block):
    with pytest.raises(ValueError, match="power of two"):
        num_blocks(100, block)


def test_num_blocks_counts_a_partial_last_block():
    assert num_blocks(130, 64) == 3 and num_blocks(128, 64) == 2


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize(
    "make",
    [
        lambda n, c: local_layout(n, n, 2, causal=c),
        lambda n, c: sink_layout(n, n, 1, causal=c),
        lambda n, c: strided_layout(n, n, 3, causal=c),
        lambda n, c: random_layout(n, n, 2, causal=c, heads=3)[1],
    ],
    ids=["local", "sinks", "strided", "random"],
)
def test_fixed_layouts_keep_the_diagonal_and_respect_causality(make, causal):
    layout = make(7, causal)
    assert layout.shape == (7, 7) and layout.diagonal().all()
    if causal:
        assert not (layout & ~allowed(7, 7, causal=True)).any()


def test_local_window_counts_blocks():
    causal = local_layout(5, 5, 2, causal=True)
    assert causal[3].tolist() == [False, False, True, True, False]
    both = local_layout(5, 5, 2, causal=False)
    assert both[2].tolist() == [False, True, True, True, False]


def test_sinks_with_global_rows_see_everything():
    layout = sink_layout(4, 4, 1, causal=False, global_rows=True)
    assert layout[0].all() and layout[:, 0].all() and not layout[2, 3]


def test_random_layout_is_seeded_and_per_head():
    a = random_layout(8, 8, 2, causal=False, seed=1, heads=4)
    assert torch.equal(a, random_layout(8, 8, 2, causal=False, seed=1, heads=4))
    assert not torch.equal(a[0], a[1])


@pytest.mark.parametrize("budget", [0.25, 0.5, 1.0])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_topk_layout_keeps_the_best_blocks_within_the_budget(budget, causal):
    scores = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(0))
    layout = topk_layout(scores, budget, causal=causal)
    ok = allowed(8, 8, causal=causal)
    assert not (layout & ~ok).any() and layout.diagonal(dim1=-2, dim2=-1).all()
    per_row = layout.sum(-1)
    assert (per_row <= torch.clamp(torch.ceil(budget * ok.sum(-1)), min=1) + 1).all()  # + the forced diagonal
    # A kept block never scores below a dropped one in its row (the diagonal aside).
    off = ~torch.eye(8, dtype=torch.bool)
    for h in range(2):
        for i in range(8):
            kept = scores[h, i][layout[h, i] & off[i]]
            dropped = scores[h, i][~layout[h, i] & ok[i] & off[i]]
            if len(kept) and len(dropped):
                assert kept.min() >= dropped.max()
    assert density(topk_layout(scores, 1.0, causal=causal), causal=causal) == 1.0


def test_topk_layout_rejects_a_density_outside_0_1():
    with pytest.raises(ValueError, match="density"):
        topk_layout(torch.rand(1, 2, 2), 0.0, causal=True)


def test_expand_gives_a_causal_token_mask_with_a_partial_last_block():
    layout = local_layout(3, 3, 1, causal=True)  # the diagonal only
    mask = expand(layout, 4, 10, 10, causal=True)
    assert mask.shape == (10, 10)
    assert mask[9].tolist() == [False] * 8 + [True, True]
    assert mask[5].tolist() == [False] * 4 + [True, True] + [False] * 4


def test_pooled_scores_are_row_distributions():
    g = torch.Generator().manual_seed(0)
    scores = pooled_scores(torch.randn(2, 10, 8, generator=g), torch.randn(2, 10, 8, generator=g), 4)
    assert scores.shape == (2, 3, 3)
    assert torch.allclose(scores.sum(-1), torch.ones(2, 3))


def _qk(h=4, hk=2, t=37, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(h, t, d, generator=g), torch.randn(hk, t, d, generator=g)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_attention_mass_is_the_softmax_summed_per_tile(causal):
    q, k = _qk()
    mass = attention_mass(q, k, 8, causal=causal, chunk=5)  # chunks smaller than a block
    kk = k.repeat_interleave(2, 0)
    logits = q @ kk.transpose(1, 2) / 8**0.5
    if causal:
        logits = logits.masked_fill(~torch.ones(37, 37, dtype=torch.bool).tril(), float("-inf"))
    probs = logits.softmax(-1)
    for i, j in [(0, 0), (2, 1), (4, 4), (4, 0), (1, 3)]:
        want = probs[:, 8 * i : 8 * i + 8, 8 * j : 8 * j + 8].sum(-1).mean(-1)
        torch.testing.assert_close(mass[:, i, j], want)
    torch.testing.assert_close(mass.sum(-1), torch.ones(4, 5))


def test_sampled_mass_with_every_row_is_the_oracle_and_with_fewer_rows_estimates_it():
    q, k = _qk(t=64)
    oracle = attention_mass(q, k, 16, causal=True)
    torch.testing.assert_close(attention_mass(q, k, 16, causal=True, samples=16), oracle)
    sampled = attention_mass(q, k, 16, causal=True, samples=4)
    torch.testing.assert_close(sampled.sum(-1), torch.ones(4, 4))
    assert not torch.allclose(sampled, oracle)


def test_topk_head_scope_spends_the_budget_where_the_mass_is():
    # Row 3 puts its mass on one block, row 2 spreads it: per head, row 2 gets the tiles.
    scores = torch.zeros(1, 4, 4)
    scores[0, 3] = torch.tensor([0.97, 0.01, 0.01, 0.01])
    scores[0, 2, :3] = torch.tensor([0.3, 0.4, 0.3])
    layout = topk_layout(scores, 0.7, causal=True, scope="head")
    assert layout[0, 2, :3].all() and layout[0, 3].tolist() == [True, False, False, True]
    assert density(layout, causal=True) <= 0.7 + 1e-6
    with pytest.raises(ValueError, match="scope"):
        topk_layout(scores, 0.5, causal=True, scope="layer")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_distance_table_scores_each_tile_by_its_place(causal):
    mass = torch.rand(2, 5, 5, generator=torch.Generator().manual_seed(0))
    table = distance_table(mass, sinks=1, causal=causal)
    assert table.shape == (2, 1 + 9)
    # The sink column's mean, and distance 1's mean (tiles (2,1), (3,2), (4,3)).
    torch.testing.assert_close(table[:, 0], mass[:, :, 0].mean(-1))
    torch.testing.assert_close(table[:, 1 + 4 + 1], (mass[:, 2, 1] + mass[:, 3, 2] + mass[:, 4, 3]) / 3)
    scores = table_scores(table, 5, 5, sinks=1)
    assert torch.equal(scores[:, 3, 2], table[:, 6]) and torch.equal(scores[:, 4, 0], table[:, 0])
    # A longer sequence: distances beyond the table score 0.
    longer = table_scores(table, 8, 8, sinks=1)
    assert (longer[:, 7, 1:3] == 0).all() and torch.equal(longer[:, 7, 6], table[:, 6])


def test_attention_mass_gives_masked_keys_nothing():
    q, k = _qk(t=32)
    key_mask = torch.ones(32, dtype=torch.bool)
    key_mask[24:] = False
    mass = attention_mass(q, k, 8, causal=False, key_mask=key_mask)
    assert (mass[..., 3] == 0).all()
    torch.testing.assert_close(mass.sum(-1), torch.ones(4, 4))
