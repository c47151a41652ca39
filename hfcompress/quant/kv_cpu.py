"""The CPU decode attention over a packed KV cache: ``kv_cpu.c``, compiled on first use.

PyTorch has no operator that reads 2- or 4-bit codes, and doing the unpacking with torch ops
writes a dequantized copy of every chunk (several passes over ``T x D`` floats per layer and
step: at 8k tokens that made decoding 2.8x slower than the float cache). The C kernel reads
each packed byte once, unpacking a few tokens at a time into a scratch that stays in L1 cache:
the CPU counterpart of the Triton decode kernel. On CPUs with AVX2 it scores and sums in
vectors (:func:`vector_path`).

It is compiled on first use and called through ``ctypes`` (:mod:`hfcompress.quant.native`).
Without a compiler, or if the build fails, :func:`kv_decode_attention_cpu` returns None and
callers use the torch path; the reason is logged once.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from hfcompress_triton.kv_ref import block_strides

from hfcompress.quant import native

if TYPE_CHECKING:
    from hfcompress.quant.kv import PackedKV

__all__ = ["PackedArgs", "available", "kv_decode_attention_cpu", "vector_path"]

_SOURCE = Path(__file__).with_name("kv_cpu.c")
_SCALE_DTYPES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
# What the kernel reads the query and the dense part in, and writes its output in, as they are.
_IO_DTYPES = {torch.bfloat16: 1, torch.float32: 2}
# The kernel keeps per-query-head state on the stack for at most this many heads per KV head.
MAX_GROUP = 64
# kv_dequantize unpacks a token into stack arrays of this many channels.
MAX_DEQUANTIZE_HEAD_DIM = 512


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = native.load(_SOURCE, "the CPU KV-cache kernel (decoding uses the slower torch path)")
    if lib is None:
        return None
    fn = lib.kv_decode_attention
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = (
        [ptr, i64, i64]
        + [ptr, i64, i64, ptr, ptr, i64, i64] * 2
        + [ptr]  # bias
        + [ptr, ptr, i64, i64, ptr]  # the dense part
        + [ptr, ptr]  # out, lse
        + [ctypes.c_int] * 10
        + [ctypes.c_float, ctypes.c_int, ctypes.c_int]
    )
    fn.restype = ctypes.c_int
    lib.kv_dequantize.argtypes = [ptr, i64, i64, ptr, ptr, i64, i64, ptr, i64, i64] + [ctypes.c_int] * 10
    lib.kv_dequantize.restype = None
    lib.kv_vector_path.argtypes = [ctypes.c_int] * 3
    lib.kv_vector_path.restype = ctypes.c_int
    return lib


def available() -> bool:
    """True when the kernel is built (or builds now)."""
    return _library() is not None


def vector_path(bits: int, head_dim: int, group_size: int) -> bool:
    """Whether the kernel runs its AVX2 path for these codes (the CPU has AVX2 and FMA, and the
    shapes tile into its vectors: what the KV cache's defaults give) rather than its plain
    loops; False when the kernel is unavailable."""
    lib = _library()
    return lib is not None and bool(lib.kv_vector_path(bits, head_dim, group_size))


def kv_decode_attention_cpu(
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
    dense_keys: torch.Tensor | None = None,
    dense_values: torch.Tensor | None = None,
    dense_bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`hfcompress_triton.kv_ref.kv_decode_attention_ref` in C on CPU tensors, or None
    when the kernel is unavailable. Same arguments and results, plus an optional dense part
    that joins the same softmax (so that one call covers a whole step), and the output's
    dtype. The sums are float32 whatever the dtypes; a bfloat16 output is rounded once, at
    the end.

    ``q: [B, Hq, Q, D]`` may hold several query tokens (a chunk of a prompt, a chat's next
    turn). They attend to the packed keys alike (``bias: [B, T]``, padding), while the dense
    part's bias may differ per query (causal among the step's own tokens). The kernel takes
    them as more query heads, so the packed part is read once for up to ``MAX_GROUP`` rows.

    Args:
        dense_keys, dense_values: ``[B, Hkv, Td, D]`` float keys and values, or None.
        dense_bias: ``[B, Td]`` (every query) or ``[B, Q, Td]`` float32 added to their
            scores, or None.
        out_dtype: ``out``'s dtype, float32 (the reference's) or bfloat16 (for a bfloat16
            model: with a bfloat16 query and dense part, nothing is converted in Python).
    """
    if _library() is None:
        return None
    packed = PackedArgs.of(k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, bits, group_size)
    return packed.attend(q, bias, sm_scale, dense_keys, dense_values, dense_bias, out_dtype)


@dataclass(frozen=True)
class PackedArgs:
    """A packed part's kernel arguments, checked once: what every call over the same tensors
    (a cache layer's decoding steps until its packed part grows) passes unchanged. Making them
    costs about as much as the kernel's Python around each call did before (tens of
    microseconds against a kernel of 30-100 at a few hundred tokens), so the KV cache keeps
    one per view of its packed part (:meth:`of_view`)."""

    args: tuple  # pointers and strides of the six tensors, in the kernel's order
    batch: int
    kv_heads: int
    tokens: int
    bits: int
    group_size: int
    scale_dtype: int

    @classmethod
    def of(cls, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, bits: int, group_size: int) -> PackedArgs:
        b, hkv, t = k_packed.shape[:3]
        if k_scale.dtype not in _SCALE_DTYPES:
            raise ValueError(
                f"CPU decode attention reads scales in {sorted(map(str, _SCALE_DTYPES))}, not {k_scale.dtype}"
            )
        if t % group_size or k_scale.shape[2] != t // group_size:
            raise ValueError(
                f"the packed keys hold whole groups: {t} tokens, group {group_size}, scales {k_scale.shape}"
            )
        if k_scale.dtype != v_scale.dtype or k_zero.dtype != k_scale.dtype or v_zero.dtype != v_scale.dtype:
            raise ValueError("keys and values must store scales and zeros in one dtype")
        args = (
            k_packed.data_ptr(), *block_strides(k_packed), k_scale.data_ptr(), k_zero.data_ptr(),
            *block_strides(k_scale, k_zero), v_packed.data_ptr(), *block_strides(v_packed), v_scale.data_ptr(),
            v_zero.data_ptr(), *block_strides(v_scale, v_zero),
        )  # fmt: skip
        return cls(args, b, hkv, t, bits, group_size, _SCALE_DTYPES[k_scale.dtype])

    @classmethod
    def of_view(cls, packed: PackedKV) -> PackedArgs:
        """The arguments of ``packed``, made on its first call and kept with it (the view's
        tensors, and so their pointers, live as long as it does)."""
        args = packed.kernel_args.get("cpu")
        if args is None:
            args = packed.kernel_args["cpu"] = cls.of(*packed.tensors(), packed.bits, packed.group_size)
        return args

    def attend(self, q, bias, sm_scale, dense_keys=None, dense_values=None, dense_bias=None, out_dtype=torch.float32):
        """:func:`kv_decode_attention_cpu` over these packed tensors (which must still be alive)."""
        b, hq, nq, _ = q.shape
        hkv = self.kv_heads
        if hq % hkv or hq // hkv > MAX_GROUP or b != self.batch:
            raise ValueError(
                f"CPU decode attention needs at most {MAX_GROUP} query heads per KV head and one batch: "
                f"q {tuple(q.shape)}, {self.batch} rows of {hkv} KV heads"
            )
        if out_dtype not in _IO_DTYPES:
            raise ValueError(f"the CPU decode attention writes float32 or bfloat16, not {out_dtype}")
        td = 0 if dense_keys is None else dense_keys.shape[2]
        if td and (dense_values.shape != dense_keys.shape or tuple(dense_keys.shape[:2]) != (b, hkv)):
            raise ValueError(f"dense keys {tuple(dense_keys.shape)} and values {tuple(dense_values.shape)} do not fit")
        # The query, the dense part and the output share one dtype in the kernel: bfloat16 when
        # all three are (read and written as they are), float32 otherwise.
        bf16 = torch.bfloat16
        same = q.dtype == out_dtype == bf16 and (not td or dense_keys.dtype == dense_values.dtype == bf16)
        io_dtype = bf16 if same else torch.float32
        bias = None if bias is None else bias.float().contiguous()
        if td:
            if dense_keys.dtype != io_dtype or dense_values.dtype != io_dtype:
                dense_keys, dense_values = dense_keys.to(io_dtype), dense_values.to(io_dtype)
            # The kernel steps over (batch, head) blocks by the keys' strides and reads each
            # block's [Td, D] rows as one run: views of the cache's buffers pass as they are.
            runs = dense_keys.stride(-1) == 1 and dense_keys.stride(-2) == dense_keys.shape[-1]
            if not runs or dense_values.stride() != dense_keys.stride():
                dense_keys, dense_values = dense_keys.contiguous(), dense_values.contiguous()
            if dense_bias is not None:
                dense_bias = dense_bias.float()
                dense_bias = dense_bias[:, None].expand(b, nq, td) if dense_bias.dim() == 2 else dense_bias
        else:
            dense_keys = dense_values = dense_bias = None
        q = q if q.dtype == io_dtype else q.to(io_dtype)
        step = max(1, MAX_GROUP // (hq // hkv))  # queries per call: R * step rows per KV head
        dense = (dense_keys, dense_values)
        if nq <= step:
            out, lse = self._call(q, bias, sm_scale, dense, dense_bias)
        else:
            rows = [slice(q0, q0 + step) for q0 in range(0, nq, step)]
            parts = [
                self._call(q[:, :, r], bias, sm_scale, dense, None if dense_bias is None else dense_bias[:, r])
                for r in rows
            ]
            out, lse = torch.cat([o for o, _ in parts], dim=2), torch.cat([lse for _, lse in parts], dim=2)
        return (out if out.dtype == out_dtype else out.to(out_dtype)), lse

    def dequantize_into(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write the packed tokens, dequantized, to positions ``[0, T)`` of ``keys, values:
        [B, Hkv, >= T, D]`` (float32 or bfloat16, each row of ``D`` contiguous): bit for bit
        :func:`hfcompress_triton.kv_ref.kv_dequantize_ref`, in one pass over the codes."""
        b, h, room, d = keys.shape
        if (
            values.shape != keys.shape
            or values.stride() != keys.stride()
            or (b, h) != (self.batch, self.kv_heads)
            or room < self.tokens
            or keys.dtype not in _IO_DTYPES
            or values.dtype != keys.dtype
            or keys.stride(-1) != 1
            or keys.stride(-2) != d
            or d > MAX_DEQUANTIZE_HEAD_DIM
            or d * self.bits % 8
        ):
            raise ValueError(
                f"cannot dequantize {self.batch} x {self.kv_heads} heads of {self.tokens} packed tokens into "
                f"{keys.dtype} {tuple(keys.shape)} and {values.dtype} {tuple(values.shape)}, strides "
                f"{keys.stride()}: want float32 or bfloat16, rows contiguous, head dim <= {MAX_DEQUANTIZE_HEAD_DIM}"
            )
        lib, out_dtype, threads = _library(), _IO_DTYPES[keys.dtype], torch.get_num_threads()
        for axis, (args, out) in enumerate(((self.args[:7], keys), (self.args[7:], values))):
            lib.kv_dequantize(
                *args, out.data_ptr(), out.stride(0), out.stride(1), b, h, self.tokens, d, self.bits,
                self.group_size, axis, self.scale_dtype, out_dtype, threads,
            )  # fmt: skip

    def _call(self, q, bias, sm_scale, dense, dense_bias):
        """One kernel call: ``q: [B, Hq, n, D]`` in the kernel's dtype, the other tensors ready."""
        b, hq, n, d = q.shape
        dense_keys, dense_values = dense
        qf = q.reshape(b, hq * n, d)  # each head's n queries one after the other: more rows
        qf = qf if qf.stride(2) == 1 and (n == 1 or qf.is_contiguous()) else qf.contiguous()
        td = 0 if dense_keys is None else dense_keys.shape[2]
        dense_bias = None if dense_bias is None else dense_bias.contiguous()
        out = torch.empty(b, hq * n, d, dtype=q.dtype)
        lse = torch.empty(b, hq * n)
        failed = _library().kv_decode_attention(
            qf.data_ptr(), qf.stride(0), qf.stride(1), *self.args, None if bias is None else bias.data_ptr(),
            dense_keys.data_ptr() if td else None, dense_values.data_ptr() if td else None,
            dense_keys.stride(0) if td else 0, dense_keys.stride(1) if td else 0,
            None if dense_bias is None else dense_bias.data_ptr(), out.data_ptr(), lse.data_ptr(),
            b, hq * n, self.kv_heads, self.tokens, td, n, d, self.bits, self.group_size, self.scale_dtype,
            float(sm_scale), _IO_DTYPES[q.dtype], torch.get_num_threads(),
        )  # fmt: skip
        if failed:
            raise MemoryError("the CPU KV-cache kernel could not allocate its scratch memory")
        return out.reshape(b, hq, n, d), lse.reshape(b, hq, n)
