"""The tensor-core W4A16 GEMV: up to 16 rows of float16/bfloat16 x against packed 4-bit
weights (the layout of :mod:`hfcompress_triton.w4a16_ref`), taken by
:func:`hfcompress_triton.w4a16.w4a16_gemv` with ``blocks={"MMA": 1}``.

Each K tile's codes become ``q - z`` exactly in x's dtype (OR-ed into the mantissa of an offset,
two codes to a register by inline PTX on CUDA), ``tl.dot`` multiplies them with x padded to 16
rows, and the group's scale multiplies each tile's sum; K is split over programs through
:mod:`hfcompress_triton.split_k`. Not yet the default: no GPU has measured it.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from hfcompress_triton.split_k import plan_split, split_k_store

__all__ = ["GEMV_MMA_BLOCKS", "MMA_KEYS", "gemv_mma", "mma_block_k", "mma_kernel_fits"]

# The tensor-core GEMV's tiles, taken when ``blocks`` (or ``GEMV_BLOCKS``) holds ``"MMA": 1``;
# not yet measured on a GPU, so not the default. MMA_KEYS: the keys only it reads.
GEMV_MMA_BLOCKS = {"BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 0, "ASM": 1, "PERMUTE": 1, "num_warps": 4, "num_stages": 3}
MMA_KEYS = ("MMA", "ASM", "PERMUTE")


def mma_block_k(k: int, group_size: int, block_k: int) -> int:
    """The tensor-core GEMV's K tile: ``block_k``, halved until it divides the group size (a
    tile must lie inside one group); 0 when that leaves less than the tensor cores' 16."""
    if group_size < k:
        while block_k >= 16 and group_size % block_k:
            block_k //= 2
    return block_k if block_k >= 16 else 0


def mma_kernel_fits(x: torch.Tensor, zeros: torch.Tensor | None, group_size: int, block_k: int) -> bool:
    """Whether the tensor-core GEMV can take this call: at most 16 rows of float16/bfloat16 x,
    integer zeros (or none), and a K tile of at least 16 inside one group."""
    m, k = x.shape
    return (
        m <= 16
        and x.dtype in (torch.float16, torch.bfloat16)
        and (zeros is None or zeros.dtype == torch.uint8)
        and mma_block_k(k, group_size, block_k) > 0
    )


def _unpack_asm(magic: str) -> str:
    """The PTX of ``_codes_plus_offset``: four bytes in ``$4`` (one per element, byte i =
    element i) to their low codes in ``$0`` (elements 0, 1) and ``$1`` (2, 3) and their high
    codes in ``$2``, ``$3``, each 16-bit half ``magic | code``. ``prmt`` spreads bytes 0, 1 (2, 3)
    to the two halves, ``shr`` brings the high nibbles down, ``lop3`` 0xEA is ``(a & b) | c``."""
    return f"""{{
    .reg .b32 t0, t1, u0, u1;
    prmt.b32 t0, $4, 0, 0x4140;
    prmt.b32 t1, $4, 0, 0x4342;
    shr.u32 u0, t0, 4;
    shr.u32 u1, t1, 4;
    lop3.b32 $0, t0, 0x000F000F, {magic}, 0xEA;
    lop3.b32 $1, t1, 0x000F000F, {magic}, 0xEA;
    lop3.b32 $2, u0, 0x000F000F, {magic}, 0xEA;
    lop3.b32 $3, u1, 0x000F000F, {magic}, 0xEA;
    }}"""


# bfloat16 128 and float16 1024 in both halves: a code OR-ed into the mantissa is 128 + q / 1024 + q.
_UNPACK_BF16 = tl.constexpr(_unpack_asm("0x43004300"))
_UNPACK_F16 = tl.constexpr(_unpack_asm("0x64006400"))


@triton.jit
def _codes_plus_offset(byte, ASM: tl.constexpr, dtype: tl.constexpr):
    """The low and high codes of ``byte`` (uint8) as ``OFFSET + q`` in ``dtype`` (float16: 1024,
    bfloat16: 128), exactly: the code OR-ed into the offset's mantissa, with no int-to-float
    conversion. ``ASM`` (CUDA only, not the interpreter): four bytes per two ``prmt`` and four
    ``lop3`` instructions, two codes to a 32-bit register (``_unpack_asm``)."""
    if ASM:
        if dtype == tl.bfloat16:
            lo, hi = tl.inline_asm_elementwise(
                asm=_UNPACK_BF16, constraints="=r,=r,=r,=r,r", args=[byte], dtype=(tl.bfloat16, tl.bfloat16),
                is_pure=True, pack=4,
            )  # fmt: skip
        else:
            lo, hi = tl.inline_asm_elementwise(
                asm=_UNPACK_F16, constraints="=r,=r,=r,=r,r", args=[byte], dtype=(tl.float16, tl.float16),
                is_pure=True, pack=4,
            )  # fmt: skip
    else:
        magic: tl.constexpr = 0x4300 if dtype == tl.bfloat16 else 0x6400
        b = byte.to(tl.int16)
        lo = ((b & 15) | magic).to(dtype, bitcast=True)
        hi = ((b >> 4) | magic).to(dtype, bitcast=True)
    return lo, hi


@triton.jit
def _group_scale_zero(s_ptr, z_ptr, rn, g, N, stride_sn, stride_zn, HAS_ZEROS: tl.constexpr, EVEN: tl.constexpr):
    """Rows ``rn``'s scale and zero (float32; 8 when symmetric) of group ``g``."""
    if EVEN:
        s = tl.load(s_ptr + rn * stride_sn + g).to(tl.float32)
        z = tl.load(z_ptr + rn * stride_zn + g).to(tl.float32) if HAS_ZEROS else 8.0
    else:
        s = tl.load(s_ptr + rn * stride_sn + g, mask=rn < N, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rn * stride_zn + g, mask=rn < N, other=0).to(tl.float32) if HAS_ZEROS else 8.0
    return s, z


@triton.jit
def _w4a16_gemv_mma_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, stride_xm, stride_qn, stride_sn, stride_zn,
    stride_ym, K_SPLIT, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, EVEN: tl.constexpr, SPLIT_K: tl.constexpr,
    ASM: tl.constexpr, PERMUTE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """y = x @ W.T for up to 16 rows of x (float16/bfloat16) on tensor cores; grid
    (cdiv(N, BLOCK_N), SPLIT_K), program (n, s) covers rows n of W and the s-th ``K_SPLIT``
    columns. ``GROUP``: the group size, a multiple of ``BLOCK_K`` (0: one group per row).

    Each K tile lies inside one group. Its codes become ``q - z`` exactly in x's dtype (the
    code OR-ed into the mantissa of an offset, minus offset + z: two codes per packed
    instruction), ``tl.dot`` multiplies them with x (padded to 16 rows) into float32, and the
    group's scale multiplies the tile's sum once per output. M = 1 wastes 15/16 of the tensor
    cores' work, which does not matter at decode sizes, where the loop's cost is unpacking
    codes: compiled for sm_90 at 128 x 128 tiles it issues 3.5 instructions per weight (the
    tile kernel: 6-9). The codes travel to shared memory by asynchronous copies, pipelined
    over ``num_stages``. ``PERMUTE``: the tile's columns are taken in the order in which the
    tensor cores' register layout holds them, so that each thread's codes are contiguous bytes
    (one vector load from shared memory instead of one per byte), x gathered in the same
    order; 2 also puts all low nibbles before all high ones, so that the unpack's packed pairs
    of codes are the tensor cores' pairs as they are (3.1 instructions per weight, but x is
    then gathered by plain loads instead of asynchronous copies). See ``split_k_store`` for
    ``SPLIT_K > 1``.
    """
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    OFFSET: tl.constexpr = 128.0 if dtype == tl.bfloat16 else 1024.0
    pid_n = tl.program_id(0)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, 16)
    rb = tl.arange(0, BLOCK_K // 2)
    rk = tl.arange(0, BLOCK_K)
    if PERMUTE == 2:
        # logical k = hsel * BLOCK_K / 2 + j, j = 16b + 8h + 2t + e: nibble hsel of physical byte
        # BLOCK_K / 8 * t + 4b + 2h + e
        j = rk % (BLOCK_K // 2)
        pk = 2 * (BLOCK_K // 8 * ((j // 2) % 4) + 4 * (j // 16) + 2 * ((j // 8) % 2) + j % 2) + rk // (BLOCK_K // 2)
    elif PERMUTE:
        # logical k = 16b + 8h + 2t + e reads physical column 2 * (BLOCK_K / 8 * t + 2b + h) + e
        pk = 2 * (BLOCK_K // 8 * ((rk // 2) % 4) + 2 * (rk // 16) + (rk // 8) % 2) + rk % 2
    else:
        pk = rk
    acc = tl.zeros([BLOCK_N, 16], dtype=tl.float32)
    k_start = tl.program_id(1) * K_SPLIT
    k_end = tl.minimum(k_start + K_SPLIT, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        s, z = _group_scale_zero(
            s_ptr, z_ptr, rn, k0 // GROUP if GROUP else 0, N, stride_sn, stride_zn, HAS_ZEROS, EVEN
        )  # fmt: skip
        w_ptrs = qw_ptr + rn[:, None] * stride_qn + (k0 // 2 + rb)[None, :]
        x_ptrs = x_ptr + rm[None, :] * stride_xm + (k0 + pk)[:, None]  # x.T: [BLOCK_K, 16]
        if EVEN:
            byte = tl.load(w_ptrs)
            xt = tl.load(x_ptrs, mask=rm[None, :] < M, other=0.0)
        else:
            byte = tl.load(w_ptrs, mask=(rn[:, None] < N) & (k0 + 2 * rb < K)[None, :], other=0)
            xt = tl.load(x_ptrs, mask=(rm[None, :] < M) & (k0 + pk < K)[:, None], other=0.0)
        if PERMUTE == 2:
            byte = tl.permute(tl.reshape(byte, [BLOCK_N, 4, BLOCK_K // 32, 2, 2]), [0, 2, 3, 1, 4])  # [n, b, h, t, e]
            byte = tl.reshape(byte, [BLOCK_N, BLOCK_K // 2])
        elif PERMUTE:
            byte = tl.permute(tl.reshape(byte, [BLOCK_N, 4, BLOCK_K // 16, 2]), [0, 2, 3, 1])  # [n, b, h, t]
            byte = tl.reshape(byte, [BLOCK_N, BLOCK_K // 2])
        lo, hi = _codes_plus_offset(byte, ASM, dtype)
        if HAS_ZEROS:
            c = (z + OFFSET).to(dtype)[:, None]  # an integer zero plus the offset: exact
        else:
            c = tl.full([1, 1], 8.0 + OFFSET, dtype)
        if PERMUTE == 2:  # all low nibbles, then all high ones
            w = tl.reshape(tl.permute(tl.join(lo - c, hi - c), [0, 2, 1]), [BLOCK_N, BLOCK_K])
        else:  # a byte's two nibbles side by side
            w = tl.reshape(tl.join(lo - c, hi - c), [BLOCK_N, BLOCK_K])
        acc += tl.dot(w, xt) * s[:, None]
    out_mask = (rn[:, None] < N) & (rm[None, :] < M)
    slot = rm[None, :] * N + rn[:, None]
    split_k_store(y_ptr + rm[None, :] * stride_ym + rn[:, None], ws_ptr + slot, cnt_ptr + slot, acc, out_mask, SPLIT_K)


def gemv_mma(x, qweight, scales, z, stride_z, has_zeros, group_size, y, meta) -> torch.Tensor:
    (m, k), n = x.shape, qweight.shape[0]
    block_n, block_k = meta["BLOCK_N"], mma_block_k(k, group_size, meta["BLOCK_K"])
    row_blocks = triton.cdiv(n, block_n)
    split, tiles_per_split, ws, cnt = plan_split(meta["SPLIT_K"], triton.cdiv(k, block_k), row_blocks, y)
    launch = {key: meta[key] for key in ("num_warps", "num_stages") if key in meta}
    _w4a16_gemv_mma_kernel[(row_blocks, split)](
        x, qweight, scales, z, y, ws, cnt, m, n, k, x.stride(0), qweight.stride(0), scales.stride(0), stride_z,
        y.stride(0), tiles_per_split * block_k, GROUP=group_size if group_size < k else 0,
        HAS_ZEROS=has_zeros, EVEN=n % block_n == 0 and k % block_k == 0, SPLIT_K=split,
        ASM=meta["ASM"] and x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1",
        PERMUTE=1 if meta["PERMUTE"] == 2 and block_k < 32 else meta["PERMUTE"],  # 2 needs two 16-column blocks
        BLOCK_N=block_n, BLOCK_K=block_k, **launch,
    )  # fmt: skip
    return y
