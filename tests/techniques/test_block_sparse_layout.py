"""Block-sparse layouts as pure functions: shapes, causality, budgets, token masks."""

import pytest
import torch

from hfcompress.techniques.block_sparse.layout import (
    allowed,
    density,
    expand,
    local_layout,
    num_blocks,
    pooled_scores,
    random_layout,
    sink_layout,
    strided_layout,
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
