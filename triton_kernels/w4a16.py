"""W4A16 Triton kernels: 4-bit weights, 16/32-bit activations.

Three launchers share the packed layout described in :mod:`hfcompress_triton.w4a16_ref`:

* ``w4_dequantize``: packed weight to an ``[N, K]`` matrix (bit-exact with its reference);
  with cuBLAS after it, the prefill path for larger M (see ``hfcompress.quant.triton_bridge``).
* ``w4a16_gemv``: the decode path, one program per (up to 4 rows of x, block of N, part of
  K), each weight tile unpacked once for those rows (codes to floats without int-to-float
  conversions), products accumulated elementwise over K and reduced once; for small M (1 when
  decoding). ``"SPLIT_K"`` splits K (0: automatic) through a self-resetting workspace.
  With ``blocks={"MMA": 1}`` it runs a second kernel instead, for up to 16 rows of half-precision
  x: codes unpacked two to a register into ``q - z`` and multiplied on tensor cores, split over
  K with a self-resetting workspace (:mod:`hfcompress_triton.w4a16_mma`); not yet the default,
  as no GPU has measured it. Split K for both: :mod:`hfcompress_triton.split_k`.
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
from hfcompress_triton.split_k import plan_split, split_k_store
from hfcompress_triton.w4a16_mma import GEMV_MMA_BLOCKS, MMA_KEYS, gemv_mma, mma_kernel_fits

__all__ = ["w4_dequantize", "w4a16_gemm", "w4a16_gemv"]


@triton.jit
def _code_plus_2_23(q):
    """A 4-bit code (int32 in [0, 15]) plus 2**23 as float32, exactly, without an int-to-float
    conversion (a quarter-rate instruction on NVIDIA GPUs that bounds the unpacking): the code
    becomes the low mantissa bits of 2**23."""
    return (q | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def _code_to_float(q):
    """A 4-bit code (int32 in [0, 15]) as float32, exactly (see ``_code_plus_2_23``)."""
    return _code_plus_2_23(q) - 8388608.0


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
    return (_code_to_float(q) - z) * s


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
        w = tl.interleave((_code_to_float(byte & 0xF) - z) * s, (_code_to_float(byte >> 4) - z) * s)
    else:
        w = _load_w_tile(qw_ptr, s_ptr, z_ptr, rn, kk, N, K, stride_qn, stride_sn, stride_zn, group_size, HAS_ZEROS)
    mask = (rn[:, None] < N) & (kk[None, :] < K)
    tl.store(out_ptr + rn[:, None] * stride_on + kk[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemv_group_tile(
    x_ptr, qw_ptr, s_ptr, z_ptr, rm, rn, j0, M, N, K, KB, stride_xm, stride_qn, stride_sn, stride_zn, group_size,
    HAS_ZEROS: tl.constexpr, EVEN: tl.constexpr, GROUPS_PER_TILE: tl.constexpr, WIDTH: tl.constexpr,
):  # fmt: skip
    """The GEMV's tile at byte column ``j0`` of rows ``rn``: the even and odd columns' codes plus
    2**23 (``lo, hi``: ``[BLOCK_N, GPT, WIDTH]`` float32, see ``_code_plus_2_23``), each group's
    zero plus 2**23 and scale (``c, s``: ``[BLOCK_N, GPT, 1]``), so that a weight is
    ``(lo - c) * s`` with one exact subtraction (float zeros: the codes and zeros as they are);
    and the matching columns of x (``[BLOCK_M, GPT, WIDTH]``). ``EVEN``: nothing in the tile
    is out of bounds (no masks)."""
    gi = tl.arange(0, GROUPS_PER_TILE)
    jj = j0 + gi[:, None] * WIDTH + tl.arange(0, WIDTH)[None, :]  # [GPT, WIDTH] byte columns
    w_ptrs = qw_ptr + rn[:, None, None] * stride_qn + jj[None, :, :]
    even = 2 * jj[None, :, :]  # [1, GPT, WIDTH]
    x_rows = x_ptr + rm[:, None, None] * stride_xm + even
    g = (2 * j0) // group_size + gi  # [GPT]
    s_ptrs = s_ptr + rn[:, None] * stride_sn + g[None, :]
    z_ptrs = z_ptr + rn[:, None] * stride_zn + g[None, :]
    if EVEN:
        byte = tl.load(w_ptrs).to(tl.int32)
        x_even = tl.load(x_rows).to(tl.float32)
        x_odd = tl.load(x_rows + 1).to(tl.float32)
        s = tl.load(s_ptrs).to(tl.float32)
        z = tl.load(z_ptrs).to(tl.float32) if HAS_ZEROS else 8.0
    else:
        byte = tl.load(w_ptrs, mask=(rn[:, None, None] < N) & (jj[None, :, :] < KB), other=0).to(tl.int32)
        xm = rm[:, None, None] < M
        x_even = tl.load(x_rows, mask=xm & (even < K), other=0.0).to(tl.float32)
        x_odd = tl.load(x_rows + 1, mask=xm & (even + 1 < K), other=0.0).to(tl.float32)
        gmask = (rn[:, None] < N) & (g[None, :] * group_size < K)
        s = tl.load(s_ptrs, mask=gmask, other=0.0).to(tl.float32)
        z = tl.load(z_ptrs, mask=gmask, other=0).to(tl.float32) if HAS_ZEROS else 8.0
    lo = _code_plus_2_23(byte & 0xF)
    hi = _code_plus_2_23(byte >> 4)
    if not HAS_ZEROS:
        c = 8388616.0  # the symmetric zero, 8
    elif z_ptr.dtype.element_ty == tl.uint8:
        c = z[:, :, None] + 8388608.0  # an integer zero: exact
    else:  # a float zero (HQQ-style) would be rounded: take 2**23 off the codes instead
        lo -= 8388608.0
        hi -= 8388608.0
        c = z[:, :, None]
    return lo, hi, c, s[:, :, None], x_even, x_odd


@triton.jit
def _w4a16_gemv_kernel(
    x_ptr,
    qw_ptr,
    s_ptr,
    z_ptr,
    y_ptr,
    ws_ptr,
    cnt_ptr,
    M,
    N,
    K,
    KB,
    KB_SPLIT,
    stride_xm,
    stride_qn,
    stride_sn,
    stride_zn,
    stride_ym,
    group_size,
    HAS_ZEROS: tl.constexpr,
    GROUPS_PER_TILE: tl.constexpr,
    EVEN: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """y = x @ W.T for x: [M, K] with M small; grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N),
    SPLIT_K): program (m, n, s) covers byte columns ``[s * KB_SPLIT, (s + 1) * KB_SPLIT)`` of
    the packed rows (``KB_SPLIT`` a multiple of the tile, ``BLOCK_K // 2`` bytes); with
    ``SPLIT_K > 1`` the parts add up through ``split_k_store``'s workspace.

    Each program unpacks its weight tile once for its ``BLOCK_M`` rows of x. With
    ``GROUPS_PER_TILE > 0`` every K tile holds whole groups or lies inside one (the launcher
    checks): each byte is loaded once, its two codes meet the even and odd columns of x, and
    each group's scale and zero are loaded once per tile. Otherwise (odd or awkward group
    sizes) each weight's scale and zero are gathered on their own.
    """
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    if SPLIT_K == 1:
        jb, je = 0, KB
    else:
        jb = tl.program_id(2) * KB_SPLIT
        je = tl.minimum(jb + KB_SPLIT, KB)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if GROUPS_PER_TILE > 0:
        # The tile is [BLOCK_N, GROUPS_PER_TILE, WIDTH] bytes (WIDTH bytes of each group), so a
        # group's scale and zero broadcast along the last axis. Products are accumulated
        # elementwise across the whole K loop and reduced once at the end: no reduction across
        # threads inside the loop. The loop runs over bytes (KB = ceil(K / 2) per row), so the
        # compiler sees the tile's alignment and loads 16 bytes at a time.
        HALF: tl.constexpr = BLOCK_K // 2
        WIDTH: tl.constexpr = HALF // GROUPS_PER_TILE  # bytes per group within a tile
        if BLOCK_M == 1:  # decoding: a 3-D accumulator (a 4-D one costs layout conversions)
            acc3 = tl.zeros([BLOCK_N, GROUPS_PER_TILE, WIDTH], dtype=tl.float32)
            for j0 in range(jb, je, HALF):
                lo, hi, c, s, x_even, x_odd = _gemv_group_tile(
                    x_ptr, qw_ptr, s_ptr, z_ptr, rm, rn, j0, M, N, K, KB, stride_xm, stride_qn, stride_sn,
                    stride_zn, group_size, HAS_ZEROS, EVEN, GROUPS_PER_TILE, WIDTH,
                )  # fmt: skip
                # x: [1, GPT, WIDTH], broadcast over the rows; the scale once per pair of codes
                acc3 += s * ((lo - c) * x_even + (hi - c) * x_odd)
            acc = tl.sum(tl.sum(acc3, axis=2), axis=1)[None, :]
        else:
            acc4 = tl.zeros([BLOCK_M, BLOCK_N, GROUPS_PER_TILE, WIDTH], dtype=tl.float32)
            for j0 in range(jb, je, HALF):
                lo, hi, c, s, x_even, x_odd = _gemv_group_tile(
                    x_ptr, qw_ptr, s_ptr, z_ptr, rm, rn, j0, M, N, K, KB, stride_xm, stride_qn, stride_sn,
                    stride_zn, group_size, HAS_ZEROS, EVEN, GROUPS_PER_TILE, WIDTH,
                )  # fmt: skip
                w_lo = (lo - c) * s  # dequantized once for the BLOCK_M rows
                w_hi = (hi - c) * s
                acc4 += w_lo[None, :, :, :] * x_even[:, None, :, :] + w_hi[None, :, :, :] * x_odd[:, None, :, :]
            acc = tl.sum(tl.sum(acc4, axis=3), axis=2)
    else:
        for k0 in range(2 * jb, tl.minimum(2 * je, K), BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(
                x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0
            ).to(tl.float32)
            w = _load_w_tile(qw_ptr, s_ptr, z_ptr, rn, kk, N, K, stride_qn, stride_sn, stride_zn, group_size, HAS_ZEROS)
            acc += tl.sum(w[None, :, :] * x[:, None, :], axis=2)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    slot = rm[:, None] * N + rn[None, :]
    split_k_store(y_ptr + rm[:, None] * stride_ym + rn[None, :], ws_ptr + slot, cnt_ptr + slot, acc, mask, SPLIT_K)


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


# Default GEMV tiles at M = 1: the best geometric mean over the 7B layer shapes of the H200
# block sweep of 2026-12-04 (benchmarks/RESULTS.md, "GPU run 2026-12-04"). For BLOCK_M rows of
# x, BLOCK_K shrinks by BLOCK_M to keep the per-program tile the same size.
GEMV_BLOCKS = {"BLOCK_N": 16, "BLOCK_K": 512, "SPLIT_K": 1, "num_warps": 4}
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
    """``y = x @ W.T`` for small M (decoding): ``x: [M, K]`` -> ``[M, N]`` in ``x.dtype``.

    ``blocks`` (over ``GEMV_BLOCKS``): ``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K``, ``SPLIT_K`` (the
    parts K is split into, their sums added in a float32 workspace; 0: enough parts for
    ``SPLIT_PROGRAMS_PER_SM`` programs per multiprocessor), ``num_warps``, ``num_stages``.
    With ``"MMA": 1``, calls that fit (up to 16 rows of float16/bfloat16 x, integer zeros, K
    tiles inside a group) go to the tensor-core kernel (:mod:`hfcompress_triton.w4a16_mma`), its codes
    unpacked by inline PTX with ``"ASM": 1`` on CUDA; other calls take the tile kernel."""
    x, y, z, stride_z = _prepare_matmul(x, qweight, scales, zeros, group_size)
    (m, k), n = x.shape, qweight.shape[0]
    if m == 0:
        return y
    if (blocks or {}).get("MMA", GEMV_BLOCKS.get("MMA")):  # the module default's tiles only if it is MMA too
        chosen = {**(GEMV_BLOCKS if GEMV_BLOCKS.get("MMA") else {}), **(blocks or {})}
        meta = _blocks({**GEMV_MMA_BLOCKS, "MMA": 1}, {key: v for key, v in chosen.items() if key != "BLOCK_M"})
        if mma_kernel_fits(x, zeros, group_size, meta["BLOCK_K"]):
            return gemv_mma(x, qweight, scales, z, stride_z, zeros is not None, group_size, y, meta)
    block_m = min(triton.next_power_of_2(m), 4)
    tile = {key: v for key, v in GEMV_BLOCKS.items() if key not in MMA_KEYS}
    meta = _blocks(
        {"BLOCK_M": block_m, **tile, "BLOCK_K": tile["BLOCK_K"] // block_m},
        {key: v for key, v in (blocks or {}).items() if key not in MMA_KEYS},
    )
    grid = (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))
    split_k = meta.pop("SPLIT_K", 1)
    split, tiles_per_split, ws, cnt = plan_split(split_k, triton.cdiv(k, meta["BLOCK_K"]), grid[0] * grid[1], y)
    _w4a16_gemv_kernel[(*grid, split)](
        x,
        qweight,
        scales,
        z,
        y,
        ws,
        cnt,
        m,
        n,
        k,
        (k + 1) // 2,
        tiles_per_split * meta["BLOCK_K"] // 2,
        x.stride(0),
        qweight.stride(0),
        scales.stride(0),
        stride_z,
        y.stride(0),
        group_size,
        HAS_ZEROS=zeros is not None,
        GROUPS_PER_TILE=_groups_per_tile(group_size, k, meta["BLOCK_K"]),
        EVEN=m % meta["BLOCK_M"] == 0 and n % meta["BLOCK_N"] == 0 and k % meta["BLOCK_K"] == 0 and k % group_size == 0,
        SPLIT_K=split,
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
