"""Block-sparse attention layouts as pure functions on tensors.

A layout says which ``block x block`` tiles of the attention matrix are computed: a boolean
``[H, nQ, nK]`` tensor (``H`` heads, or 1 for all heads; ``nQ = ceil(Tq / block)`` query
blocks, ``nK`` key blocks; the last block may be partial). Every layout keeps the diagonal
blocks, so every query row attends to at least its own block (and, causal, to itself).

Fixed layouts: local window, sinks / global blocks (the first key blocks; for encoders also
global query rows, BigBird's CLS block), strided, seeded random (BigBird). Data-driven ones
keep, per head and query block, the key blocks with the highest scores under a density
budget (:func:`topk_layout`); the scores come from the true attention mass (the oracle,
:func:`attention_mass`), the mass of a few sampled query rows per block (the same function
with ``samples``), mean-pooled queries and keys (:func:`pooled_scores`), or a table of
mass by block distance calibrated per head (:func:`distance_table`, :func:`table_scores`).

Density is the fraction of computed tiles among those a dense attention computes (the lower
triangle, diagonal included, when causal).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "allowed",
    "attention_mass",
    "density",
    "distance_table",
    "expand",
    "local_layout",
    "num_blocks",
    "pooled_scores",
    "random_layout",
    "sink_layout",
    "strided_layout",
    "table_scores",
    "topk_layout",
]


def num_blocks(length: int, block: int) -> int:
    """Blocks of ``block`` tokens covering ``length`` tokens (the last one may be partial)."""
    if block < 1 or block & (block - 1):
        raise ValueError(f"block size {block} must be a power of two")
    return -(-length // block)


def allowed(nq: int, nk: int, *, causal: bool, device: torch.device | str | None = None) -> torch.Tensor:
    """``[nQ, nK]`` tiles a dense attention computes: all, or the lower triangle when causal
    (query block ``i`` is aligned to the last ``nQ`` key blocks, as in decoding with a prefix)."""
    full = torch.ones(nq, nk, dtype=torch.bool, device=device)
    return torch.tril(full, diagonal=nk - nq) if causal else full


def _diagonal(nq: int, nk: int, device=None) -> torch.Tensor:
    i = torch.arange(nq, device=device)[:, None] + (nk - nq)
    return torch.arange(nk, device=device)[None, :] == i


def local_layout(nq: int, nk: int, window: int, *, causal: bool) -> torch.Tensor:
    """Each query block sees the key blocks less than ``window`` blocks away: its own and
    the ``window - 1`` before it (causal), or on each side (bidirectional)."""
    if window < 1:
        raise ValueError(f"window={window} must be at least 1 block")
    i = torch.arange(nq)[:, None] + (nk - nq)
    j = torch.arange(nk)[None, :]
    return ((i - j).abs() < window) & allowed(nq, nk, causal=causal) | _diagonal(nq, nk)


def sink_layout(nq: int, nk: int, sinks: int, *, causal: bool, global_rows: bool = False) -> torch.Tensor:
    """The first ``sinks`` key blocks, seen by every query block (attention sinks); with
    ``global_rows`` (encoders: the CLS block), the first ``sinks`` query blocks also see
    every key block."""
    layout = torch.zeros(nq, nk, dtype=torch.bool)
    layout[:, :sinks] = True
    if global_rows:
        layout[:sinks, :] = True
    return layout & allowed(nq, nk, causal=causal) | _diagonal(nq, nk)


def strided_layout(nq: int, nk: int, stride: int, *, causal: bool) -> torch.Tensor:
    """Key blocks whose distance to the query block is a multiple of ``stride``."""
    if stride < 1:
        raise ValueError(f"stride={stride} must be at least 1")
    i = torch.arange(nq)[:, None] + (nk - nq)
    j = torch.arange(nk)[None, :]
    return ((i - j) % stride == 0) & allowed(nq, nk, causal=causal) | _diagonal(nq, nk)


def random_layout(nq: int, nk: int, per_row: int, *, causal: bool, seed: int = 0, heads: int = 1) -> torch.Tensor:
    """``per_row`` key blocks drawn per query block (and head) among those allowed, seeded
    (BigBird's random blocks). Returns ``[heads, nQ, nK]``."""
    g = torch.Generator().manual_seed(seed)
    ok = allowed(nq, nk, causal=causal)
    noise = torch.rand(heads, nq, nk, generator=g).masked_fill(~ok, -1.0)
    count = min(per_row, nk)
    picked = torch.zeros(heads, nq, nk, dtype=torch.bool)
    picked.scatter_(-1, noise.topk(count, dim=-1).indices, True)
    return picked & ok | _diagonal(nq, nk)


def density(layout: torch.Tensor, *, causal: bool) -> float:
    """Computed tiles over those a dense attention computes (averaged over heads)."""
    nq, nk = layout.shape[-2:]
    ok = allowed(nq, nk, causal=causal, device=layout.device)
    return float((layout & ok).sum() / (ok.sum() * (layout.numel() // (nq * nk))))


def topk_layout(
    scores: torch.Tensor,
    budget: float,
    *,
    causal: bool,
    keep: torch.Tensor | None = None,
    scope: str = "row",
) -> torch.Tensor:
    """The tiles with the highest ``scores`` under a density budget (the diagonal always kept).

    Args:
        scores: ``[H, nQ, nK]`` float scores (higher keeps), e.g. the attention mass each
            query block puts on each key block (rows summing to 1).
        budget: Density in (0, 1].
        causal: Whether tiles above the diagonal are excluded.
        keep: ``[nQ, nK]`` or ``[H, nQ, nK]`` tiles kept regardless (sinks), counted in the budget.
        scope: ``"row"``: each query block keeps about ``budget`` of its allowed key blocks.
            ``"head"``: each head keeps about ``budget`` of all its allowed tiles, the best
            scores of any row (a row whose mass sits in few blocks gives the others its share).
    """
    if not 0 < budget <= 1:
        raise ValueError(f"density {budget} must be in (0, 1]")
    if scope not in ("row", "head"):
        raise ValueError(f"scope={scope!r}: expected 'row' or 'head'")
    h, nq, nk = scores.shape
    ok = allowed(nq, nk, causal=causal, device=scores.device)
    forced = _diagonal(nq, nk, scores.device).expand(h, nq, nk)
    if keep is not None:
        forced = forced | (keep.to(scores.device) & ok)
    ranked = scores.float().masked_fill(~ok, -math.inf).masked_fill(forced, math.inf)
    if scope == "head":
        count = max(1, math.ceil(budget * int(ok.sum())))
        flat = ranked.reshape(h, nq * nk)
        picked = torch.zeros_like(flat, dtype=torch.bool)
        picked.scatter_(-1, flat.topk(min(count, nq * nk), dim=-1).indices, True)
        return picked.view(h, nq, nk) & ok | forced
    per_row = ok.sum(-1)  # [nQ]
    counts = torch.clamp(torch.ceil(budget * per_row).long(), min=1)  # [nQ]
    order = ranked.argsort(dim=-1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(nk, device=scores.device).expand(h, nq, nk).contiguous())
    return (rank < counts[None, :, None]) & ok | forced


def attention_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    block: int,
    *,
    causal: bool,
    samples: int | None = None,
    key_mask: torch.Tensor | None = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """The attention mass each query block puts on each key block: the softmax probabilities
    of a tile summed over its keys and averaged over the block's query rows.

    With ``samples=None`` every row counts (the oracle: a dense attention's cost). With
    ``samples=s`` only ``s`` rows per query block, evenly spaced (the dynamic estimator: a
    ``s / block`` share of the dense ``Q K^T``, no ``P V``).

    Args:
        q: ``[H, Tq, D]`` queries (scaled or not: the softmax uses ``1/sqrt(D)``).
        k: ``[Hk, Tk, D]`` keys; ``H`` a multiple of ``Hk`` (grouped-query heads share a key head).
        block: Tokens per block.
        causal: Queries aligned to the last ``Tq`` keys, each seeing the keys up to itself.
        samples: Query rows per block, or None for all.
        key_mask: ``[Tk]`` bool, False for keys no query may see (padding).
        chunk: Query rows per step (bounds the ``[H, rows, Tk]`` probabilities held at once).

    Returns:
        ``[H, nQ, nK]`` float32, each row summing to 1.
    """
    h, tq, _ = q.shape
    hk, tk, _ = k.shape
    if h % hk:
        raise ValueError(f"{h} query heads are not a multiple of {hk} key heads")
    nq, nk = num_blocks(tq, block), num_blocks(tk, block)
    if samples is None:
        rows = torch.arange(tq, device=q.device)
    else:
        starts = torch.arange(nq, device=q.device) * block
        lengths = torch.clamp(tq - starts, max=block)
        take = min(samples, block)
        offsets = ((torch.arange(take, device=q.device) + 0.5) / take)[None, :] * lengths[:, None]
        rows = torch.unique(starts[:, None] + offsets.long())  # [R], sorted
    kk = k.float().repeat_interleave(h // hk, dim=0)  # [H, Tk, D]
    pad = nk * block - tk
    mass = torch.zeros(h, nq, nk, device=q.device)
    counts = torch.zeros(nq, device=q.device)
    with torch.autocast(q.device.type, enabled=False):  # float32 scores under a training autocast too
        for r in rows.split(chunk):
            _add_mass(mass, counts, q[:, r].float(), kk, r, block, tq, causal, key_mask, pad)
    return mass / counts[None, :, None]


def _add_mass(mass, counts, q, kk, r, block, tq, causal, key_mask, pad) -> None:
    """Add rows ``r``'s (``q: [H, R, D]``) probabilities per key block to ``mass`` and count them."""
    h, _, d = q.shape
    tk = kk.shape[1]
    nk = mass.shape[-1]
    logits = q @ kk.transpose(1, 2) / math.sqrt(d)  # [H, R, Tk]
    if causal:
        visible = torch.arange(tk, device=q.device)[None, :] <= (r + tk - tq)[:, None]
        logits = logits.masked_fill(~visible, -math.inf)
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask, -math.inf)
    # A row that sees no key weighs 0 (its softmax is NaN); a NaN logit stays NaN, for the caller to see.
    probs = logits.softmax(-1).masked_fill(logits.isneginf().all(-1, keepdim=True), 0.0)
    probs = torch.nn.functional.pad(probs, (0, pad))
    per_block = probs.view(h, len(r), nk, block).sum(-1)  # [H, R, nK]
    mass.index_add_(1, r // block, per_block)
    counts.index_add_(0, r // block, torch.ones(len(r), device=q.device))


def distance_table(mass: torch.Tensor, *, sinks: int, causal: bool) -> torch.Tensor:
    """Per head, the mean attention mass of a tile by its place: the first ``sinks`` key blocks
    by their index, every other tile by its block distance (query block minus key block).

    The calibrated layout keeps, per head, the tiles whose place carried the most mass on
    calibration data; a table of places (not of tiles) applies to any sequence length.

    Args:
        mass: ``[H, n, n]`` mass of one square sequence (:func:`attention_mass`), or the sum
            over several.

    Returns:
        ``[H, sinks + 2n - 1]`` float32: ``sinks`` entries for the sink blocks, then distances
        ``-(n-1) .. n-1`` (negative: keys after the query block; zero mass when causal).
    """
    h, n, _ = mass.shape
    i = torch.arange(n, device=mass.device)[:, None]
    j = torch.arange(n, device=mass.device)[None, :]
    place = torch.where(j < sinks, j, sinks + (i - j) + (n - 1))  # [n, n]
    ok = allowed(n, n, causal=causal, device=mass.device)
    size = sinks + 2 * n - 1
    total = torch.zeros(h, size, device=mass.device)
    total.index_add_(1, place[ok], mass.float()[:, ok])
    count = torch.zeros(size, device=mass.device).index_add_(
        0, place[ok], torch.ones(int(ok.sum()), device=mass.device)
    )
    return total / count.clamp(min=1)


def table_scores(table: torch.Tensor, nq: int, nk: int, *, sinks: int) -> torch.Tensor:
    """``[H, nQ, nK]`` scores of each tile from a :func:`distance_table` (queries aligned to
    the last key blocks); distances beyond the table score 0."""
    size = table.shape[1]
    reach = (size - sinks + 1) // 2  # the table covers distances -(reach-1) .. reach-1
    i = torch.arange(nq, device=table.device)[:, None] + (nk - nq)
    j = torch.arange(nk, device=table.device)[None, :]
    dist = i - j
    place = torch.where(j < sinks, j, sinks + dist + (reach - 1))
    inside = (j < sinks) | (dist.abs() < reach)
    scores = table[:, place.clamp(0, size - 1)]
    return scores.masked_fill(~inside, 0.0)


def pooled_scores(q: torch.Tensor, k: torch.Tensor, block: int) -> torch.Tensor:
    """Block scores from mean-pooled queries and keys, softmaxed per query block.

    Args:
        q: ``[H, Tq, D]`` queries.
        k: ``[H, Tk, D]`` keys (grouped-query keys repeated to ``H`` heads).
        block: Tokens per block.

    Returns:
        ``[H, nQ, nK]`` float32 scores.
    """

    def pool(x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        n = num_blocks(t, block)
        padded = torch.nn.functional.pad(x.float(), (0, 0, 0, n * block - t))
        sums = padded.view(x.shape[0], n, block, x.shape[2]).sum(2)
        counts = torch.full((n,), block, dtype=torch.float32, device=x.device)
        counts[-1] = t - (n - 1) * block
        return sums / counts[None, :, None]

    with torch.autocast(q.device.type, enabled=False):
        logits = pool(q) @ pool(k).transpose(1, 2) / math.sqrt(q.shape[-1])
    return logits.softmax(-1)


def expand(layout: torch.Tensor, block: int, q_len: int, k_len: int, *, causal: bool) -> torch.Tensor:
    """The token mask ``[H, Tq, Tk]`` (True: attend) of a block layout, causal within tiles
    when ``causal`` (queries aligned to the last ``Tq`` keys)."""
    mask = layout.repeat_interleave(block, -2).repeat_interleave(block, -1)[..., :q_len, :k_len]
    if causal:
        i = torch.arange(q_len, device=layout.device)[:, None] + (k_len - q_len)
        mask = mask & (torch.arange(k_len, device=layout.device)[None, :] <= i)
    return mask
