"""Bit packing of integer codes along the last dimension.

Eight ``bits``-bit codes fill exactly ``bits`` bytes, so every width in {2, 3, 4, 8} packs the
same way: K is padded with zeros to a multiple of 8, each run of eight codes becomes one
little-endian word with code ``i`` in bits ``[i*bits, (i+1)*bits)``, and the word is stored as
``bits`` bytes. For 4 bits this is the usual nibble layout: byte ``j`` holds code ``2j`` in its
low nibble and code ``2j + 1`` in its high nibble, which the Triton kernels read directly.
8-bit codes are stored as they are.
"""

from __future__ import annotations

import torch

__all__ = ["SUPPORTED_BITS", "pack", "packed_columns", "unpack"]

SUPPORTED_BITS = (2, 3, 4, 8)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} cannot be packed; supported: {SUPPORTED_BITS}")


def packed_columns(in_features: int, bits: int) -> int:
    """Bytes per row once ``in_features`` codes of ``bits`` bits are packed."""
    _check_bits(bits)
    if bits == 8:
        return in_features
    return -(-in_features // 8) * bits


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes ``[N, K]`` (uint8, each below ``2**bits``) into ``[N, packed_columns(K)]`` uint8."""
    _check_bits(bits)
    if q.dtype != torch.uint8:
        raise ValueError(f"pack expects uint8 codes, got {q.dtype}")
    if bits == 8:
        return q.contiguous()
    n, k = q.shape
    pad = -k % 8
    if pad:
        q = torch.nn.functional.pad(q, (0, pad))
    codes = q.reshape(n, -1, 8).to(torch.int64)
    shifts = torch.arange(8, device=q.device, dtype=torch.int64) * bits
    word = (codes << shifts).sum(dim=-1, keepdim=True)  # fields are disjoint, so sum == or
    byte_shifts = torch.arange(bits, device=q.device, dtype=torch.int64) * 8
    packed = (word >> byte_shifts) & 0xFF  # [N, K/8, bits]
    return packed.to(torch.uint8).reshape(n, -1)


def unpack(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``[N, packed_columns(K)]`` uint8 to codes ``[N, K]`` uint8."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack expects uint8, got {packed.dtype}")
    if packed.shape[-1] != packed_columns(in_features, bits):
        raise ValueError(
            f"packed tensor has {packed.shape[-1]} columns; {in_features} codes of {bits} bits "
            f"need {packed_columns(in_features, bits)}"
        )
    if bits == 8:
        return packed
    n = packed.shape[0]
    words = packed.reshape(n, -1, bits).to(torch.int64)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    word = (words << byte_shifts).sum(dim=-1, keepdim=True)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    codes = (word >> shifts) & (2**bits - 1)  # [N, K/8, 8]
    return codes.to(torch.uint8).reshape(n, -1)[:, :in_features]
