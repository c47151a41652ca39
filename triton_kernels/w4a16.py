"""W4A16 Triton kernels: 4-bit weights, 16/32-bit activations.

Three kernels share the packed layout described in :mod:`hfcompress_triton.w4a16_ref`:

* ``w4_dequantize``: packed weight to an ``[N, K]`` matrix (bit-exact with its reference);
  with cuBLAS after it, the prefill path for larger M (see ``hfcompress.quant.triton_bridge``).
* ``w4a16_gemv``: the decode path, one program per (up to 4 rows of x, block of N), each
  weight tile unpacked once for those rows, reduction over K with vector loads; for small M
  (1 when decoding).
* ``w4a16_gemm``: a fused tiled GEMM; weights are dequantized tile by tile in registers and
  fed to ``tl.dot``. Kept and tested, but ``QuantLinear`` does not use it: on an H200,
  ``w4_dequantize`` followed by cuBLAS was faster at every M measured (benchmarks/RESULTS.md).

Every launcher checks shapes and raises ``ValueError`` naming them. Block sizes are chosen by
a small heuristic rather than autotuned, so the kernels also run under ``TRITON_INTERPRET=1``
(multi-config autotune needs a GPU driver); ``blocks=`` overrides them (``BLOCK_M``,
``BLOCK_N``, ``BLOCK_K``, ``num_warps``, ``num_stages``), which is how
``benchmarks/bench_w4a16.py`` sweeps them on a GPU.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import triton
import triton.language as tl

__all__ = ["w4_dequantize", "w4a16_gemm", "w4a16_gemv"]


@triton.jit
def _load_w_tile(
    qw_ptr, s_ptr, z_ptr, rn, kk, N, K, stride_qn, stride_sn, stride_zn, group_size, HAS_ZEROS: tl.constexpr
):
    """Dequantize the ``[BLOCK_N, BLOCK_K]`` tile at rows ``rn`` and columns ``kk`` to float32."""
    mask = (rn[:, None] < N) & (kk[None, :] < K)
    byte = tl.load(qw_ptr + rn[:, None] * stride_qn + (kk // 2)[None, :], mask=mask, other=0).to(tl.int32)
    q = (byte >> ((kk % 2) * 4)[None, :]) & 0xF
    g = kk // group_size
    s = tl.load(s_ptr + rn[:, None] * stride_sn + g[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        z = tl.load(z_ptr + rn[:, None] * stride_zn + g[None, :], mask=mask, other=0).to(tl.float32)
    else:
        z = 8.0
    return (q.to(tl.float32) - z) * s


@triton.jit
def _w4_dequantize_kernel(
    qw_ptr,
    s_ptr,
    z_ptr,
    out_ptr,
    N,
    K,
    stride_qn,
    stride_sn,
    stride_zn,
    stride_on,
    group_size,
    HAS_ZEROS: tl.constexpr,
    BYTEWISE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out: [N, K] (float32, float16 or bfloat16) from qweight [N, ceil(K/8)*4] uint8, scales/zeros [N, G].

    ``BYTEWISE`` (even group sizes, where a byte's two codes share a group): each byte and its
    group's scale and zero are loaded once for both codes, and the two halves are interleaved
    back into column order in registers.
    """
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    if BYTEWISE:
        jj = tl.program_id(1) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
        even = 2 * jj
        bmask = (rn[:, None] < N) & (even[None, :] < K)
        byte = tl.load(qw_ptr + rn[:, None] * stride_qn + jj[None, :], mask=bmask, other=0).to(tl.int32)
        g = even // group_size
        s = tl.load(s_ptr + rn[:, None] * stride_sn + g[None, :], mask=bmask, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            z = tl.load(z_ptr + rn[:, None] * stride_zn + g[None, :], mask=bmask, other=0).to(tl.float32)
        else:
            z = 8.0
        w = tl.interleave(((byte & 0xF).to(tl.float32) - z) * s, ((byte >> 4).to(tl.float32) - z) * s)
    else:
        w = _load_w_tile(qw_ptr, s_ptr, z_ptr, rn, kk, N, K, stride_qn, stride_sn, stride_zn, group_size, HAS_ZEROS)
    mask = (rn[:, None] < N) & (kk[None, :] < K)
    tl.store(out_ptr + rn[:, None] * stride_on + kk[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _w4a16_gemv_kernel(
    x_ptr,
    qw_ptr,
    s_ptr,
    z_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_qn,
    stride_sn,
    stride_zn,
    stride_ym,
    group_size,
    HAS_ZEROS: tl.constexpr,
    GROUPS_PER_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """y = x @ W.T for x: [M, K] with M small; grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)).

    Each program unpacks its weight tile once for its ``BLOCK_M`` rows of x. With
    ``GROUPS_PER_TILE > 0`` every K tile holds whole groups or lies inside one (the launcher
    checks): each byte is loaded once, its two codes meet the even and odd columns of x, and
    the group's affine map is applied once per group rather than per weight:
    ``sum_k (q_k - z) s x_k = s (sum_k q_k x_k - z sum_k x_k)``. Otherwise (odd or awkward
    group sizes) each weight is dequantized on its own.
    """
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if GROUPS_PER_TILE > 0:
        HALF: tl.constexpr = BLOCK_K // 2
        WIDTH: tl.constexpr = HALF // GROUPS_PER_TILE  # bytes per group within a tile
        for k0 in range(0, K, BLOCK_K):
            jj = k0 // 2 + tl.arange(0, HALF)  # byte columns of this tile
            even = 2 * jj
            byte = tl.load(
                qw_ptr + rn[:, None] * stride_qn + jj[None, :], mask=(rn[:, None] < N) & (even[None, :] < K), other=0
            ).to(tl.int32)  # [BLOCK_N, HALF]
            x_rows = x_ptr + rm[:, None] * stride_xm + even[None, :]
            x_even = tl.load(x_rows, mask=(rm[:, None] < M) & (even[None, :] < K), other=0.0).to(tl.float32)
            x_odd = tl.load(x_rows + 1, mask=(rm[:, None] < M) & (even[None, :] + 1 < K), other=0.0).to(tl.float32)
            lo = (byte & 0xF).to(tl.float32)
            hi = (byte >> 4).to(tl.float32)
            qx = lo[None, :, :] * x_even[:, None, :] + hi[None, :, :] * x_odd[:, None, :]  # [BM, BN, HALF]
            qx = tl.sum(tl.reshape(qx, (BLOCK_M, BLOCK_N, GROUPS_PER_TILE, WIDTH)), axis=3)
            xs = tl.sum(tl.reshape(x_even + x_odd, (BLOCK_M, GROUPS_PER_TILE, WIDTH)), axis=2)  # [BM, GPT]
            g = k0 // group_size + tl.arange(0, GROUPS_PER_TILE)
            gmask = (rn[:, None] < N) & (g[None, :] * group_size < K)
            s = tl.load(s_ptr + rn[:, None] * stride_sn + g[None, :], mask=gmask, other=0.0).to(tl.float32)
            if HAS_ZEROS:
                z = tl.load(z_ptr + rn[:, None] * stride_zn + g[None, :], mask=gmask, other=0).to(tl.float32)
                acc += tl.sum(s[None, :, :] * (qx - z[None, :, :] * xs[:, None, :]), axis=2)
            else:
                acc += tl.sum(s[None, :, :] * (qx - 8.0 * xs[:, None, :]), axis=2)
    else:
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(
                x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0
            ).to(tl.float32)
            w = _load_w_tile(qw_ptr, s_ptr, z_ptr, rn, kk, N, K, stride_qn, stride_sn, stride_zn, group_size, HAS_ZEROS)
            acc += tl.sum(w[None, :, :] * x[:, None, :], axis=2)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _w4a16_gemm_kernel(
    x_ptr,
    qw_ptr,
    s_ptr,
    z_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_qn,
    stride_sn,
    stride_zn,
    stride_ym,
    group_size,
    HAS_ZEROS: tl.constexpr,
    FP32_INPUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """y = x @ W.T for x: [M, K], W: [N, K]; grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N))."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0
        )
        w = _load_w_tile(qw_ptr, s_ptr, z_ptr, rn, kk, N, K, stride_qn, stride_sn, stride_zn, group_size, HAS_ZEROS)
        if FP32_INPUT:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


def _check(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int, in_features: int
) -> None:
    n = qweight.shape[0]
    if qweight.dtype != torch.uint8 or qweight.dim() != 2 or qweight.shape[1] != -(-in_features // 8) * 4:
        raise ValueError(
            f"qweight must be uint8 [N, ceil(K/8)*4] = [{n}, {-(-in_features // 8) * 4}] for K={in_features}, "
            f"got {qweight.dtype} {tuple(qweight.shape)}"
        )
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    groups = -(-in_features // group_size)
    if tuple(scales.shape) != (n, groups):
        raise ValueError(f"scales must be [N, G] = [{n}, {groups}], got {tuple(scales.shape)}")
    if zeros is not None and (tuple(zeros.shape) != (n, groups) or zeros.dtype not in (torch.uint8, scales.dtype)):
        raise ValueError(
            f"zeros must be [{n}, {groups}] uint8 or {scales.dtype} (like scales), or None; got {zeros.dtype} "
            f"{tuple(zeros.shape)}"
        )
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros)):
        if t is not None and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension, got strides {t.stride()}")


def _check_x(x: torch.Tensor, qweight: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.device != qweight.device:
        raise ValueError(f"x is on {x.device} but qweight is on {qweight.device}")


def _zeros_arg(zeros: torch.Tensor | None, scales: torch.Tensor) -> tuple[torch.Tensor, int]:
    return (scales, 0) if zeros is None else (zeros, zeros.stride(0))


def _prepare_matmul(x, qweight, scales, zeros, group_size):
    """Check a matmul's arguments; return contiguous x, the output [M, N], the zeros argument
    and its row stride (a placeholder tensor and 0 when zeros is None)."""
    _check_x(x, qweight)
    _check(qweight, scales, zeros, group_size, x.shape[1])
    x = x.contiguous()
    y = torch.empty(x.shape[0], qweight.shape[0], dtype=x.dtype, device=x.device)
    return (x, y, *_zeros_arg(zeros, scales))


def w4_dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    in_features: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dequantize packed 4-bit weights to ``[N, K]`` in ``dtype`` (computed in float32, rounded once)."""
    _check(qweight, scales, zeros, group_size, in_features)
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
    n = qweight.shape[0]
    out = torch.empty(n, in_features, dtype=dtype, device=qweight.device)
    z, stride_z = _zeros_arg(zeros, scales)
    block_n, block_k = DEQUANTIZE_BLOCKS["BLOCK_N"], DEQUANTIZE_BLOCKS["BLOCK_K"]
    grid = (triton.cdiv(n, block_n), triton.cdiv(in_features, block_k))
    _w4_dequantize_kernel[grid](
        qweight,
        scales,
        z,
        out,
        n,
        in_features,
        qweight.stride(0),
        scales.stride(0),
        stride_z,
        out.stride(0),
        group_size,
        HAS_ZEROS=zeros is not None,
        BYTEWISE=group_size % 2 == 0,
        **DEQUANTIZE_BLOCKS,
    )
    return out


# Default GEMV tiles at M = 1: the best geometric mean over the six layer shapes of the H200
# block sweep in benchmarks/RESULTS.md. For BLOCK_M rows of x, BLOCK_K shrinks by BLOCK_M to
# keep the per-program tile the same size.
GEMV_BLOCKS = {"BLOCK_N": 8, "BLOCK_K": 512, "num_warps": 4}
DEQUANTIZE_BLOCKS = {"BLOCK_N": 16, "BLOCK_K": 256}


def _groups_per_tile(group_size: int, k: int, block_k: int) -> int:
    """Whole groups per K tile of the GEMV's grouped path (1 when a tile lies inside one
    group), or 0 when tiles and groups do not nest and each weight is dequantized alone."""
    if group_size % 2:
        return 0  # a byte's two codes would straddle groups
    if group_size >= k or group_size % block_k == 0:
        return 1
    if block_k % group_size == 0:
        return block_k // group_size
    return 0


def _blocks(defaults: dict[str, int], blocks: Mapping[str, int] | None) -> dict[str, int]:
    """The launch's constexpr block sizes and launch options: ``defaults`` updated by ``blocks``."""
    unknown = set(blocks or ()) - set(defaults) - {"num_warps", "num_stages"}
    if unknown:
        raise ValueError(f"unknown blocks keys {sorted(unknown)}; known: {sorted(defaults)}, num_warps, num_stages")
    return {**defaults, **(blocks or {})}


def w4a16_gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    *,
    blocks: Mapping[str, int] | None = None,
) -> torch.Tensor:
    """``y = x @ W.T`` for small M (decoding): ``x: [M, K]`` -> ``[M, N]`` in ``x.dtype``."""
    x, y, z, stride_z = _prepare_matmul(x, qweight, scales, zeros, group_size)
    (m, k), n = x.shape, qweight.shape[0]
    block_m = min(triton.next_power_of_2(m), 4)
    meta = _blocks({"BLOCK_M": block_m, **GEMV_BLOCKS, "BLOCK_K": GEMV_BLOCKS["BLOCK_K"] // block_m}, blocks)
    grid = (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))
    _w4a16_gemv_kernel[grid](
        x,
        qweight,
        scales,
        z,
        y,
        m,
        n,
        k,
        x.stride(0),
        qweight.stride(0),
        scales.stride(0),
        stride_z,
        y.stride(0),
        group_size,
        HAS_ZEROS=zeros is not None,
        GROUPS_PER_TILE=_groups_per_tile(group_size, k, meta["BLOCK_K"]),
        **meta,
    )
    return y


def w4a16_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    *,
    blocks: Mapping[str, int] | None = None,
) -> torch.Tensor:
    """``y = x @ W.T``, tiled: ``x: [M, K]`` -> ``[M, N]`` in ``x.dtype``, float32 accumulation."""
    x, y, z, stride_z = _prepare_matmul(x, qweight, scales, zeros, group_size)
    (m, k), n = x.shape, qweight.shape[0]
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    meta = _blocks({"BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_K": 64}, blocks)
    grid = (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))
    _w4a16_gemm_kernel[grid](
        x,
        qweight,
        scales,
        z,
        y,
        m,
        n,
        k,
        x.stride(0),
        qweight.stride(0),
        scales.stride(0),
        stride_z,
        y.stride(0),
        group_size,
        HAS_ZEROS=zeros is not None,
        FP32_INPUT=x.dtype == torch.float32,
        **meta,
    )
    return y
