"""KV-cache quantization math: attention over a cache split into full-precision parts and a
packed KIVI part, on tensors only (the transformers adapter is
:mod:`hfcompress.integrations.kv_cache`).

Attention over several parts of one key sequence is computed part by part, each part giving
its normalized output and the log-sum-exp of its scores; :func:`merge` combines them exactly
(the split-K reduction of flash-decoding). So the packed part is read chunk by chunk
(:func:`attend_packed`): no step builds a dequantized copy of the whole history, and the
full-precision parts (attention sinks, the recent window, the tokens of this step) are read
as they are stored.

Shapes: ``q: [B, Hq, Q, D]``; keys and values ``[B, Hkv, T, D]`` with ``Hq`` a multiple of
``Hkv`` (grouped-query attention: query head ``h`` reads KV head ``h // (Hq / Hkv)``);
``bias: [B, Q, T]`` float32 added to the scaled scores (``-inf`` masks), or None.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from hfcompress_triton.kv_ref import kv_dequantize_ref

__all__ = ["PackedKV", "Partial", "attend_dense", "attend_packed", "merge"]


@dataclass
class Partial:
    """Attention over one part of the keys: ``out: [B, Hq, Q, D]`` float32, normalized over
    that part, and ``lse: [B, Hq, Q]`` float32, the log-sum-exp of its scaled scores (``-inf``
    where every key of the part is masked, with ``out = 0``)."""

    out: torch.Tensor
    lse: torch.Tensor


@dataclass
class PackedKV:
    """The packed part of one layer's cache (``T`` tokens, a multiple of ``group_size``).

    Attributes:
        k_packed, v_packed: ``[B, Hkv, T, D * bits / 8]`` uint8.
        k_scale, k_zero: ``[B, Hkv, T / group_size, D]`` (keys per channel).
        v_scale, v_zero: ``[B, Hkv, T, D / group_size]`` (values per token).
        bits, group_size: As quantized (:func:`hfcompress_triton.kv_ref.kv_quantize_ref`).
        kernel_args: What kernels derive from these tensors once and keep for the view's life
            (:class:`hfcompress.quant.kv_cpu.PackedArgs`), by kernel.
    """

    k_packed: torch.Tensor
    k_scale: torch.Tensor
    k_zero: torch.Tensor
    v_packed: torch.Tensor
    v_scale: torch.Tensor
    v_zero: torch.Tensor
    bits: int
    group_size: int
    kernel_args: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def tokens(self) -> int:
        return self.k_packed.shape[2]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """``(k_packed, k_scale, k_zero, v_packed, v_scale, v_zero)``, the kernels' argument order."""
        return self.k_packed, self.k_scale, self.k_zero, self.v_packed, self.v_scale, self.v_zero

    def slice(self, start: int, end: int) -> PackedKV:
        """Tokens ``[start, end)``; both multiples of ``group_size``."""
        g = self.group_size
        return PackedKV(
            self.k_packed[:, :, start:end],
            self.k_scale[:, :, start // g : end // g],
            self.k_zero[:, :, start // g : end // g],
            self.v_packed[:, :, start:end],
            self.v_scale[:, :, start:end],
            self.v_zero[:, :, start:end],
            self.bits,
            g,
        )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keys, values)``, each ``[B, Hkv, T, D]`` in ``dtype``."""
        k = kv_dequantize_ref(self.k_packed, self.k_scale, self.k_zero, self.bits, self.group_size, "channel", dtype)
        v = kv_dequantize_ref(self.v_packed, self.v_scale, self.v_zero, self.bits, self.group_size, "token", dtype)
        return k, v


def _grouped(q: torch.Tensor, hkv: int) -> torch.Tensor:
    b, hq, nq, d = q.shape
    if hq % hkv:
        raise ValueError(f"{hq} query heads cannot share {hkv} KV heads")
    return q.reshape(b, hkv, hq // hkv, nq, d)  # [B, Hkv, R, Q, D], R query heads per KV head


def _logsumexp(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lse, shift)``: the log-sum-exp over ``dim`` (``-inf`` where every entry is, a fully
    masked row) and the same with those ``-inf`` as 0, to subtract before ``exp``. With it
    a masked row's weights are ``exp(-inf) = 0`` and its gradients 0, not NaN (subtracting
    ``-inf`` itself, or the backward of a log-sum-exp over ``-inf`` only, gives NaN)."""
    dead = x.amax(dim, keepdim=True) == float("-inf")
    shift = torch.logsumexp(x.masked_fill(dead, 0.0), dim).masked_fill(dead.squeeze(dim), 0.0)
    return shift.masked_fill(dead.squeeze(dim), float("-inf")), shift


def attend_dense(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, sm_scale: float
) -> Partial:
    """Attention of ``q`` over full-precision ``k, v: [B, Hkv, T, D]`` (float32 arithmetic)."""
    b, hq, nq, d = q.shape
    qg = _grouped(q.float(), k.shape[1])
    scores = (qg @ k.float().unsqueeze(2).transpose(-1, -2)) * sm_scale  # [B, Hkv, R, Q, T]
    if bias is not None:
        scores = scores + bias[:, None, None]
    lse, shift = _logsumexp(scores, -1)
    p = torch.exp(scores - shift.unsqueeze(-1))
    out = p @ v.float().unsqueeze(2)
    return Partial(out.reshape(b, hq, nq, d), lse.reshape(b, hq, nq))


def attend_packed(
    q: torch.Tensor, packed: PackedKV, bias: torch.Tensor | None, sm_scale: float, chunk_tokens: int = 2048
) -> Partial:
    """Attention of ``q`` over a packed part, dequantizing ``chunk_tokens`` tokens at a time
    (rounded to whole key groups), so memory stays bounded by one chunk."""
    step = max(packed.group_size, chunk_tokens // packed.group_size * packed.group_size)
    parts = []
    for start in range(0, packed.tokens, step):
        end = min(start + step, packed.tokens)
        k, v = packed.slice(start, end).dequantize()
        parts.append(attend_dense(q, k, v, None if bias is None else bias[..., start:end], sm_scale))
    return merge(parts)


def merge(parts: list[Partial]) -> Partial:
    """Exact attention over the union of the parts' keys, from each part's output and lse."""
    if len(parts) == 1:
        return parts[0]
    lse = torch.stack([p.lse for p in parts])  # [P, B, Hq, Q]
    total, shift = _logsumexp(lse, 0)
    weights = torch.exp(lse - shift)  # a fully masked part, or row, weighs 0
    out = sum(w.unsqueeze(-1) * p.out for w, p in zip(weights, parts, strict=True))
    return Partial(out, total)
