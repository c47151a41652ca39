"""Block-sparse flash attention in Triton, forward and backward, visiting only the kept tiles.

The layout becomes two index lists: for each (batch, head, query block) the kept key blocks
(``kv_idx``, ``kv_cnt``), and for each (batch, head, key block) the query blocks that keep it
(``q_idx``, ``q_cnt``). One program per (query block, batch x head) runs the online softmax
over its kept key blocks (FlashAttention-2's forward) and saves the log-sum-exp; the backward
is FlashAttention-2's in two kernels without atomics: ``dq`` per query block over the same
lists, ``dk, dv`` per key block over the transposed lists, each query head writing its own
``dk, dv`` (grouped-query heads are summed in torch afterwards). The tile is the layout's
block; the head dim is padded to a power of two with masks.

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


@triton.jit
def _scores(q, k, offs_m, offs_n, T, sm_scale, CAUSAL: tl.constexpr, PREC: tl.constexpr):
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * sm_scale
    valid = offs_n[None, :] < T
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None])
    return tl.where(valid, s, float("-inf"))


@triton.jit
def _kv_tile(k_ptr, v_ptr, kvh, offs_n, offs_d, T, D):
    """The keys and values of tokens ``offs_n`` of key head ``kvh`` (zeros past T and past D)."""
    mask = (offs_n[:, None] < T) & (offs_d[None, :] < D)
    off = (kvh * T + offs_n[:, None]) * D + offs_d[None, :]
    return tl.load(k_ptr + off, mask=mask, other=0.0), tl.load(v_ptr + off, mask=mask, other=0.0)


@triton.jit
def _bsa_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, idx_ptr, cnt_ptr, sm_scale, T, D, NB,
    H: tl.constexpr, GROUP: tl.constexpr, CAUSAL: tl.constexpr, BLOCK: tl.constexpr, BD: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    """q, o: [B, H, T, D]; k, v: [B, H / GROUP, T, D]; lse: [B, H, T] float32;
    idx: [B * H, NB, NB] int32 (kept key blocks first); cnt: [B * H, NB]; grid (NB, B * H)."""
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
    for t in range(0, tl.load(cnt_ptr + row)):
        kb = tl.load(idx_ptr + row * NB + t)
        offs_n = kb * BLOCK + tl.arange(0, BLOCK)
        k, v = _kv_tile(k_ptr, v_ptr, kvh, offs_n, offs_d, T, D)
        s = _scores(q, k, offs_m, offs_n, T, sm_scale, CAUSAL, PREC)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows past T see no key
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    rows = offs_m < T
    tl.store(
        o_ptr + (bh * T + offs_m[:, None]) * D + offs_d[None, :],
        o.to(o_ptr.dtype.element_ty),
        mask=rows[:, None] & dmask,
    )
    tl.store(lse_ptr + bh * T + offs_m, m_i + tl.log(l_safe), mask=rows)


@triton.jit
def _bsa_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, idx_ptr, cnt_ptr, sm_scale, T, D, NB,
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
    for t in range(0, tl.load(cnt_ptr + row)):
        kb = tl.load(idx_ptr + row * NB + t)
        offs_n = kb * BLOCK + tl.arange(0, BLOCK)
        k, v = _kv_tile(k_ptr, v_ptr, kvh, offs_n, offs_d, T, D)
        p = tl.exp(_scores(q, k, offs_m, offs_n, T, sm_scale, CAUSAL, PREC) - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    tl.store(dq_ptr + q_off, (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=rows[:, None] & dmask)


@triton.jit
def _bsa_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, idx_ptr, cnt_ptr, sm_scale, T, D, NB,
    H: tl.constexpr, GROUP: tl.constexpr, CAUSAL: tl.constexpr, BLOCK: tl.constexpr, BD: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    """Per query head: dv = P^T dO and dk = sm_scale * dS^T Q over the query blocks that keep
    this key block; dk, dv: [B, H, T, D] float32; idx, cnt: the transposed lists; grid (NB, B * H)."""
    kb, bh = tl.program_id(0), tl.program_id(1)
    kvh = (bh // H) * (H // GROUP) + (bh % H) // GROUP
    offs_n = kb * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BD)
    dmask = offs_d[None, :] < D
    cols = offs_n < T
    k, v = _kv_tile(k_ptr, v_ptr, kvh, offs_n, offs_d, T, D)
    dk = tl.zeros((BLOCK, BD), tl.float32)
    dv = tl.zeros((BLOCK, BD), tl.float32)
    row = bh * NB + kb
    for t in range(0, tl.load(cnt_ptr + row)):
        qb = tl.load(idx_ptr + row * NB + t)
        offs_m = qb * BLOCK + tl.arange(0, BLOCK)
        rows = offs_m < T
        q_off = (bh * T + offs_m[:, None]) * D + offs_d[None, :]
        q = tl.load(q_ptr + q_off, mask=rows[:, None] & dmask, other=0.0)
        do = tl.load(do_ptr + q_off, mask=rows[:, None] & dmask, other=0.0)
        lse = tl.load(lse_ptr + bh * T + offs_m, mask=rows, other=float("inf"))  # rows past T: p = 0
        delta = tl.load(delta_ptr + bh * T + offs_m, mask=rows, other=0.0)
        p = tl.exp(_scores(q, k, offs_m, offs_n, T, sm_scale, CAUSAL, PREC) - lse[:, None])  # [BLOCK_M, BLOCK_N]
        dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PREC)
    out = (bh * T + offs_n[:, None]) * D + offs_d[None, :]
    tl.store(dk_ptr + out, dk * sm_scale, mask=cols[:, None] & dmask)
    tl.store(dv_ptr + out, dv, mask=cols[:, None] & dmask)


def block_lists(layout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, n, n]`` bool -> (``idx [N, n, n]`` int32: each row's kept columns first, in
    order; ``cnt [N, n]`` int32: how many)."""
    order = torch.argsort((~layout).to(torch.int8), dim=-1, stable=True)
    return order.to(torch.int32).contiguous(), layout.sum(-1).to(torch.int32).contiguous()


def _meta(q: torch.Tensor, k: torch.Tensor, block_size: int) -> dict:
    h, d = q.shape[1], q.shape[3]
    bd = max(16, triton.next_power_of_2(d))
    return {
        "H": h,
        "GROUP": h // k.shape[1],
        "BLOCK": block_size,
        "BD": bd,
        "PREC": "ieee" if q.dtype == torch.float32 else "tf32",
        # A 128 x 128 float32 accumulator needs more than 4 warps' registers.
        "num_warps": 8 if block_size * bd >= 128 * 128 else 4,
    }


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
        _bsa_fwd_kernel[(n, b * h)](q, k, v, o, lse, kv_idx, kv_cnt, sm_scale, t, d, n, CAUSAL=causal, **meta)
        ctx.save_for_backward(q, k, v, o, lse, full)
        ctx.args = (block_size, causal, sm_scale)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, full = ctx.saved_tensors
        block_size, causal, sm_scale = ctx.args
        b, h, t, d = q.shape
        n = full.shape[-1]
        do = do.contiguous()
        delta = (o.float() * do.float()).sum(-1)  # [B, H, T]: rowsum(dO * O) of FlashAttention-2
        meta = _meta(q, k, block_size)
        kv_idx, kv_cnt = block_lists(full)
        q_idx, q_cnt = block_lists(full.transpose(1, 2))
        dq = torch.empty_like(q)
        dk = torch.empty(b, h, t, d, device=q.device, dtype=torch.float32)
        dv = torch.empty_like(dk)
        args = (sm_scale, t, d, n)
        _bsa_bwd_dq_kernel[(n, b * h)](q, k, v, do, lse, delta, dq, kv_idx, kv_cnt, *args, CAUSAL=causal, **meta)
        _bsa_bwd_dkdv_kernel[(n, b * h)](q, k, v, do, lse, delta, dk, dv, q_idx, q_cnt, *args, CAUSAL=causal, **meta)
        group = meta["GROUP"]
        dk = dk.view(b, h // group, group, t, d).sum(2).to(k.dtype)
        dv = dv.view(b, h // group, group, t, d).sum(2).to(v.dtype)
        return dq, dk, dv, None, None, None, None


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
