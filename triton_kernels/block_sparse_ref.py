"""Pure-torch twin of the block-sparse attention kernel (:mod:`hfcompress_triton.block_sparse`),
with the same parameter names: SDPA over the token mask that the block layout expands to.

* ``block_sparse_attention``: ``q: [B, H, T, D]``, ``k, v: [B, Hk, T, D]`` (query head ``h``
  reads key head ``h // (H / Hk)``), ``layout: [B or 1, H or 1, n, n]`` bool with
  ``n = ceil(T / block_size)``: tile ``(i, j)`` kept when True. Causal attention also drops
  keys after each query inside the kept tiles. Every row must keep its diagonal tile (the
  layouts of :mod:`hfcompress.techniques.block_sparse.layout` do), so no row is empty.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["block_sparse_attention_ref", "check_inputs", "token_mask"]


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: torch.Tensor, block_size: int) -> None:
    """Raise ``ValueError`` naming the shapes when the arguments do not fit together."""
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(
            f"expected q [B, H, T, D] and k, v [B, Hk, T, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    b, h, t, d = q.shape
    if k.shape[0] != b or k.shape[2] != t or k.shape[3] != d or h % k.shape[1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)}: need the same B, T, D and H a multiple of Hk")
    n = -(-t // block_size)
    if (
        layout.dim() != 4
        or layout.shape[-2:] != (n, n)
        or layout.shape[0] not in (1, b)
        or layout.shape[1] not in (1, h)
    ):
        raise ValueError(
            f"layout {tuple(layout.shape)} does not fit T={t} at block_size={block_size}: "
            f"expected [B or 1, H or 1, {n}, {n}]"
        )


def token_mask(layout: torch.Tensor, block_size: int, length: int, causal: bool) -> torch.Tensor:
    """``[..., T, T]`` bool token mask (True: attend) of a ``[..., n, n]`` block layout."""
    mask = layout.repeat_interleave(block_size, -2).repeat_interleave(block_size, -1)[..., :length, :length]
    if causal:
        mask = mask & torch.ones(length, length, dtype=torch.bool, device=layout.device).tril()
    return mask


def block_sparse_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: torch.Tensor,
    block_size: int,
    causal: bool,
    sm_scale: float,
) -> torch.Tensor:
    """Block-sparse attention by SDPA with the expanded mask (module docstring); differentiable."""
    check_inputs(q, k, v, layout, block_size)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    mask = token_mask(layout, block_size, q.shape[2], causal)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=sm_scale)
