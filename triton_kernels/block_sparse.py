"""Block-sparse flash attention in Triton, forward and backward, visiting only the kept tiles.

The layout becomes two index lists: for each (batch, head, query block) the kept key blocks
(``kv_idx``, ``kv_cnt``), and for each (batch, head, key block) the query blocks that keep it
(``q_idx``, ``q_cnt``). One program per (query block, batch x head) runs the online softmax
over its kept key blocks (FlashAttention-2's forward) and saves the log-sum-exp; the backward
is FlashAttention-2's in two kernels without atomics: ``dq`` per query block over the same
lists, ``dk, dv`` per key block and query head over the transposed lists, the query heads of
a key head adding into its float32 ``dk, dv`` (atomically, side by side in L2). Scores are kept in base 2 (``exp2``),
and only the one tile of a list that can hold the diagonal or the partial last block is
masked. The tile is the layout's block; the head dim is padded to a power of two with masks.

Same parameters as :func:`hfcompress_triton.block_sparse_ref.block_sparse_attention_ref`. No
autotune, so the kernels run under ``TRITON_INTERPRET=1``; float32 products are IEEE (no TF32)
so that float32 matches the twin.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from hfcompress_triton.block_sparse_ref import check_inputs

__all__ = ["block_lists", "block_sparse_attention"]


_LOG2E = 1.4426950408889634


@triton.jit
def _scores(q, k, offs_m, offs_n, T, qk_scale, MASK: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr):
    """Scores in base-2 units (``qk_scale`` = softmax scale x log2(e)); with ``MASK``, keys past T
    (and after the query, if causal) are -inf. Only the tile that can hold such keys is masked:
    the kept lists are sorted, so that is the last tile of a query block's list (its diagonal or
    the partial last block) and the first of a key block's (its diagonal)."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    if MASK:
        valid = offs_n[None, :] < T
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(valid, s, float("-inf"))
    return s


@triton.jit
def _kv_tile(k_ptr, v_ptr, kvh, offs_n, offs_d, T, D):
    """The keys and values of tokens ``offs_n`` of key head ``kvh`` (zeros past T and past D)."""
    mask = (offs_n[:, None] < T) & (offs_d[None, :] < D)
    off = (kvh * T + offs_n[:, None]) * D + offs_d[None, :]
    return tl.load(k_ptr + off, mask=mask, other=0.0), tl.load(v_ptr + off, mask=mask, other=0.0)


@triton.jit
def _fwd_tile(
    acc, m_i, l_i, q, k_ptr, v_ptr, kvh, kb, offs_m, offs_d, T, D, qk_scale,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, BLOCK: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """One step of the online softmax over key block ``kb``."""
    offs_n = kb * BLOCK + tl.arange(0, BLOCK)
    k, v = _kv_tile(k_ptr, v_ptr, kvh, offs_n, offs_d, T, D)
    s = _scores(q, k, offs_m, offs_n, T, qk_scale, MASK, CAUSAL, PREC)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that sees no key yet
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return acc, m_new, l_i


@triton.jit
def _bsa_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, idx_ptr, cnt_ptr, qk_scale, T, D, NB,
    H: tl.constexpr, GROUP: tl.constexpr, CAUSAL: tl.constexpr, BLOCK: tl.constexpr, BD: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    """q, o: [B, H, T, D]; k, v: [B, H / GROUP, T, D]; lse: [B, H, T] float32, base 2;
    idx: [B * H, NB, NB] int32 (kept key blocks first, ascending); cnt: [B * H, NB]; grid (NB, B * H)."""
    qb, bh = tl.program_id(0), tl.program_id(1)
    kvh = (bh // H) * (H // GROUP) + (bh % H) // GROUP
    offs_m = qb * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BD)
    dmask = offs_d[None, :] < D
    q = tl.load(q_ptr + (bh * T + offs_m[:, None]) * D + offs_d[None, :], mask=(offs_m[:, None] < T) & dmask, other=0.0)
    m_i = tl.full((BLOCK,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK,), tl.float32)
    acc = tl.zeros((BLOCK, BD), tl.float32)
    row = bh * NB + qb
    cnt = tl.load(cnt_ptr + row)
    for t in range(0, cnt - 1):
        kb = tl.load(idx_ptr + row * NB + t)
        acc, m_i, l_i = _fwd_tile(
            acc, m_i, l_i, q, k_ptr, v_ptr, kvh, kb, offs_m, offs_d, T, D, qk_scale, False, CAUSAL, BLOCK, PREC
        )
    if cnt > 0:
        kb = tl.load(idx_ptr + row * NB + cnt - 1)
        acc, m_i, l_i = _fwd_tile(
            acc, m_i, l_i, q, k_ptr, v_ptr, kvh, kb, offs_m, offs_d, T, D, qk_scale, True, CAUSAL, BLOCK, PREC
        )
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    rows = offs_m < T
    tl.store(
        o_ptr + (bh * T + offs_m[:, None]) * D + offs_d[None, :],
        o.to(o_ptr.dtype.element_ty),
        mask=rows[:, None] & dmask,
    )
    tl.store(lse_ptr + bh * T + offs_m, m_i + tl.log2(l_safe), mask=rows)


@triton.jit
def _bsa_bwd_delta_kernel(o_ptr, do_ptr, delta_ptr, R, D, BLOCK_R: tl.constexpr, BD: tl.constexpr):
    """delta: [R] float32 = rowsum(dO * O) over the R = B * H * T rows (FlashAttention-2's)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BD)
    mask = (rows[:, None] < R) & (cols[None, :] < D)
    off = rows[:, None] * D + cols[None, :]
    o = tl.load(o_ptr + off, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + off, mask=mask, other=0.0).to(tl.float32)
    tl.store(delta_ptr + rows, tl.sum(o * do, 1), mask=rows < R)


@triton.jit
def _dq_tile(
    dq, q, do, lse, delta, k_ptr, v_ptr, kvh, kb, offs_m, offs_d, T, D, qk_scale,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, BLOCK: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    offs_n = kb * BLOCK + tl.arange(0, BLOCK)
    k, v = _kv_tile(k_ptr, v_ptr, kvh, offs_n, offs_d, T, D)
    p = tl.exp2(_scores(q, k, offs_m, offs_n, T, qk_scale, MASK, CAUSAL, PREC) - lse[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PREC)


@triton.jit
def _bsa_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, idx_ptr, cnt_ptr, sm_scale, qk_scale, T, D, NB,
    H: tl.constexpr, GROUP: tl.constexpr, CAUSAL: tl.constexpr, BLOCK: tl.constexpr, BD: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    """dq = sm_scale * sum over kept key blocks of dS K, with dS = P * (dO V^T - delta); grid (NB, B * H)."""
    qb, bh = tl.program_id(0), tl.program_id(1)
    kvh = (bh // H) * (H // GROUP) + (bh % H) // GROUP
    offs_m = qb * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BD)
    dmask = offs_d[None, :] < D
    rows = offs_m < T
    q_off = (bh * T + offs_m[:, None]) * D + offs_d[None, :]
    q = tl.load(q_ptr + q_off, mask=rows[:, None] & dmask, other=0.0)
    do = tl.load(do_ptr + q_off, mask=rows[:, None] & dmask, other=0.0)
    lse = tl.load(lse_ptr + bh * T + offs_m, mask=rows, other=0.0)
    delta = tl.load(delta_ptr + bh * T + offs_m, mask=rows, other=0.0)
    dq = tl.zeros((BLOCK, BD), tl.float32)
    row = bh * NB + qb
    cnt = tl.load(cnt_ptr + row)
    for t in range(0, cnt - 1):
        kb = tl.load(idx_ptr + row * NB + t)
        dq = _dq_tile(
            dq, q, do, lse, delta, k_ptr, v_ptr, kvh, kb, offs_m, offs_d, T, D, qk_scale, False, CAUSAL, BLOCK, PREC
        )
    if cnt > 0:
        kb = tl.load(idx_ptr + row * NB + cnt - 1)
        dq = _dq_tile(
            dq, q, do, lse, delta, k_ptr, v_ptr, kvh, kb, offs_m, offs_d, T, D, qk_scale, True, CAUSAL, BLOCK, PREC
        )
    tl.store(dq_ptr + q_off, (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=rows[:, None] & dmask)


@triton.jit
def _dkdv_tile(
    dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, bh, qb, offs_n, offs_d, T, D, qk_scale,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, BLOCK: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    offs_m = qb * BLOCK + tl.arange(0, BLOCK)
    rows = offs_m < T
    q_off = (bh * T + offs_m[:, None]) * D + offs_d[None, :]
    qd_mask = rows[:, None] & (offs_d[None, :] < D)
    q = tl.load(q_ptr + q_off, mask=qd_mask, other=0.0)
    do = tl.load(do_ptr + q_off, mask=qd_mask, other=0.0)
    lse = tl.load(lse_ptr + bh * T + offs_m, mask=rows, other=float("inf"))  # rows past T: p = 0
    delta = tl.load(delta_ptr + bh * T + offs_m, mask=rows, other=0.0)
    p = tl.exp2(_scores(q, k, offs_m, offs_n, T, qk_scale, MASK, CAUSAL, PREC) - lse[:, None])  # [BLOCK_M, BLOCK_N]
    dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PREC)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    ds = p * (dp - delta[:, None])
    dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PREC)
    return dk, dv


@triton.jit
def _bsa_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, idx_ptr, cnt_ptr, sm_scale, qk_scale, T, D, NB,
    H: tl.constexpr, GROUP: tl.constexpr, CAUSAL: tl.constexpr, BLOCK: tl.constexpr, BD: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    """For one query head: dv = P^T dO and dk = sm_scale * dS^T Q over the query blocks that keep
    this key block, added (atomically) into the float32 dk, dv: [B, H / GROUP, T, D] of its key
    head; idx, cnt: the transposed lists (ascending); grid (GROUP, NB, B * H / GROUP), so that the
    query heads of one key head run side by side and their adds meet in L2. A program per query
    head (not per key head) keeps the longest program, a sink block's, at NB tiles.

    Only a key block's first kept query block can hold its diagonal (causal). Keys past T
    need no mask here: they only feed their own rows of dk and dv, which are not stored."""
    g, kb, kvh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bh = kvh * GROUP + g  # query heads of one key head are consecutive, batches too
    offs_n = kb * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BD)
    dmask = offs_d[None, :] < D
    cols = offs_n < T
    row = bh * NB + kb
    cnt = tl.load(cnt_ptr + row)
    k, v = _kv_tile(k_ptr, v_ptr, kvh, offs_n, offs_d, T, D)
    dk = tl.zeros((BLOCK, BD), tl.float32)
    dv = tl.zeros((BLOCK, BD), tl.float32)
    if cnt > 0:
        qb = tl.load(idx_ptr + row * NB)
        dk, dv = _dkdv_tile(
            dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, bh, qb, offs_n, offs_d, T, D, qk_scale,
            CAUSAL, CAUSAL, BLOCK, PREC,
        )  # fmt: skip
    for t in range(1, cnt):
        qb = tl.load(idx_ptr + row * NB + t)
        dk, dv = _dkdv_tile(
            dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, bh, qb, offs_n, offs_d, T, D, qk_scale,
            False, CAUSAL, BLOCK, PREC,
        )  # fmt: skip
    out = (kvh * T + offs_n[:, None]) * D + offs_d[None, :]
    omask = cols[:, None] & dmask
    if GROUP == 1:
        tl.store(dk_ptr + out, dk * sm_scale, mask=omask)
        tl.store(dv_ptr + out, dv, mask=omask)
    else:
        tl.atomic_add(dk_ptr + out, dk * sm_scale, mask=omask, sem="relaxed")
        tl.atomic_add(dv_ptr + out, dv, mask=omask, sem="relaxed")


def block_lists(layout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, n, n]`` bool -> (``idx [N, n, n]`` int32: each row's kept columns first, in
    order; ``cnt [N, n]`` int32: how many)."""
    order = torch.argsort((~layout).to(torch.int8), dim=-1, stable=True)
    return order.to(torch.int32).contiguous(), layout.sum(-1).to(torch.int32).contiguous()


def _meta(q: torch.Tensor, k: torch.Tensor, block_size: int, backward: bool = False) -> dict:
    h, d = q.shape[1], q.shape[3]
    bd = max(16, triton.next_power_of_2(d))
    big = block_size * bd >= 128 * 128
    meta = {
        "H": h,
        "GROUP": h // k.shape[1],
        "BLOCK": block_size,
        "BD": bd,
        "PREC": "ieee" if q.dtype == torch.float32 else "tf32",
        # A 128 x 128 float32 accumulator needs more than 4 warps' registers.
        "num_warps": 8 if big else 4,
    }
    if big and backward:
        # The backward's 128 x 128 tiles need 256 KiB of shared memory at three stages (an
        # H200 has 227 KiB): two.
        meta["num_stages"] = 2
    return meta


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout, block_size, causal, sm_scale):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        b, h, t, d = q.shape
        n = -(-t // block_size)
        if causal:
            layout = layout & torch.ones(n, n, dtype=torch.bool, device=layout.device).tril()
        full = layout.expand(b, h, n, n).reshape(b * h, n, n)
        kv_idx, kv_cnt = block_lists(full)
        o = torch.empty_like(q)
        lse = torch.empty(b, h, t, device=q.device, dtype=torch.float32)
        meta = _meta(q, k, block_size)
        qk_scale = sm_scale * _LOG2E
        _bsa_fwd_kernel[(n, b * h)](q, k, v, o, lse, kv_idx, kv_cnt, qk_scale, t, d, n, CAUSAL=causal, **meta)
        ctx.save_for_backward(q, k, v, o, lse, full, kv_idx, kv_cnt)
        ctx.args = (block_size, causal, sm_scale)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, full, kv_idx, kv_cnt = ctx.saved_tensors
        block_size, causal, sm_scale = ctx.args
        b, h, t, d = q.shape
        n = full.shape[-1]
        do = do.contiguous()
        meta = _meta(q, k, block_size, backward=True)
        delta = torch.empty(b, h, t, device=q.device, dtype=torch.float32)
        rows = b * h * t
        _bsa_bwd_delta_kernel[(triton.cdiv(rows, 64),)](o, do, delta, rows, d, BLOCK_R=64, BD=meta["BD"])
        q_idx, q_cnt = block_lists(full.transpose(1, 2))
        dq = torch.empty_like(q)
        # float32 sums over the query heads of each key head (zeros: a key block no query keeps)
        dk = torch.zeros(k.shape, device=k.device, dtype=torch.float32)
        dv = torch.zeros_like(dk)
        args = (sm_scale, sm_scale * _LOG2E, t, d, n)
        _bsa_bwd_dq_kernel[(n, b * h)](q, k, v, do, lse, delta, dq, kv_idx, kv_cnt, *args, CAUSAL=causal, **meta)
        _bsa_bwd_dkdv_kernel[(meta["GROUP"], n, k.shape[0] * k.shape[1])](
            q, k, v, do, lse, delta, dk, dv, q_idx, q_cnt, *args, CAUSAL=causal, **meta
        )
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: torch.Tensor,
    block_size: int,
    causal: bool,
    sm_scale: float,
) -> torch.Tensor:
    """Block-sparse attention over the kept tiles of ``layout``; differentiable in q, k, v.

    Args:
        q: ``[B, H, T, D]`` queries (float32, float16 or bfloat16).
        k: ``[B, Hk, T, D]`` keys; query head ``h`` reads key head ``h // (H / Hk)``.
        v: ``[B, Hk, T, D]`` values.
        layout: ``[B or 1, H or 1, n, n]`` bool, ``n = ceil(T / block_size)``; every row keeps
            its diagonal tile.
        block_size: Tokens per tile side: 16 to 128, a power of two.
        causal: Drop keys after each query.
        sm_scale: Scale of the scores before the softmax.

    Returns:
        ``[B, H, T, D]`` in q's dtype.
    """
    check_inputs(q, k, v, layout, block_size)
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size={block_size}: the kernel's tiles need a power of two >= 16")
    return _BlockSparseAttention.apply(q, k, v, layout.to(torch.bool), block_size, causal, sm_scale)
