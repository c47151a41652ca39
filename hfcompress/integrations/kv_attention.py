"""The quantized KV cache's attention: the ``hfcompress_kv`` attention function, which reads a
:class:`~hfcompress.integrations.kv_cache.QuantizedKVLayer`'s parts where they are stored, and
the operators that stand for it under ``torch.compile``.

A step over stored tokens attends to the packed part and to the full-precision tokens (sinks,
window and the step's own, one view of the layer's buffer) in one softmax: on CPU in one call of
the C kernel (:mod:`hfcompress.quant.kv_cpu`), for one query token or up to 15; on CUDA the
packed part through the Triton split-K kernel (one query token) or chunk by chunk
(:func:`hfcompress.quant.kv.attend_packed`), merged with the dense part by log-sum-exp. A CPU
step of ``DEQUANTIZE_QUERIES`` or more attends like a float cache instead: SDPA over every
token, the packed part dequantized in one pass of C code. The cache itself, and the rest of
transformers' cache API, is :mod:`hfcompress.integrations.kv_cache`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F

from hfcompress.integrations.attention import sequence_attention
from hfcompress.quant import compiled, kv_cpu
from hfcompress.quant.kv import PackedKV, Partial, attend_dense, attend_packed, merge
from hfcompress.quant.triton_bridge import available as triton_available

if TYPE_CHECKING:
    from hfcompress.integrations.kv_cache import QuantizedKVLayer

__all__ = ["LAYERS", "LAYER_TAG", "TRACED_TAG", "kv_attention", "needs_grads", "traced_step", "use_triton"]

# update() tags a step's keys with their layer: kv_attention then knows the step and its cache.
LAYER_TAG = "_hfcompress_kv_layer"
TRACED_TAG = "_hfcompress_kv_traced_layer"  # the same, for a step the operators will store
# Queries per block when a multi-token step (a chunked prefill) attends over a stored history.
_QUERY_BLOCK = 256
# Queries from which a CPU step attends like a float cache, through SDPA over every token with
# the packed part dequantized (one pass in C), rather than through the C kernel, which scores
# the queries one by one against the codes: 1.1x-5.2x faster from 16 queries, slower at 8 and
# fewer (RESULTS.md, stop 50).
DEQUANTIZE_QUERIES = 16


def use_triton(x: torch.Tensor) -> bool:
    """Whether ``x``'s cache work runs the Triton kernels: CUDA, and a power-of-two head dim
    (the kernels tile it so; other head dims take the torch path)."""
    d = x.shape[-1]
    return x.is_cuda and d & (d - 1) == 0 and triton_available()


# -- attention --------------------------------------------------------------------------------


def _causal(q: int, total: int, device: torch.device) -> torch.Tensor:
    """``[Q, total]`` bool: every stored token visible, the new tokens causal among themselves."""
    return torch.ones(q, total, dtype=torch.bool, device=device).tril(diagonal=total - q)


def _check_mask(mask: torch.Tensor, total: int) -> None:
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"the hfcompress_kv attention expects a [B, 1, Q, T] mask, got {tuple(mask.shape)}")
    if mask.shape[-1] != total:
        raise ValueError(f"the attention mask covers {mask.shape[-1]} keys, the cache holds {total}")


def _bias(mask: torch.Tensor | None, b: int, q: int, total: int, device: torch.device) -> torch.Tensor | None:
    """``[B, Q, total]`` float32 additive bias from transformers' mask (None: causal)."""
    if mask is None:
        if q == 1:
            return None
        return torch.zeros(b, q, total, device=device).masked_fill_(~_causal(q, total, device), float("-inf"))
    _check_mask(mask, total)
    mask = mask[:, 0]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=device).masked_fill_(~mask, float("-inf"))
    return mask.float().expand(b, q, total)


def _attend_packed(q: torch.Tensor, packed: PackedKV, bias: torch.Tensor | None, sm_scale: float) -> Partial:
    if q.shape[2] == 1 and use_triton(q):
        from hfcompress_triton.kv import kv_decode_attention

        row_bias = None if bias is None else bias[:, 0]
        return Partial(*kv_decode_attention(q, *packed.tensors(), row_bias, packed.bits, packed.group_size, sm_scale))
    return attend_packed(q, packed, bias, sm_scale)


def _sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, sm_scale: float
) -> torch.Tensor:
    """SDPA with ``mask`` (bool, or additive in the inputs' dtype; ``[B, 1, Q, T]`` or ``[Q, T]``,
    None for none), the rows that see no key set to 0: some SDPA backends give such a row NaN
    (the CPU one gives 0), and only those rows are set, so that a NaN from the inputs still
    shows. ``[B, H, Q, D]``."""
    out = F.scaled_dot_product_attention(q, k, v, mask, scale=sm_scale, enable_gqa=True)
    if mask is None:
        return out
    dead = (~mask if mask.dtype == torch.bool else mask.isneginf()).all(-1)  # [B, 1, Q] or [Q]
    return out.masked_fill(dead[..., None], 0.0) if dead.any() else out


def _attend_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, sm_scale: float
) -> torch.Tensor:
    """:func:`~hfcompress.quant.kv.attend_dense`'s output (float32, a fully masked row 0)
    through SDPA, without the log-sum-exp: for a step whose keys are all full precision."""
    mask = None if bias is None else bias[:, None]  # [B, 1, Q, T], broadcast over the heads
    return _sdpa(q.float(), k.float(), v.float(), mask, sm_scale)


def _whole_step_sdpa(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, sm_scale: float
) -> torch.Tensor:
    """SDPA over a whole step's keys and values (every token, in order: what a float cache
    holds) with transformers' ``[B, 1, Q, T]`` mask as it is (None: causal), in the query's
    dtype; rows that see no key are 0, as in the other paths. ``[B, Q, H, D]``."""
    q_len, total = query.shape[2], keys.shape[2]
    if mask is None:
        mask = _causal(q_len, total, query.device)
    else:
        _check_mask(mask, total)
        mask = mask if mask.dtype == torch.bool else mask.to(query.dtype)
    return _sdpa(query, keys, values, mask, sm_scale).transpose(1, 2).contiguous()


def _cpu_step(
    q: torch.Tensor, packed: PackedKV, packed_bias, dense_k, dense_v, dense_bias, sm_scale: float
) -> torch.Tensor | None:
    """A whole CPU step (packed and dense parts in one softmax) in the C kernel, or None: no
    kernel, or queries that do not see the packed keys alike (the kernel shares their bias)."""
    if packed_bias is not None and q.shape[2] > 1 and not bool((packed_bias == packed_bias[:, :1]).all()):
        return None
    if not kv_cpu.available():
        return None
    out, _ = kv_cpu.PackedArgs.of_view(packed).attend(
        q,
        None if packed_bias is None else packed_bias[:, 0],
        sm_scale,
        dense_k,
        dense_v,
        dense_bias,
        out_dtype=torch.bfloat16 if q.dtype == torch.bfloat16 else torch.float32,
    )
    return out


def kv_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The ``hfcompress_kv`` attention function: over a :class:`QuantizedKVLayer`'s parts when
    ``key`` comes tagged from one that holds keys already; otherwise (a prefill, a forward
    without our cache) :func:`~hfcompress.integrations.attention.sequence_attention`: SDPA, or
    block-sparse attention when the model has it too."""
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise ValueError(
            "the hfcompress_kv attention computes SDPA's attention and cannot apply this model's logit soft-capping "
            "or attention sinks; switch the quantized KV cache off (hfcompress.disable_kv_cache)"
        )
    traced: QuantizedKVLayer | None = getattr(key, TRACED_TAG, None)
    if traced is not None:
        return _traced_attention(traced, module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    layer: QuantizedKVLayer | None = getattr(key, LAYER_TAG, None)
    if layer is None or layer._pending is None or layer._pending[0] is not key:
        return sequence_attention(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if not layer.holds_tokens():  # nothing stored yet (a prefill): the keys are all this call's
        out = sequence_attention(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
        layer.commit()
        return out
    sm_scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return _stored_attention(layer, query, key, value, attention_mask, sm_scale), None


def needs_grads(*tensors: torch.Tensor) -> bool:
    """Whether autograd will want gradients through any of ``tensors`` (the C paths have no backward)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _stored_attention(layer, query, key, value, attention_mask, sm_scale: float) -> torch.Tensor:
    """Attention of this step (its keys staged in ``layer``, which holds tokens already) over
    every part, then the step's tokens appended: ``[B, Q, H, D]``."""
    n_sink, n_packed, n_res = layer._sinks, layer.packed_tokens, layer._window
    b, _, q_len, _ = query.shape
    grads = needs_grads(query, key, value)
    # Many queries (a chunk of a prompt): SDPA over every token, like a float cache (CPU only;
    # elsewhere, and without the C code, whole_step gives None).
    if q_len >= DEQUANTIZE_QUERIES and not grads:
        whole = layer.whole_step(q_len)
        if whole is not None:
            out = _whole_step_sdpa(query, whole[0].to(query.dtype), whole[1].to(query.dtype), attention_mask, sm_scale)
            layer.commit()
            return out
    total = n_sink + n_packed + n_res + q_len
    bias = _bias(attention_mask, b, q_len, total, query.device)
    # The full-precision parts (sinks, window, this step's tokens, staged in that order in the
    # layer's buffers) attend as one: attention does not depend on the order of the keys, only
    # on each key's bias.
    dense_k, dense_v = layer.dense_parts(q_len)
    packed_bias = dense_bias = None
    if bias is not None:
        packed_bias = bias[..., n_sink : n_sink + n_packed]
        dense_bias = torch.cat([bias[..., :n_sink], bias[..., n_sink + n_packed :]], dim=-1)
    # Fewer queries: on CPU the C kernel takes the whole step (2x-9x faster than the torch path
    # below, RESULTS.md stop 48), unless the queries see the packed keys differently or the step
    # needs gradients (the kernel has no backward).
    if n_packed and query.device.type == "cpu" and not grads:
        out = _cpu_step(query, layer.packed(), packed_bias, dense_k, dense_v, dense_bias, sm_scale)
        if out is not None:
            layer.commit()
            return out.to(query.dtype).transpose(1, 2).contiguous()
    outs = []
    # Query blocks bound the [B, H, Q, T] scores of a long chunked prefill.
    for q0 in range(0, q_len, _QUERY_BLOCK):
        rows = slice(q0, q0 + _QUERY_BLOCK)
        qb = query[:, :, rows]
        dense_rows = None if dense_bias is None else dense_bias[:, rows]
        if not n_packed:  # one part: no log-sum-exp to merge, so SDPA (several times faster)
            outs.append(_attend_sdpa(qb, dense_k, dense_v, dense_rows, sm_scale))
            continue
        packed_rows = None if packed_bias is None else packed_bias[:, rows]
        parts = [attend_dense(qb, dense_k, dense_v, dense_rows, sm_scale)]
        parts.append(_attend_packed(qb, layer.packed(), packed_rows, sm_scale))
        outs.append(merge(parts).out)
    out = torch.cat(outs, dim=2).to(query.dtype)
    layer.commit()
    return out.transpose(1, 2).contiguous()


# -- under torch.compile ------------------------------------------------------------------------
#
# The cache's state (growing buffers, token counts, the packed part) is Python state that Dynamo
# would guard on and re-trace at every step, and its kernels are ctypes and Triton calls it
# cannot trace. While Dynamo traces, a step over stored tokens is therefore one operator,
# hfcompress::kv_attend, that runs the eager step above (store, attend, append) at run time on
# the layer its handle names; a prefill attends in the graph (SDPA, or block-sparse attention)
# and stores its tokens through hfcompress::kv_store. The only state the graph reads is the
# layer's token count (a prefill or not, and the positions), which Dynamo makes a symbolic
# integer after the first decode steps. Both operators change the cache, so they are marked
# unsafe for CUDA graphs (which would replay their kernels without running them).

LAYERS = compiled.Registry("QuantizedKVLayer", "hfcompress::kv_attend")


def traced_step(key: torch.Tensor) -> bool:
    """Whether this step goes through the operators: while Dynamo traces, without gradients
    (they have no backward; a step that needs one traces the eager code, with graph breaks)."""
    return torch.compiler.is_compiling() and not (key.requires_grad and torch.is_grad_enabled())


def _traced_attention(layer, module, query, key, value, attention_mask, dropout, scaling, **kwargs):
    if layer.cumulative_length == 0:  # a prefill: all keys are this call's
        out, _ = sequence_attention(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
        return torch.ops.hfcompress.kv_store(out, key, value, layer._handle), None
    sm_scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return torch.ops.hfcompress.kv_attend(query, key, value, attention_mask, layer._handle, sm_scale), None


def _kv_store(out: torch.Tensor, key: torch.Tensor, value: torch.Tensor, handle: torch.Tensor) -> torch.Tensor:
    layer: QuantizedKVLayer = LAYERS.get(int(handle))
    layer.update(key, value)
    layer.commit()
    return out.clone()  # an operator's output may not alias its input


def _kv_attend(query, key, value, mask, handle, sm_scale: float) -> torch.Tensor:
    layer: QuantizedKVLayer = LAYERS.get(int(handle))
    keys, values = layer.update(key, value)
    if getattr(keys, LAYER_TAG, None) is layer and layer.holds_tokens():
        return _stored_attention(layer, query, keys, values, mask, sm_scale)
    # The reference path (update returned the dequantized history and the new tokens), or a
    # cache emptied since the graph was traced: dense attention over all of it.
    b, _, q_len, _ = query.shape
    bias = _bias(mask, b, q_len, keys.shape[-2], query.device)
    out = attend_dense(query, keys, values, bias, sm_scale).out.to(query.dtype)
    layer.commit()
    return out.transpose(1, 2).contiguous()


def _kv_attend_fake(query, key, value, mask, handle, sm_scale):
    b, h, q_len, d = query.shape
    return query.new_empty((b, q_len, h, d))


_OPS = torch.library.Library("hfcompress", "FRAGMENT")
_OPS.define(
    "kv_store(Tensor out, Tensor key, Tensor value, Tensor handle) -> Tensor", tags=(torch.Tag.cudagraph_unsafe,)
)
_OPS.define(
    "kv_attend(Tensor query, Tensor key, Tensor value, Tensor? mask, Tensor handle, float sm_scale) -> Tensor",
    tags=(torch.Tag.cudagraph_unsafe,),
)
_OPS.impl("kv_store", _kv_store, "CompositeExplicitAutograd")
_OPS.impl("kv_attend", _kv_attend, "CompositeExplicitAutograd")
torch.library.register_fake("hfcompress::kv_store", lambda out, key, value, handle: torch.empty_like(out), lib=_OPS)
torch.library.register_fake("hfcompress::kv_attend", _kv_attend_fake, lib=_OPS)
