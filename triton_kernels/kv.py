"""KV-cache Triton kernels: quantize-and-pack on append, and decode attention that reads the
packed cache.

* ``kv_quantize``: keys per channel (one program per ``group_size`` tokens of one head: the
  min and max of each channel over those tokens) or values per token (one program per token
  of one head: the min and max of each channel group), written packed in one pass.
* ``kv_decode_attention``: one query step over the packed keys and values, split-K over the
  sequence (flash-decoding): each program takes the query heads that share one KV head and one
  slice of the tokens, unpacks and dequantizes each block of keys and values in registers,
  and keeps an online softmax; a small torch reduction merges the slices. Grouped-query heads
  read their KV head once per block, never a repeated copy.

The torch twins with the same parameter names are in :mod:`hfcompress_triton.kv_ref`.
Block sizes come from the shapes (no autotune), so the kernels run under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from hfcompress_triton.device import multiprocessors
from hfcompress_triton.kv_ref import MIN_SCALE as _MIN_SCALE
from hfcompress_triton.kv_ref import Axis, block_strides, value_group_size

# A kernel reads module globals only as constexprs.
_MIN_SCALE_C = tl.constexpr(_MIN_SCALE)

__all__ = ["dot_kernel_fits", "kv_decode_attention", "kv_quantize"]


@triton.jit
def _round_codes(x, zero, scale, QMAX: tl.constexpr):
    # floor((x - zero) / scale + 0.5), clamped: the twin's rounding, with an IEEE division.
    v = tl.math.div_rn(x - zero, scale)
    return tl.minimum(tl.maximum(tl.floor(v + 0.5), 0.0), QMAX)


@triton.jit
def _kv_quantize_channel_kernel(
    x_ptr, p_ptr, s_ptr, z_ptr, D, G: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr, W: tl.constexpr
):
    """Keys. x: [BH, T, D]; p: [BH, T, D/PER] uint8; s, z: [BH, T/G, D]; grid (BH, T/G)."""
    bh, grp = tl.program_id(0), tl.program_id(1)
    t = tl.arange(0, G)[:, None, None]
    i = tl.arange(0, PER)[None, :, None]
    j = tl.arange(0, W)[None, None, :]
    ch = i * W + j  # [1, PER, W]: channel of bits [i*BITS, ...) of byte j
    n_tok = tl.num_programs(1) * G
    x = tl.load(x_ptr + (bh * n_tok + grp * G + t) * D + ch).to(tl.float32)  # [G, PER, W]
    lo, hi = tl.min(x, axis=0), tl.max(x, axis=0)  # [PER, W]
    QMAX: tl.constexpr = (1 << BITS) - 1
    scale = tl.maximum(tl.math.div_rn(hi - lo, QMAX * 1.0), _MIN_SCALE_C).to(s_ptr.dtype.element_ty)
    zero = lo.to(z_ptr.dtype.element_ty)
    row = (bh * tl.num_programs(1) + grp) * D + tl.reshape(ch, (PER, W))
    tl.store(s_ptr + row, scale)
    tl.store(z_ptr + row, zero)
    codes = _round_codes(x, zero.to(tl.float32)[None], scale.to(tl.float32)[None], QMAX).to(tl.int32)
    packed = tl.sum(codes << (i * BITS), axis=1)  # [G, W]: bit fields do not overlap, so sum == or
    tok = tl.arange(0, G)[:, None]
    tl.store(p_ptr + (bh * n_tok + grp * G + tok) * W + tl.arange(0, W)[None, :], packed.to(tl.uint8))


@triton.jit
def _kv_quantize_token_kernel(
    x_ptr,
    p_ptr,
    s_ptr,
    z_ptr,
    D,
    GV: tl.constexpr,
    NG: tl.constexpr,
    BITS: tl.constexpr,
    PER: tl.constexpr,
    W: tl.constexpr,
):
    """Values. x: [N, D] (N = BH * T tokens); p: [N, D/PER] uint8; s, z: [N, D/GV]; grid (N,)."""
    tok = tl.program_id(0)
    i = tl.arange(0, PER)[:, None]
    j = tl.arange(0, W)[None, :]
    ch = i * W + j  # [PER, W]
    x = tl.load(x_ptr + tok * D + ch).to(tl.float32)
    group = ch // GV
    QMAX: tl.constexpr = (1 << BITS) - 1
    lo = tl.zeros((PER, W), tl.float32)
    sc = tl.zeros((PER, W), tl.float32)
    for g in tl.static_range(NG):
        in_g = group == g
        g_lo = tl.min(tl.min(tl.where(in_g, x, float("inf")), axis=1), axis=0)
        g_hi = tl.max(tl.max(tl.where(in_g, x, float("-inf")), axis=1), axis=0)
        g_scale = tl.maximum(tl.math.div_rn(g_hi - g_lo, QMAX * 1.0), _MIN_SCALE_C).to(s_ptr.dtype.element_ty)
        g_zero = g_lo.to(z_ptr.dtype.element_ty)
        tl.store(s_ptr + tok * NG + g, g_scale)
        tl.store(z_ptr + tok * NG + g, g_zero)
        sc = tl.where(in_g, g_scale.to(tl.float32), sc)
        lo = tl.where(in_g, g_zero.to(tl.float32), lo)
    codes = _round_codes(x, lo, sc, QMAX).to(tl.int32)
    packed = tl.sum(codes << (i * BITS), axis=0)  # [W]
    tl.store(p_ptr + tok * W + tl.arange(0, W), packed.to(tl.uint8))


def _check_pow2(name: str, value: int) -> None:
    if value < 1 or value & (value - 1):
        raise ValueError(f"the Triton KV kernels need a power-of-two {name}, got {value}")


def kv_quantize(
    x: torch.Tensor, bits: int, group_size: int, axis: Axis, scale_dtype: torch.dtype = torch.float16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize and pack ``x: [B, H, T, D]``: see :func:`hfcompress_triton.kv_ref.kv_quantize_ref`."""
    if bits not in (2, 4, 8):
        raise ValueError(f"bits must be 2, 4 or 8, got {bits}")
    b, h, t, d = x.shape
    per = 8 // bits
    _check_pow2("head dim", d)
    _check_pow2("group size", group_size)
    x = x.contiguous()
    packed = torch.empty(b, h, t, d // per, dtype=torch.uint8, device=x.device)
    if axis == "channel":
        if t % group_size:
            raise ValueError(f"per-channel key quantization needs whole groups: {t} tokens, group {group_size}")
        scale = torch.empty(b, h, t // group_size, d, dtype=scale_dtype, device=x.device)
        zero = torch.empty_like(scale)
        if t:
            _kv_quantize_channel_kernel[(b * h, t // group_size)](
                x, packed, scale, zero, d, G=group_size, BITS=bits, PER=per, W=d // per
            )
    else:
        gv = value_group_size(group_size, d)
        scale = torch.empty(b, h, t, d // gv, dtype=scale_dtype, device=x.device)
        zero = torch.empty_like(scale)
        if t:
            _kv_quantize_token_kernel[(b * h * t,)](
                x, packed, scale, zero, d, GV=gv, NG=d // gv, BITS=bits, PER=per, W=d // per
            )
    return packed, scale, zero


@triton.jit
def _unpack(p_ptr, rows, valid, BITS: tl.constexpr, PER: tl.constexpr, W: tl.constexpr, D: tl.constexpr):
    """Codes [BLOCK_T, D] (float32) of the packed rows ``rows: [BLOCK_T, 1]``."""
    i = tl.arange(0, PER)[None, :, None]
    j = tl.arange(0, W)[None, None, :]
    byte = tl.load(p_ptr + rows[:, :, None] * W + j, mask=valid[:, :, None], other=0).to(tl.int32)  # [T, 1, W]
    codes = (byte >> (i * BITS)) & ((1 << BITS) - 1)  # [T, PER, W]: channel i*W + j
    return tl.reshape(codes, (rows.shape[0], D)).to(tl.float32)


@triton.jit
def _softmax_step(s, t, ok, m_i, bias_row, HAS_BIAS: tl.constexpr):
    """One block of the online softmax: the scores ``s: [R, BLOCK_T]`` of tokens ``t`` plus the
    row's bias, ``-inf`` where not ``ok``; returns ``p = exp(s - m_new)``, the factor ``alpha``
    that rescales the running sums, and the new running maximum ``m_new``."""
    if HAS_BIAS:
        s += tl.load(bias_row + t, mask=ok, other=0.0)[None, :]
    s = tl.where(ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # a row whose every key so far is masked keeps m = -inf: shift by 0 instead of nan
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    return tl.exp(s - shift[:, None]), tl.exp(m_i - shift), m_new


@triton.jit
def _kv_decode_kernel(
    q_ptr,
    kp_ptr,
    ks_ptr,
    kz_ptr,
    vp_ptr,
    vs_ptr,
    vz_ptr,
    bias_ptr,
    o_ptr,
    m_ptr,
    l_ptr,
    T,
    HKV,
    TOK_PER_SPLIT,
    kp_sbh,
    ks_sbh,
    vp_sbh,
    vs_sbh,
    sm_scale,
    R: tl.constexpr,
    BLOCK_R: tl.constexpr,
    D: tl.constexpr,
    G: tl.constexpr,
    GV: tl.constexpr,
    BITS: tl.constexpr,
    PER: tl.constexpr,
    W: tl.constexpr,
    BLOCK_T: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """q: [B*HKV, R, D] f32 (the R query heads of each KV head); kp, vp: [B*HKV, T, W] uint8;
    ks, kz: [B*HKV, T/G, D]; vs, vz: [B*HKV, T, D/GV]; bias: [B, T] f32; the *_sbh strides step
    from one (batch, KV head) to the next (the cache's buffers hold spare capacity);
    o: [B*HKV, R, S, D] f32 (unnormalized); m, l: [B*HKV, R, S] f32. Grid (B*HKV, S)."""
    bh, split = tl.program_id(0), tl.program_id(1)
    n_split = tl.num_programs(1)
    r = tl.arange(0, BLOCK_R)
    d = tl.arange(0, D)
    r_ok = r < R
    q = tl.load(q_ptr + (bh * R + r[:, None]) * D + d[None, :], mask=r_ok[:, None], other=0.0) * sm_scale
    m_i = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_R,), tl.float32)
    acc = tl.zeros((BLOCK_R, D), tl.float32)
    start = split * TOK_PER_SPLIT
    end = tl.minimum(start + TOK_PER_SPLIT, T)
    for t0 in range(start, end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        ok = t < end
        rows = t[:, None]
        # keys: per-channel scale and zero of each token's group
        kc = _unpack(kp_ptr + bh * kp_sbh, rows, ok[:, None], BITS, PER, W, D)
        g_rows = bh * ks_sbh + (t[:, None] // G) * D + d[None, :]
        ks = tl.load(ks_ptr + g_rows, mask=ok[:, None], other=0.0).to(tl.float32)
        kz = tl.load(kz_ptr + g_rows, mask=ok[:, None], other=0.0).to(tl.float32)
        k = kc * ks + kz  # [BLOCK_T, D]
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [BLOCK_R, BLOCK_T]
        p, alpha, m_new = _softmax_step(s, t, ok, m_i, bias_ptr + (bh // HKV) * T, HAS_BIAS)
        # values: per-token scale and zero of each channel group
        vc = _unpack(vp_ptr + bh * vp_sbh, rows, ok[:, None], BITS, PER, W, D)
        v_rows = bh * vs_sbh + t[:, None] * (D // GV) + d[None, :] // GV
        vs = tl.load(vs_ptr + v_rows, mask=ok[:, None], other=0.0).to(tl.float32)
        vz = tl.load(vz_ptr + v_rows, mask=ok[:, None], other=0.0).to(tl.float32)
        v = vc * vs + vz
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    out_rows = (bh * R + r) * n_split + split
    tl.store(o_ptr + out_rows[:, None] * D + d[None, :], acc, mask=r_ok[:, None])
    tl.store(m_ptr + out_rows, m_i, mask=r_ok)
    tl.store(l_ptr + out_rows, l_i, mask=r_ok)


@triton.jit
def _nibble(byte, SHIFT: tl.constexpr):
    """The 4-bit code at bit ``SHIFT`` of each byte as float32, exactly, without an int-to-float
    conversion (quarter rate on NVIDIA GPUs): OR-ed into the mantissa of 2**23, minus 2**23."""
    code = (byte.to(tl.int32) >> SHIFT) & 15
    return (code | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _kv_decode_dot_kernel(
    q_ptr, kp_ptr, ks_ptr, kz_ptr, vp_ptr, vs_ptr, vz_ptr, bias_ptr, o_ptr, m_ptr, l_ptr, T, HKV, TOK_PER_SPLIT,
    kp_sbh, ks_sbh, vp_sbh, vs_sbh, sm_scale, R: tl.constexpr, BLOCK_R: tl.constexpr, D: tl.constexpr,
    G: tl.constexpr, GV: tl.constexpr, BLOCK_T: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """``_kv_decode_kernel`` for 4-bit caches on tensor cores: same arguments and outputs.

    Byte ``j`` of a token holds channel ``j`` in its low nibble and ``j + W`` (``W = D / 2``) in
    its high one, so each half of the head dim is one contiguous tensor of codes. Keys share
    a scale and zero per channel over a ``G``-token group, and a ``BLOCK_T`` block lies in one
    group: the scores are ``(q * k_scale) . codes + q . k_zero``, a ``tl.dot`` on the codes
    themselves per half. Values share a scale and zero per token over ``GV`` channels, and a
    half lies in one such group (``GV % W == 0``, the launcher checks): each half's output is
    ``(p * v_scale) @ codes + p . v_zero``. The R query heads of a KV head, padded to
    ``BLOCK_R >= 16`` rows, are the dots' M; float32 operands at ``PRECISION`` (the launcher's
    "tf32": 10-bit mantissas, far below the 4-bit codes' own error; "tf32x3" is about float32's
    accuracy at twice the instructions; the interpreter computes in float32), float32
    accumulation. No scale or zero is gathered per element. Compiled for sm_90 (D 128, 64-token
    blocks, 4 warps) the loop issues about 10 instructions per code, against about 72 and
    register spills for ``_kv_decode_kernel``."""
    bh, split = tl.program_id(0), tl.program_id(1)
    n_split = tl.num_programs(1)
    W: tl.constexpr = D // 2
    HI_GROUP: tl.constexpr = W // GV  # the value group of the upper half's channels (0 or 1)
    r = tl.arange(0, BLOCK_R)
    w = tl.arange(0, W)
    r_ok = r < R
    q_rows = q_ptr + (bh * R + r[:, None]) * D + w[None, :]
    q_lo = tl.load(q_rows, mask=r_ok[:, None], other=0.0) * sm_scale  # [BLOCK_R, W]: channels 0..W-1
    q_hi = tl.load(q_rows + W, mask=r_ok[:, None], other=0.0) * sm_scale
    m_i = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_R,), tl.float32)
    acc_lo = tl.zeros((BLOCK_R, W), tl.float32)
    acc_hi = tl.zeros((BLOCK_R, W), tl.float32)
    start = split * TOK_PER_SPLIT
    end = tl.minimum(start + TOK_PER_SPLIT, T)
    for t0 in range(start, end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        ok = t < end
        kb = tl.load(kp_ptr + bh * kp_sbh + t[:, None] * W + w[None, :], mask=ok[:, None], other=0)
        k_row = ks_ptr + bh * ks_sbh + (t0 // G) * D + w  # this block's key group
        z_row = kz_ptr + bh * ks_sbh + (t0 // G) * D + w
        ks_lo, ks_hi = tl.load(k_row).to(tl.float32), tl.load(k_row + W).to(tl.float32)
        kz_lo, kz_hi = tl.load(z_row).to(tl.float32), tl.load(z_row + W).to(tl.float32)
        s = tl.dot(q_lo * ks_lo[None, :], tl.trans(_nibble(kb, 0)), input_precision=PRECISION)
        s = tl.dot(q_hi * ks_hi[None, :], tl.trans(_nibble(kb, 4)), s, input_precision=PRECISION)
        s += tl.sum(q_lo * kz_lo[None, :] + q_hi * kz_hi[None, :], axis=1)[:, None]
        p, alpha, m_new = _softmax_step(s, t, ok, m_i, bias_ptr + (bh // HKV) * T, HAS_BIAS)
        vb = tl.load(vp_ptr + bh * vp_sbh + t[:, None] * W + w[None, :], mask=ok[:, None], other=0)
        v_row = bh * vs_sbh + t * (D // GV)
        vs_lo = tl.load(vs_ptr + v_row, mask=ok, other=0.0).to(tl.float32)
        vz_lo = tl.load(vz_ptr + v_row, mask=ok, other=0.0).to(tl.float32)
        vs_hi = tl.load(vs_ptr + v_row + HI_GROUP, mask=ok, other=0.0).to(tl.float32)
        vz_hi = tl.load(vz_ptr + v_row + HI_GROUP, mask=ok, other=0.0).to(tl.float32)
        acc_lo = tl.dot(p * vs_lo[None, :], _nibble(vb, 0), acc_lo * alpha[:, None], PRECISION)
        acc_hi = tl.dot(p * vs_hi[None, :], _nibble(vb, 4), acc_hi * alpha[:, None], PRECISION)
        acc_lo += tl.sum(p * vz_lo[None, :], axis=1)[:, None]
        acc_hi += tl.sum(p * vz_hi[None, :], axis=1)[:, None]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    out_rows = (bh * R + r) * n_split + split
    o_rows = o_ptr + out_rows[:, None] * D + w[None, :]
    tl.store(o_rows, acc_lo, mask=r_ok[:, None])
    tl.store(o_rows + W, acc_hi, mask=r_ok[:, None])
    tl.store(m_ptr + out_rows, m_i, mask=r_ok)
    tl.store(l_ptr + out_rows, l_i, mask=r_ok)


@triton.jit
def _kv_merge_splits_kernel(o_ptr, m_ptr, l_ptr, out_ptr, lse_ptr, S, D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Merge one query head's ``S`` split results (flash-decoding's reduction, one launch): with
    ``lse_s = m_s + log l_s``, ``lse = logsumexp_s lse_s`` and ``out = sum_s exp(lse_s - lse) /
    l_s * o_s``, over ``BLOCK_S`` splits at a time with a running maximum. A split with
    ``l_s = 0`` (empty or fully masked) weighs 0; a head with every token masked gets
    ``out = 0`` and ``lse = -inf``; a head with a NaN in any split (a NaN query or cache entry)
    gets NaN for both, as the reference does. o: [heads, S, D]; m, l: [heads, S]."""
    h = tl.program_id(0)
    d = tl.arange(0, D)
    top = float("-inf")  # running maximum of lse_s
    total = 0.0  # sum of exp(lse_s - top)
    acc = tl.zeros((D,), tl.float32)  # sum of exp(lse_s - top) / l_s * o_s
    nans = 0  # splits whose m or l is NaN: "l > 0" below is false for them, which would drop them
    for s0 in range(0, S, BLOCK_S):
        si = s0 + tl.arange(0, BLOCK_S)
        ok = si < S
        m = tl.load(m_ptr + h * S + si, mask=ok, other=float("-inf"))
        l_ = tl.load(l_ptr + h * S + si, mask=ok, other=0.0)
        nans += tl.sum(((m != m) | (l_ != l_)).to(tl.int32), axis=0)
        live = l_ > 0.0
        safe_l = tl.where(live, l_, 1.0)
        lse_s = tl.where(live, m + tl.log(safe_l), float("-inf"))
        new_top = tl.maximum(top, tl.max(lse_s, axis=0))
        shift = tl.where(new_top == float("-inf"), 0.0, new_top)
        rescale = tl.exp(top - shift)  # exp(-inf) = 0 before any live split
        e = tl.where(live, tl.exp(lse_s - shift), 0.0)
        o = tl.load(o_ptr + (h * S + si[:, None]) * D + d[None, :], mask=ok[:, None], other=0.0)
        acc = acc * rescale + tl.sum((e / safe_l)[:, None] * o, axis=0)
        total = total * rescale + tl.sum(e, axis=0)
        top = new_top
    live_head = total > 0.0
    out = acc / tl.where(live_head, total, 1.0)
    lse = tl.where(live_head, top + tl.log(tl.where(live_head, total, 1.0)), float("-inf"))
    tl.store(out_ptr + h * D + d, tl.where(nans > 0, float("nan"), out))
    tl.store(lse_ptr + h, tl.where(nans > 0, float("nan"), lse))


def dot_kernel_fits(bits: int, group_size: int, head_dim: int) -> bool:
    """Whether ``kv_decode_attention`` runs the tensor-core kernel: 4-bit codes, key groups of
    at least 16 tokens, half a head of at least 16 channels lying in one value group."""
    half = head_dim // 2
    return bits == 4 and group_size >= 16 and half >= 16 and value_group_size(group_size, head_dim) % half == 0


def _bh_stride(*tensors: torch.Tensor) -> int:
    # The kernel steps over (batch, head) blocks with one stride: they must be evenly spaced.
    sb, sh = block_strides(*tensors)
    if sb != tensors[0].shape[1] * sh:
        raise ValueError(f"packed cache tensors need evenly spaced (batch, head) blocks, got {tensors[0].stride()}")
    return sh


def kv_decode_attention(
    q: torch.Tensor,
    k_packed: torch.Tensor,
    k_scale: torch.Tensor,
    k_zero: torch.Tensor,
    v_packed: torch.Tensor,
    v_scale: torch.Tensor,
    v_zero: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    sm_scale: float,
    splits: int | None = None,
    kernel: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`hfcompress_triton.kv_ref.kv_decode_attention_ref`; ``splits`` slices of the
    sequence run in parallel (default: enough programs to fill the device). ``kernel``:
    ``"dot"`` (tensor cores, 4-bit caches whose groups fit, see ``dot_kernel_fits``),
    ``"lanes"`` (every bit width; products reduced across threads) or None: ``"dot"`` where it
    fits."""
    b, hq, nq, d = q.shape
    hkv, t = k_packed.shape[1], k_packed.shape[2]
    per = 8 // bits
    if nq != 1 or hq % hkv or k_packed.shape[3] != d // per or t % group_size:
        raise ValueError(
            f"decode attention needs q [B, Hq, 1, D] and packed keys [B, Hkv, T, D*bits/8] with Hq % Hkv == 0 and "
            f"T % group_size == 0: q {tuple(q.shape)}, keys {tuple(k_packed.shape)}, group {group_size}"
        )
    _check_pow2("head dim", d)
    fits = dot_kernel_fits(bits, group_size, d)
    if kernel not in (None, "dot", "lanes") or (kernel == "dot" and not fits):
        raise ValueError(
            f"kernel must be None, 'lanes' or 'dot' (4-bit, group >= 16, head dim >= 32 with half of it in one "
            f"value group), got {kernel!r} for {bits} bits, group {group_size}, head dim {d}"
        )
    dot = fits and kernel != "lanes"
    r = hq // hkv
    block_t = min(group_size, 64)
    if splits is None:
        programs = 4 * multiprocessors(q.device) if dot else 256
        splits = max(1, min(triton.cdiv(t, block_t), triton.cdiv(programs, b * hkv)))
    tok_per_split = triton.cdiv(triton.cdiv(t, splits), block_t) * block_t
    splits = triton.cdiv(t, tok_per_split) if t else 1
    o = torch.empty(b * hkv, r, splits, d, dtype=torch.float32, device=q.device)
    m = torch.empty(b * hkv, r, splits, dtype=torch.float32, device=q.device)
    l_ = torch.empty_like(m)
    bias_f = None if bias is None else bias.float().contiguous()
    kp_sbh, ks_sbh = _bh_stride(k_packed), _bh_stride(k_scale, k_zero)
    vp_sbh, vs_sbh = _bh_stride(v_packed), _bh_stride(v_scale, v_zero)
    args = (
        q.float().reshape(b * hkv, r, d).contiguous(),
        k_packed, k_scale, k_zero, v_packed, v_scale, v_zero,
        bias_f if bias_f is not None else o,
        o, m, l_, t, hkv, tok_per_split, kp_sbh, ks_sbh, vp_sbh, vs_sbh, float(sm_scale),
    )  # fmt: skip
    shape = {"R": r, "D": d, "G": group_size, "GV": value_group_size(group_size, d), "BLOCK_T": block_t}
    if dot:
        _kv_decode_dot_kernel[(b * hkv, splits)](
            *args, **shape, BLOCK_R=max(triton.next_power_of_2(r), 16), HAS_BIAS=bias_f is not None,
            PRECISION="tf32",
        )  # fmt: skip
    else:
        _kv_decode_kernel[(b * hkv, splits)](
            *args, **shape, BLOCK_R=max(triton.next_power_of_2(r), 1), BITS=bits, PER=per, W=d // per,
            HAS_BIAS=bias_f is not None,
        )  # fmt: skip
    out = torch.empty(b * hq, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(b * hq, dtype=torch.float32, device=q.device)
    _kv_merge_splits_kernel[(b * hq,)](o, m, l_, out, lse, splits, D=d, BLOCK_S=min(64, triton.next_power_of_2(splits)))
    return out.reshape(b, hq, 1, d), lse.reshape(b, hq, 1)
