"""W8A8 Triton kernels: int8 activations times int8 weights, accumulated in int32.

* ``per_token_quant``: one program per row of ``x``; the row is loaded once into registers,
  its absmax reduced and its codes written in the same pass (dynamic per-token scales), or
  quantized with a given static scale.
* ``int8_gemm``: a tiled ``tl.dot`` of int8 tiles into an int32 accumulator (exact), with
  the dequantize epilogue fused: per-token (or per-tensor) scale of ``x`` times per-channel
  scale of ``w``, plus bias, stored in the output dtype. Tiles run in L2-friendly groups.

The torch twins with the same parameter names are in :mod:`hfcompress_triton.w8a8_ref`.
The GEMM's tile comes from a heuristic over M (the H200 sweep's best per M range; no
autotune, so the kernels also run under ``TRITON_INTERPRET=1``); ``blocks=`` overrides it,
which is how ``benchmarks/bench_w8a8.py`` sweeps tiles.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import triton
import triton.language as tl

__all__ = ["int8_gemm", "per_token_quant"]


@triton.jit
def _per_token_quant_kernel(
    x_ptr, q_ptr, s_ptr, static_ptr, K, stride_xm, stride_qm, STATIC: tl.constexpr, BLOCK_K: tl.constexpr
):
    """x: [M, K] float -> q: [M, K] int8 and s: [M] float32 (one program per row)."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_K)
    mask = cols < K
    x = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    if STATIC:
        scale = tl.load(static_ptr)
    else:
        scale = tl.maximum(tl.math.div_rn(tl.max(tl.abs(x), axis=0), 127.0), 1.1754943508222875e-38)
    # Round half away from zero on |x|/s, as the twin's torch.round would up to ties (ties
    # are measure-zero for real activations; the tests use values without them).
    v = tl.math.div_rn(x, scale)  # IEEE division, as torch's (a plain / is approximate on CUDA)
    q = tl.where(v >= 0, tl.floor(v + 0.5), -tl.floor(-v + 0.5))
    q = tl.minimum(tl.maximum(q, -128.0), 127.0)
    tl.store(q_ptr + row * stride_qm + cols, q.to(tl.int8), mask=mask)
    # A row holding a NaN or an infinity gets the scale NaN: its codes are numbers, so the
    # scale carries it into the output row (|x| <= FLT_MAX is false for both).
    bad = tl.sum(tl.where(tl.abs(x) <= 3.4028234663852886e38, 0, 1), axis=0)
    tl.store(s_ptr + row, tl.where(bad > 0, float("nan"), scale))


@triton.jit
def _int8_gemm_kernel(
    a_ptr,
    b_ptr,
    sa_ptr,
    sb_ptr,
    bias_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_bn,
    stride_cm,
    PER_TOKEN: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """c: [M, N] = (a: [M, K] int8 @ b: [N, K] int8 ^T) * sa * sb (+ bias), int32 accumulation.

    One program per output tile, in groups of ``GROUP_M`` tile rows so that the programs that
    run together share their ``b`` tiles in L2. ``EVEN_K``: K is a multiple of ``BLOCK_K`` (no
    mask on the K axis)."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    group_rows = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_rows
    pid_n = (pid % width) // group_rows
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # Rows past M and N are clamped to a valid row (their results are not stored), so loads
    # need no row mask.
    ra = tl.where(rm < M, rm, 0)
    rb = tl.where(rn < N, rn, 0)
    a_ptrs = a_ptr + ra[:, None] * stride_am + rk[None, :]
    b_ptrs = b_ptr + rb[:, None] * stride_bn + rk[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=(k0 + rk)[None, :] < K, other=0)
            b = tl.load(b_ptrs, mask=(k0 + rk)[None, :] < K, other=0)
        acc += tl.dot(a, tl.trans(b), out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if PER_TOKEN:
        sa = tl.load(sa_ptr + rm, mask=rm < M, other=0.0)
    else:
        sa = tl.load(sa_ptr + rm * 0)
    sb = tl.load(sb_ptr + rn, mask=rn < N, other=0.0)
    y = acc.to(tl.float32) * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], y.to(c_ptr.dtype.element_ty), mask=mask)


def per_token_quant(x: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x: [M, K]`` (float16/bfloat16/float32, rows contiguous) to int8.

    Returns ``(x_q: [M, K] int8, scale: [M, 1] float32)``; with a static ``scale: [1]`` the
    codes under that scale and the scale per row. A row holding a NaN or an infinity gets the
    scale NaN (an int8 code cannot hold either), so its output row is NaN.
    """
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be a 2-D tensor with contiguous rows, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got {x.dtype}")
    if scale is not None and scale.numel() != 1:
        raise ValueError(f"a static scale must hold one value, got shape {tuple(scale.shape)}")
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    out_scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    static = scale.float().reshape(1).contiguous() if scale is not None else out_scale
    if m:
        _per_token_quant_kernel[(m,)](
            x,
            q,
            out_scale,
            static,
            k,
            x.stride(0),
            q.stride(0),
            STATIC=scale is not None,
            BLOCK_K=triton.next_power_of_2(k),
        )
    return q, out_scale


def _blocks(m: int, n: int, blocks: Mapping[str, int] | None) -> dict[str, int]:
    """The GEMM's tile: the best of the H200 sweep in benchmarks/RESULTS.md ("GPU run on an
    NVIDIA H200", "W8A8 GEMM") for the M range, unless ``blocks`` overrides it."""
    if m <= 16:  # decoding: one row of tiles; wider, deeper tiles for wide layers
        bm, bn, bk, warps, stages = (16, 64, 128, 4, 4) if n <= 4096 else (16, 128, 256, 4, 3)
    elif m < 256:
        bm, bn, bk, warps, stages = 64, 128, 128, 4, 4
    else:
        bm, bn, bk, warps, stages = 128, 128, 128, 8, 3
    chosen = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "num_warps": warps, "num_stages": stages}
    chosen.update(blocks or {})
    return chosen


def int8_gemm(
    x_q: torch.Tensor,
    w_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float16,
    *,
    blocks: Mapping[str, int] | None = None,
) -> torch.Tensor:
    """``y: [M, N] = (x_q @ w_q^T) * x_scale * w_scale + bias`` in ``out_dtype``.

    Args:
        x_q: ``[M, K]`` int8, rows contiguous.
        w_q: ``[N, K]`` int8, rows contiguous.
        x_scale: ``[M, 1]`` float32 (per token) or ``[1]`` (per tensor).
        w_scale: ``[N]`` float32, one per output channel.
        bias: ``[N]`` or None.
        out_dtype: float16, bfloat16 or float32.
        blocks: Overrides of ``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K``, ``num_warps``, ``num_stages``.
    """
    if x_q.dtype != torch.int8 or w_q.dtype != torch.int8:
        raise ValueError(f"x_q and w_q must be int8, got {x_q.dtype} and {w_q.dtype}")
    if x_q.dim() != 2 or w_q.dim() != 2 or x_q.shape[1] != w_q.shape[1]:
        raise ValueError(f"x_q {tuple(x_q.shape)} and w_q {tuple(w_q.shape)} must be [M, K] and [N, K]")
    if x_q.stride(-1) != 1 or w_q.stride(-1) != 1:
        raise ValueError("x_q and w_q must have contiguous rows")
    m, k = x_q.shape
    n = w_q.shape[0]
    per_token = x_scale.numel() != 1
    if per_token and x_scale.numel() != m:
        raise ValueError(f"x_scale {tuple(x_scale.shape)} must be [M, 1] = [{m}, 1] or [1]")
    if w_scale.numel() != n:
        raise ValueError(f"w_scale {tuple(w_scale.shape)} must be [N] = [{n}]")
    if bias is not None and bias.numel() != n:
        raise ValueError(f"bias {tuple(bias.shape)} must be [N] = [{n}]")
    out = torch.empty((m, n), dtype=out_dtype, device=x_q.device)
    if m == 0:
        return out
    cfg = _blocks(m, n, blocks)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _int8_gemm_kernel[grid](
        x_q,
        w_q,
        x_scale.float().contiguous(),
        w_scale.float().contiguous(),
        bias if bias is not None else w_scale,
        out,
        m,
        n,
        k,
        x_q.stride(0),
        w_q.stride(0),
        out.stride(0),
        PER_TOKEN=per_token,
        HAS_BIAS=bias is not None,
        EVEN_K=k % cfg["BLOCK_K"] == 0,
        **cfg,
    )
    return out
