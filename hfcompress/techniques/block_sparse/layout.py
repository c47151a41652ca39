"""Block-sparse attention layouts as pure functions on tensors.

A layout says which ``block x block`` tiles of the attention matrix are computed: a boolean
``[H, nQ, nK]`` tensor (``H`` heads, or 1 for all heads; ``nQ = ceil(Tq / block)`` query
blocks, ``nK`` key blocks; the last block may be partial). Every layout keeps the diagonal
blocks, so every query row attends to at least its own block (and, causal, to itself).

Fixed layouts: local window, sinks / global blocks (the first key blocks; for encoders also
global query rows, BigBird's CLS block), strided, seeded random (BigBird). Data-driven ones
keep, per head and query block, the key blocks with the highest scores under a density
budget (:func:`topk_layout`); the scores come from the true attention mass (the oracle),
mean-pooled queries and keys, or any estimator.

Density is the fraction of computed tiles among those a dense attention computes (the lower
triangle, diagonal included, when causal).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "allowed",
    "density",
    "expand",
    "local_layout",
    "num_blocks",
    "pooled_scores",
    "random_layout",
    "sink_layout",
    "strided_layout",
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


def topk_layout(scores: torch.Tensor, budget: float, *, causal: bool, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Per head and query block, the key blocks with the highest ``scores``, about
    ``budget`` of the allowed ones per row (at least the diagonal block).

    Args:
        scores: ``[H, nQ, nK]`` float scores (higher keeps).
        budget: Density in (0, 1].
        causal: Whether tiles above the diagonal are excluded.
        keep: ``[nQ, nK]`` or ``[H, nQ, nK]`` tiles kept regardless (sinks), counted in the budget.
    """
    if not 0 < budget <= 1:
        raise ValueError(f"density {budget} must be in (0, 1]")
    h, nq, nk = scores.shape
    ok = allowed(nq, nk, causal=causal, device=scores.device)
    forced = _diagonal(nq, nk, scores.device).expand(h, nq, nk)
    if keep is not None:
        forced = forced | (keep.to(scores.device) & ok)
    per_row = ok.sum(-1)  # [nQ]
    counts = torch.clamp(torch.ceil(budget * per_row).long(), min=1)  # [nQ]
    ranked = scores.float().masked_fill(~ok, -math.inf).masked_fill(forced, math.inf)
    order = ranked.argsort(dim=-1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(nk, device=scores.device).expand(h, nq, nk).contiguous())
    return (rank < counts[None, :, None]) & ok | forced


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
