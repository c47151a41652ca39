"""Pure-torch twins of the KV-cache Triton kernels (:mod:`hfcompress_triton.kv`), with the same
parameter names.

KIVI's layout (Liu et al., 2024, section 3): keys are quantized *per channel* (the tokens of a
group of ``group_size`` consecutive positions share one scale and zero per channel, because key
outliers sit in fixed channels), values *per token* (each token's channels in groups of
``group_size`` share one scale and zero). Both are asymmetric min-max: ``scale = (max - min) /
(2**bits - 1)``, ``zero = min``, ``code = clamp(floor((x - zero) / scale + 0.5), 0, 2**bits - 1)``,
``x_hat = code * scale + zero``, with the scale and zero rounded to their storage dtype first so
that the codes are computed against what is stored.

Packing (:func:`pack_codes`): byte ``j`` of a token's ``D * bits / 8`` bytes holds channel
``j + i * D / per`` in bits ``[i * bits, (i + 1) * bits)`` for ``i < per = 8 // bits``; a kernel
unpacks a token with ``per`` shifts of one contiguous byte vector, with no gather.

* ``kv_quantize``: ``x: [B, H, T, D]`` -> ``(packed: [B, H, T, D * bits / 8] uint8, scale,
  zero)``; per channel (keys): ``scale, zero: [B, H, T / group_size, D]``; per token (values):
  ``[B, H, T, D / group_size]``.
* ``kv_decode_attention``: one step of attention of ``q: [B, Hq, 1, D]`` over packed keys and
  values, grouped-query heads mapped to KV head ``h // (Hq / Hkv)``, returning the normalized
  output and the log-sum-exp of the scaled scores so that it merges with attention over other
  (full-precision) parts of the cache.
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = [
    "block_strides",
    "kv_decode_attention_ref",
    "kv_dequantize_ref",
    "kv_quantize_ref",
    "pack_codes",
    "unpack_codes",
    "value_group_size",
]

Axis = Literal["channel", "token"]

# Smallest stored scale: a constant group gets codes 0 and dequantizes to its zero exactly.
MIN_SCALE = 1e-5


def value_group_size(group_size: int, head_dim: int) -> int:
    """The channel group of per-token (value) quantization: ``group_size`` capped at the head dim."""
    return min(group_size, head_dim)


def block_strides(*tensors: torch.Tensor) -> tuple[int, int]:
    """The (batch, head) strides that ``[B, H, T, X]`` tensors share, each (batch, head) block
    a contiguous ``[T, X]`` (so views of the cache's buffers, which hold spare capacity along
    ``T``, qualify without a copy); ``ValueError`` otherwise. The kernels index with them."""
    first = tensors[0]
    for t in tensors:
        if t.stride() != first.stride() or t.stride(3) != 1 or t.stride(2) != t.shape[3]:
            raise ValueError(
                f"packed cache tensors need contiguous [T, X] blocks per (batch, head) and shared strides, "
                f"got {[u.stride() for u in tensors]}"
            )
    return first.stride(0), first.stride(1)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``codes: [..., D]`` uint8 in ``[0, 2**bits)`` -> ``[..., D * bits / 8]`` uint8 (layout in
    the module docstring)."""
    per = 8 // bits
    d = codes.shape[-1]
    if bits not in (2, 4, 8) or d % per:
        raise ValueError(f"cannot pack {d} channels of {bits}-bit codes (bits must be 2, 4 or 8, dividing D)")
    if per == 1:
        return codes.contiguous()
    parts = codes.reshape(*codes.shape[:-1], per, d // per)
    packed = parts[..., 0, :].clone()
    for i in range(1, per):
        packed |= parts[..., i, :] << (bits * i)
    return packed


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``[..., D * bits / 8]`` -> ``[..., D]`` uint8."""
    per = 8 // bits
    if per == 1:
        return packed
    shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8).view(per, 1)
    codes = (packed.unsqueeze(-2) >> shifts) & (2**bits - 1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per)


def _stats(x: torch.Tensor, bits: int, dim: int, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = x.amin(dim=dim), x.amax(dim=dim)
    # Divided by a tensor: CUDA multiplies by a scalar divisor's reciprocal (one ulp off the
    # kernel's IEEE division and the CPU's).
    scale = ((hi - lo) / hi.new_tensor(float(2**bits - 1))).clamp(min=MIN_SCALE).to(scale_dtype)
    return scale, lo.to(scale_dtype)


def kv_quantize_ref(
    x: torch.Tensor, bits: int, group_size: int, axis: Axis, scale_dtype: torch.dtype = torch.float16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize and pack ``x: [B, H, T, D]`` (float).

    Args:
        x: Keys (``axis="channel"``) or values (``axis="token"``).
        bits: 2, 4 or 8.
        group_size: Per channel: tokens per group (``T`` must be a multiple). Per token:
            channels per group, capped at ``D`` (:func:`value_group_size`).
        axis: ``"channel"`` (keys) or ``"token"`` (values).
        scale_dtype: Storage dtype of the scales and zeros.

    Returns:
        ``(packed uint8, scale, zero)``, shapes in the module docstring.
    """
    b, h, t, d = x.shape
    block = value_group_size(group_size, d)
    xf = x.float()
    if axis == "channel":
        if t % group_size:
            raise ValueError(f"per-channel key quantization needs whole groups: {t} tokens, group {group_size}")
        groups = xf.reshape(b, h, t // group_size, group_size, d)
        scale, zero = _stats(groups, bits, 3, scale_dtype)  # [B, H, T/G, D]
        s, z = scale.float().unsqueeze(3), zero.float().unsqueeze(3)
    else:
        if d % block:
            raise ValueError(f"per-token value quantization needs whole groups: head dim {d}, group {block}")
        groups = xf.reshape(b, h, t, d // block, block)
        scale, zero = _stats(groups, bits, 4, scale_dtype)  # [B, H, T, D/G]
        s, z = scale.float().unsqueeze(4), zero.float().unsqueeze(4)
    codes = torch.floor((groups - z) / s + 0.5).clamp_(0, 2**bits - 1).to(torch.uint8)
    return pack_codes(codes.reshape(b, h, t, d), bits), scale, zero


def kv_dequantize_ref(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group_size: int,
    axis: Axis,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``[B, H, T, D]`` in ``dtype`` from :func:`kv_quantize_ref`'s output (float32 arithmetic)."""
    d = packed.shape[-1] * 8 // bits
    block = value_group_size(group_size, d)
    codes = unpack_codes(packed, bits).float()
    if axis == "channel":
        s = scale.float().repeat_interleave(group_size, dim=2)
        z = zero.float().repeat_interleave(group_size, dim=2)
    else:
        s = scale.float().repeat_interleave(block, dim=3)
        z = zero.float().repeat_interleave(block, dim=3)
    return (codes * s + z).to(dtype)


def kv_decode_attention_ref(
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one query step over a packed cache, by dequantizing it (the reference).

    Args:
        q: ``[B, Hq, 1, D]`` float.
        k_packed, v_packed: ``[B, Hkv, T, D * bits / 8]`` uint8 (``Hq`` a multiple of ``Hkv``).
        k_scale, k_zero: ``[B, Hkv, T / group_size, D]``.
        v_scale, v_zero: ``[B, Hkv, T, D / group_size]``.
        bias: ``[B, T]`` float32 added to the scores (``-inf`` masks a token), or None.
        bits, group_size: As given to :func:`kv_quantize_ref`.
        sm_scale: Factor on ``q . k``.

    Returns:
        ``(out: [B, Hq, 1, D] float32, lse: [B, Hq, 1] float32)``; a row with every token masked
        gives ``out = 0`` and ``lse = -inf``.
    """
    hq, hkv = q.shape[1], k_packed.shape[1]
    if hq % hkv:
        raise ValueError(f"{hq} query heads cannot share {hkv} KV heads")
    k = kv_dequantize_ref(k_packed, k_scale, k_zero, bits, group_size, "channel").repeat_interleave(hq // hkv, 1)
    v = kv_dequantize_ref(v_packed, v_scale, v_zero, bits, group_size, "token").repeat_interleave(hq // hkv, 1)
    scores = (q.float() @ k.transpose(-1, -2)) * sm_scale  # [B, Hq, 1, T]
    if bias is not None:
        scores = scores + bias[:, None, None, :]
    lse = torch.logsumexp(scores, dim=-1)
    # A fully masked row weighs 0 (exp(-inf - -inf) would be NaN); a NaN score stays NaN.
    p = torch.exp(scores - lse.unsqueeze(-1)).masked_fill_(lse.isneginf().unsqueeze(-1), 0.0)
    return p @ v, lse
