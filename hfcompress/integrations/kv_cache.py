"""The quantized KV cache, as transformers sees it: a ``Cache`` of :class:`QuantizedKVLayer`
and an attention function registered through ``AttentionInterface`` (the one module that
touches transformers' cache API; the attention registration itself goes through
:mod:`hfcompress.integrations.attention`).

Each layer keeps, in token order: the first ``sink_tokens`` tokens in full precision (the
attention sinks), a packed KIVI part (keys per channel, values per token, ``bits`` bits) that
grows ``group_size`` tokens at a time, and the most recent tokens in full precision (the
residual window). A token is quantized once, when it leaves the window, never again.

How attention reads it: ``update`` does not return the whole history. It writes the step's
new keys and values after the stored full-precision ones (not yet counted in) and returns
them tagged with the layer; the registered attention function (``hfcompress_kv``,
:mod:`hfcompress.integrations.kv_attention`) then attends to the packed part and to the
full-precision tokens, the step's own included, as one view of the layer's buffer, merges the
parts exactly, and only then counts the new tokens in. A CPU step is one call of the C kernel
(:mod:`hfcompress.quant.kv_cpu`: the packed part and the full-precision parts in one softmax),
for one query token or up to 15; from 16 (a chunk of a prompt) the packed part is dequantized
in one pass of C code and the step attends through SDPA over every token (:meth:`whole_step`).
A CUDA decode step reads the packed part with the Triton split-K kernel; a CUDA multi-token
step, and any step that needs gradients, reads it chunk by chunk
(:func:`hfcompress.quant.kv.attend_packed`). A step before anything is packed (the first
``sink_tokens + residual_length + group_size`` tokens or so) has full-precision keys only
and attends through SDPA in float32. A model whose attention is not ``hfcompress_kv`` gets the
whole history from ``update``, dequantized (on CPU by the same C pass, :meth:`whole_step`);
under ``dispatch.reference_path()`` the history is dequantized in torch
(:meth:`history`): the same numbers by a slower road.

Under ``torch.compile`` a step over stored tokens is one operator per layer,
``hfcompress::kv_attend``, which runs the eager step at run time; a prefill attends in the
graph and stores its tokens through ``hfcompress::kv_store`` (see "under torch.compile" in
:mod:`hfcompress.integrations.kv_attention`). A model with the ``hfcompress_kv`` attention then
compiles into a prefill graph and one decode graph, however long the cache grows.
"""

from __future__ import annotations

import functools
import inspect
import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch
from hfcompress_triton.kv_ref import kv_quantize_ref
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache

from hfcompress.errors import ModelError
from hfcompress.integrations.attention import (
    check_attention_interface,
    check_layer_types,
    declare_outer,
    register_attention,
    restore_attention,
    switch_attention,
)
from hfcompress.integrations.kv_attention import (
    LAYER_TAG,
    LAYERS,
    TRACED_TAG,
    kv_attention,
    needs_grads,
    traced_step,
    use_triton,
)
from hfcompress.quant import kv_cpu
from hfcompress.quant.dispatch import _force_reference
from hfcompress.quant.kv import PackedKV
from hfcompress.techniques.kv_cache.config import KVCacheConfig

__all__ = ["ATTENTION", "QuantizedKVCache", "QuantizedKVLayer", "disable_kv_cache", "enable_kv_cache", "kv_config"]

logger = logging.getLogger(__name__)

ATTENTION = "hfcompress_kv"
declare_outer(ATTENTION)  # reads the packed cache; calls without stored keys go to sequence_attention
_CONFIG_ATTR = "_hfcompress_kv_cache"
# Packed storage grows by at least this many tokens (or an eighth of what it holds) at a time.
_GROW_TOKENS = 256


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


class QuantizedKVLayer(CacheLayerMixin):
    """One attention layer's cache: sinks, packed part, residual window (module docstring)."""

    is_compileable = False
    is_croppable = True  # see crop: exact within the full-precision window
    is_sliding = False

    def __init__(self, spec: KVCacheConfig, fused: Callable[[], bool]) -> None:
        super().__init__()
        self.spec = spec
        self._fused = fused
        self.cumulative_length = 0
        self._clear()
        self._register()

    def _register(self) -> None:
        # What the torch.compile operators call this layer by: a tensor, so that a compiled
        # graph takes it as an input and serves every cache, not a constant baked into it.
        self._handle = torch.tensor(LAYERS.add(self))

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._packed_view = None  # views of the copy's own buffers, made when first needed
        self._register()  # a copy (deepcopy, pickle) is a layer of its own

    def _clear(self) -> None:
        # The full-precision tokens, the sinks then the window, at the front of one buffer each
        # for keys and values, [B, H, capacity, D]. A step's tokens are written right after them
        # before its attention runs (which then reads sinks, window and step as one view, with
        # no copy) and counted in when the step commits.
        self._dense: tuple[torch.Tensor, torch.Tensor] | None = None
        self._sinks = self._window = 0  # tokens of each, in the buffers
        self._store: dict[str, torch.Tensor] = {}  # packed buffers with spare capacity
        self.packed_tokens = 0
        self._packed_view: PackedKV | None = None  # packed()'s views, until the packed part changes
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.is_initialized = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        b, h, _, d = key_states.shape
        if value_states.shape[-1] != d or value_states.shape[1] != h:
            raise ModelError(
                f"keys of {h} heads x {d} channels and values of {value_states.shape[1]} x {value_states.shape[-1]}: "
                "the quantized KV cache stores keys and values of one shape (multi-head latent attention, as in "
                "DeepSeek-V3, is not supported); use the model's default cache"
            )
        _check_head_dim(d, self.spec)
        self._dense = (key_states.new_zeros(b, h, 0, d), value_states.new_zeros(b, h, 0, d))
        self.is_initialized = True

    # The stored full-precision parts, as views of the buffers ([B, H, S or R, D]; None before
    # the first step). Read-only: CacheLayerMixin's constructor sets them to None.
    def _part(self, which: int, start: int, end: int) -> torch.Tensor | None:
        return None if self._dense is None else self._dense[which][..., start:end, :]

    def _read_only(self, value: Any) -> None:
        if value is not None:
            raise AttributeError("QuantizedKVLayer's stored tokens are views of its buffers and cannot be assigned")

    sink_keys = property(lambda self: self._part(0, 0, self._sinks), _read_only)
    sink_values = property(lambda self: self._part(1, 0, self._sinks), _read_only)
    keys = property(lambda self: self._part(0, self._sinks, self._sinks + self._window), _read_only)  # the window
    values = property(lambda self: self._part(1, self._sinks, self._sinks + self._window), _read_only)

    def dense_parts(self, step_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sinks, window and the staged step's ``step_tokens`` tokens, in that order, as views
        ``[B, H, S + R + Q, D]`` (the head's rows contiguous)."""
        end = self._sinks + self._window + step_tokens
        return self._dense[0][..., :end, :], self._dense[1][..., :end, :]

    # -- writing ---------------------------------------------------------------------------

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Take this step's ``[B, H, Q, D]`` keys and values.

        With the ``hfcompress_kv`` attention they are returned tagged and appended after
        attention; otherwise the dequantized history followed by them is returned (see
        :meth:`whole_step`; :meth:`history` on the reference path).
        """
        if traced_step(key_states) and self._fused():
            # Traced: the hfcompress_kv attention stores the tokens inside its operator, at
            # run time (module docstring), so nothing here is read or changed while tracing.
            setattr(key_states, TRACED_TAG, self)
            return key_states, value_states
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.commit()
        self.cumulative_length += key_states.shape[-2]
        if self._fused():
            self._stage(key_states, value_states)
            self._pending = (key_states, value_states)
            setattr(key_states, LAYER_TAG, self)
            return key_states, value_states
        # Another attention function: it gets every token. The packed part is dequantized in C
        # (several times faster than torch ops), except on the reference path and under autograd
        # (the returned step must carry its graph).
        q = key_states.shape[-2]
        self._stage(key_states, value_states)
        grads = needs_grads(key_states, value_states)
        whole = None if grads or _force_reference() else self.whole_step(q)
        if whole is None:
            keys, values = self.history()
            whole = torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)
        self._count_in(q)
        return whole

    def commit(self) -> None:
        """Append the tokens of the last fused step (after its attention ran; they are in the
        buffers already, see :meth:`_stage`)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._count_in(pending[0].shape[-2])

    def _stage(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write ``k, v: [B, H, Q, D]`` after the stored full-precision tokens, not yet counted
        in; the buffers grow (a copy of what they hold) when they lack the room."""
        used, q = self._sinks + self._window, k.shape[-2]
        if used + q > self._dense[0].shape[-2]:
            self._resize(max(used + q, self._steady_capacity()))
        keys, values = self._dense
        keys[..., used : used + q, :] = k
        values[..., used : used + q, :] = v

    def _steady_capacity(self) -> int:
        """Buffer tokens that hold the sinks, the window at its longest and a decoding step."""
        spec = self.spec
        return spec.sink_tokens + spec.residual_length + 2 * spec.group_size

    def _resize(self, capacity: int) -> None:
        """New buffers of ``capacity`` tokens holding what the old ones hold (a copy)."""
        used = self._sinks + self._window
        resized = []
        for old in self._dense:
            new = old.new_empty(*old.shape[:2], capacity, old.shape[-1])
            new[..., :used, :] = old[..., :used, :]
            resized.append(new)
        self._dense = tuple(resized)

    def _count_in(self, q: int) -> None:
        """Count the ``q`` staged tokens in: the first ones fill the sinks (the window is empty
        until they are full), the rest join the window; whole groups beyond
        ``residual_length`` leave the window for the packed part."""
        to_sinks = min(max(self.spec.sink_tokens - self._sinks, 0), q)
        self._sinks += to_sinks
        self._window += q - to_sinks
        g = self.spec.group_size
        leaving = (self._window - self.spec.residual_length) // g * g
        if leaving > 0:
            s, rest = self._sinks, self._window - leaving
            keys, values = self._dense
            self._pack(keys[..., s : s + leaving, :], values[..., s : s + leaving, :])
            for buf in self._dense:  # the rest of the window moves up to the sinks
                buf[..., s : s + rest, :] = buf[..., s + leaving : s + leaving + rest, :].clone()
            self._window = rest
            if self._dense[0].shape[-2] > 2 * self._steady_capacity():
                # a long prompt grew the buffers to its length: give that memory back, or the
                # cache would hold the prompt in full precision as well as packed
                self._resize(self._steady_capacity())

    def _pack(self, k: torch.Tensor, v: torch.Tensor) -> None:
        spec, scale_dtype = self.spec, _dtype(self.spec.scale_dtype)
        kp, ks, kz = _quantize(k, spec.bits, spec.group_size, "channel", scale_dtype)
        vp, vs, vz = _quantize(v, spec.bits, spec.group_size, "token", scale_dtype)
        new = {"kp": kp, "ks": ks, "kz": kz, "vp": vp, "vs": vs, "vz": vz}
        start, end = self.packed_tokens, self.packed_tokens + k.shape[-2]
        self._reserve(end, new)
        g = spec.group_size
        for name, t in new.items():
            lo, hi = (start // g, end // g) if name in ("ks", "kz") else (start, end)
            self._store[name][:, :, lo:hi] = t
        self.packed_tokens = end
        self._packed_view = None

    def _reserve(self, tokens: int, like: dict[str, torch.Tensor]) -> None:
        g = self.spec.group_size
        capacity = self._store["kp"].shape[2] if self._store else 0
        if tokens <= capacity:
            return
        grow = max(tokens - capacity, _GROW_TOKENS, capacity // 8)
        capacity = -(-(capacity + grow) // g) * g
        old = self._store
        self._store = {}
        for name, t in like.items():
            rows = capacity // g if name in ("ks", "kz") else capacity
            self._store[name] = t.new_empty(*t.shape[:2], rows, t.shape[3])
            if old:
                self._store[name][:, :, : old[name].shape[2]] = old[name]

    # -- reading ---------------------------------------------------------------------------

    def holds_tokens(self) -> bool:
        """Whether tokens are stored (the staged step's excluded)."""
        return self.is_initialized and bool(self._sinks + self.packed_tokens + self._window)

    def packed(self) -> PackedKV | None:
        """The packed part (views of the used tokens), or None while it is empty. The views are
        made once per change of the packed part (every ``group_size`` tokens when decoding):
        six slices cost about 25 us, a tenth of a decoding step's attention at 512 tokens."""
        if not self.packed_tokens:
            return None
        if self._packed_view is None:
            self._packed_view = self._make_packed_view()
        return self._packed_view

    def _make_packed_view(self) -> PackedKV:
        n, g, s = self.packed_tokens, self.spec.group_size, self._store
        return PackedKV(
            s["kp"][:, :, :n],
            s["ks"][:, :, : n // g],
            s["kz"][:, :, : n // g],
            s["vp"][:, :, :n],
            s["vs"][:, :, :n],
            s["vz"][:, :, :n],
            self.spec.bits,
            g,
        )

    def history(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every stored token, the packed ones dequantized: ``(keys, values)`` ``[B, H, T, D]``
        (the reference path)."""
        packed = self.packed()
        keys, values = [self.sink_keys], [self.sink_values]
        if packed is not None:
            pk, pv = packed.dequantize(self.dtype)
            keys.append(pk)
            values.append(pv)
        return torch.cat([*keys, self.keys], dim=-2), torch.cat([*values, self.values], dim=-2)

    def whole_step(self, step_tokens: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Every stored token and the staged step's ``step_tokens``, in order (sinks, packed,
        window, step), as new ``[B, H, T, D]`` keys and values in the buffers' dtype: what a
        float cache would hold. The packed part is dequantized in one pass of C code, bit for bit
        :meth:`history`'s; None on another device, without the C code, or for what it does not
        write (float16, a head dim over 512)."""
        packed = self.packed()
        b, h, _, d = self._dense[0].shape
        if (
            packed is None
            or self._dense[0].device.type != "cpu"
            or not kv_cpu.available()
            or self.dtype not in (torch.float32, torch.bfloat16)
            or d > kv_cpu.MAX_DEQUANTIZE_HEAD_DIM
        ):
            return None
        s, tp, rest = self._sinks, packed.tokens, self._window + step_tokens
        whole = torch.empty(2, b, h, s + tp + rest, d, dtype=self.dtype)
        kv_cpu.PackedArgs.of_view(packed).dequantize_into(whole[0, :, :, s:], whole[1, :, :, s:])
        for out, buf in zip(whole, self._dense, strict=True):
            out[:, :, :s] = buf[:, :, :s]
            out[:, :, s + tp :] = buf[:, :, s : s + rest]
        return whole[0], whole[1]

    def _full_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.sink_keys, self.sink_values))

    def nbytes(self) -> int:
        """Bytes of what is stored: full-precision parts, codes, scales and zeros (the spare
        capacity of the packed buffers excluded; see :meth:`allocated_bytes`)."""
        if not self.is_initialized:
            return 0
        packed = self.packed()
        stored = () if packed is None else packed.tensors()
        return self._full_bytes() + sum(t.numel() * t.element_size() for t in stored)

    def allocated_bytes(self) -> int:
        """Bytes held, the buffers' spare capacity included."""
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in (*self._dense, *self._store.values()))

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.cumulative_length = 0
        self._clear()

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (transformers' convention: assisted and
        prompt-lookup decoding drop the rejected draft tokens this way); a positive value is the
        length to keep, as transformers 5's earlier releases called it.

        Exact while the dropped tokens are in the full-precision window, which holds at least
        ``residual_length`` tokens once the sinks are full: the cache is then as if it had never
        seen them. Dropping further cuts into the packed part a group at a time; a cut group's
        surviving tokens return to the window as their dequantized values.
        """
        if not self.is_initialized:
            return
        self.commit()
        stored = self._sinks + self.packed_tokens + self._window
        drop = -tokens_to_remove if tokens_to_remove <= 0 else max(stored - tokens_to_remove, 0)
        drop = min(drop, stored)
        if drop == 0:
            return
        self.cumulative_length -= drop
        if drop <= self._window:
            self._window -= drop
            return
        drop -= self._window
        self._window = 0
        if drop > self.packed_tokens:  # everything packed goes, and some sinks
            self._sinks -= drop - self.packed_tokens
            self.packed_tokens, self._packed_view = 0, None
            return
        g, keep = self.spec.group_size, self.packed_tokens - drop
        whole = keep // g * g
        if keep > whole:  # the cut group's first tokens, dequantized, become the window
            keys, values = self.packed().dequantize(self.dtype)
            s, n = self._sinks, keep - whole
            if s + n > self._dense[0].shape[-2]:
                self._resize(self._steady_capacity())
            self._dense[0][..., s : s + n, :] = keys[..., whole:keep, :]
            self._dense[1][..., s : s + n, :] = values[..., whole:keep, :]
            self._window = n
        self.packed_tokens, self._packed_view = whole, None

    # -- batch reordering (beam search and friends): exact, nothing is re-quantized ------------

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if not self.is_initialized:
            return
        self.commit()
        self._dense = (fn(self._dense[0]), fn(self._dense[1]))
        self._store = {name: fn(t) for name, t in self._store.items()}
        self._packed_view = None

    def offload(self) -> None:
        if self.is_initialized:
            self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.is_initialized and self._dense[0].device != self.device:
            self._map(lambda t: t.to(self.device, non_blocking=True))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices, ...])


def _check_head_dim(d: int, spec: KVCacheConfig) -> None:
    if d % (8 // spec.bits) or (d > spec.group_size and d % spec.group_size):
        raise ModelError(
            f"head dim {d} cannot be quantized in groups of {spec.group_size} channels at {spec.bits} bits; choose a "
            "group_size that divides the head dim, or one at least as large (one group per token)"
        )


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _quantize(x, bits, group_size, axis, scale_dtype):
    if use_triton(x):
        from hfcompress_triton.kv import kv_quantize

        return kv_quantize(x, bits, group_size, axis, scale_dtype)
    return kv_quantize_ref(x, bits, group_size, axis, scale_dtype)


class QuantizedKVCache(Cache):
    """A transformers ``Cache`` whose layers store keys and values in ``bits`` bits.

    Pass it to ``generate(..., cache=QuantizedKVCache(model.config, bits=4))`` (transformers
    before 5.40 also accepts ``past_key_values=``), or call :func:`enable_kv_cache` once so
    that every ``generate`` builds one. Attention reads the packed cache only when the model
    runs the ``hfcompress_kv`` attention (:func:`enable_kv_cache` sets it); otherwise each
    step dequantizes the history (correct, slower).

    Args:
        config: The model's config (its text config for a multimodal model).
        **kwargs: The fields of :class:`KVCacheConfig` (``bits``, ``group_size``,
            ``residual_length``, ``sink_tokens``, ``scale_dtype``); or ``spec=`` one.
    """

    def __init__(self, config: Any, spec: KVCacheConfig | None = None, **kwargs: Any) -> None:
        spec = spec if spec is not None else KVCacheConfig(**kwargs)
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        kinds = _layer_kinds(text)
        _check_head_dim(_head_dim(text), spec)
        self.spec = spec
        self._config = text
        fused = self._fused
        super().__init__(layers=[QuantizedKVLayer(spec, fused) if kind is None else kind() for kind in kinds])

    def _fused(self) -> bool:
        # While Dynamo traces, the reference-path switch is read at run time, in the operators.
        if getattr(self._config, "_attn_implementation", None) != ATTENTION:
            return False
        return torch.compiler.is_compiling() or not _force_reference()

    def nbytes(self) -> int:
        """Bytes stored over all layers (:meth:`QuantizedKVLayer.nbytes`; a sliding-window layer's
        float keys and values)."""
        return sum(
            layer.nbytes() if isinstance(layer, QuantizedKVLayer) else _float_bytes(layer) for layer in self.layers
        )

    def allocated_bytes(self) -> int:
        """Bytes held over all layers, spare packed capacity included."""
        return sum(
            layer.allocated_bytes() if isinstance(layer, QuantizedKVLayer) else _float_bytes(layer)
            for layer in self.layers
        )


def _float_bytes(layer: CacheLayerMixin) -> int:
    if not getattr(layer, "is_initialized", False):
        return 0
    return sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if isinstance(t, torch.Tensor))


def _layer_kinds(config: Any) -> list[Callable[[], CacheLayerMixin] | None]:
    """Per layer, None for a full-attention layer (a :class:`QuantizedKVLayer`), else the maker of
    transformers' own cache layer for a windowed one. A config without ``layer_types`` has full
    attention everywhere, as far as the cache goes (Mistral's ``sliding_window`` then masks
    within it, as transformers' masks do).

    Raises:
        ModelError: a layer type with no attention to quantize (linear attention, state-space
            layers), or no full-attention layer at all.
    """
    from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, get_layer_types_and_kwargs

    types = check_layer_types(
        config,
        "the quantized KV cache",
        "quantizes full-attention layers",
        "its sliding-window caches are bounded by the window already; use the model's default cache",
        fix=", whose caches it cannot hold: use the model's default cache",
    )
    if types is None:
        return [None] * config.num_hidden_layers
    _, kwargs = get_layer_types_and_kwargs(config)
    return [
        None if kind == "full_attention" else functools.partial(DYNAMIC_LAYER_TYPE_MAPPING[kind], **kw)
        for kind, kw in zip(types, kwargs, strict=True)
    ]


# -- switching it on --------------------------------------------------------------------------


def kv_config(model: nn.Module) -> KVCacheConfig | None:
    """The KV-cache config :func:`enable_kv_cache` set on ``model``, or None."""
    return getattr(model, _CONFIG_ATTR, None)


def enable_kv_cache(model: nn.Module, spec: KVCacheConfig | None = None, **kwargs: Any) -> KVCacheConfig:
    """Make ``model.generate`` use a :class:`QuantizedKVCache` by default (and an eval-mode
    forward with ``use_cache`` and no cache, a hand-written decoding loop's first step), and its
    attention read the packed cache (``hfcompress_kv``, SDPA for everything else).

    Args:
        model: A decoder model whose attention goes through transformers' ``AttentionInterface``.
        spec: The cache config; or its fields as keyword arguments.

    Raises:
        ModelError: The model cannot generate, or its attention does not use ``AttentionInterface``
            or is not SDPA's, or it has layers other than full-attention, sliding-window and chunked
            ones, or no full-attention layer (sliding-window and chunked layers keep transformers'
            own float caches, bounded by their window).
    """
    spec = spec if spec is not None else KVCacheConfig(**kwargs)
    check_model(model, spec)
    register_attention(ATTENTION, kv_attention)
    switch_attention(model, ATTENTION, "the quantized KV cache")
    if kv_config(model) is None:
        object.__setattr__(model, "_prepare_cache_for_generation", _PrepareCache(model))
        _replace_default_cache_implementation(model)
        model.register_forward_pre_hook(_default_forward_cache, with_kwargs=True)
    object.__setattr__(model, _CONFIG_ATTR, spec)
    return spec


def _default_forward_cache(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """A forward pre-hook: a forward that would build transformers' float ``DynamicCache`` (no
    cache passed, ``use_cache`` on; a hand-written decoding loop's first step) gets a
    :class:`QuantizedKVCache` instead, so the loop's later steps store packed keys and values as
    ``generate`` does. Training-mode forwards (nobody decodes from their cache) are left alone.
    ``generate`` passes its own cache, so this does nothing there."""
    spec = kv_config(module)
    if spec is None or module.training or any(kwargs.get(key) is not None for key in _CACHE_KEYS):
        return None  # generate's steps end here: it passes its cache by keyword
    params = _forward_params(type(module))
    given = {**dict(zip(params, args, strict=False)), **kwargs}  # forward(*args) may pass fewer
    if any(given.get(key) is not None for key in _CACHE_KEYS):
        return None
    use_cache = given.get("use_cache")
    if use_cache is None:
        use_cache = getattr(module.config.get_text_config(decoder=True), "use_cache", False)
    key = next((k for k in _CACHE_KEYS if k in params), None)
    if not use_cache or key is None or key in params[: len(args)]:
        return None
    kwargs = {k: v for k, v in kwargs.items() if k not in _CACHE_KEYS}
    kwargs[key] = QuantizedKVCache(module.config, spec=spec)
    return args, kwargs


_CACHE_KEYS = ("cache", "past_key_values")


@functools.cache
def _forward_params(cls: type) -> tuple[str, ...]:
    """The names of ``cls.forward``'s parameters after ``self``, in order."""
    return tuple(inspect.signature(cls.forward).parameters)[1:]


def _remove_default_forward_cache(model: nn.Module) -> None:
    ids = [i for i, hook in model._forward_pre_hooks.items() if hook is _default_forward_cache]
    for i in ids:
        model._forward_pre_hooks.pop(i)
        model._forward_pre_hooks_with_kwargs.pop(i, None)


_DEFAULT_IMPLEMENTATION_ATTR = "_hfcompress_kv_replaced_cache_implementation"


def _replace_default_cache_implementation(model: nn.Module) -> None:
    """A checkpoint's generation_config may name a cache (``cache_implementation: "static"``,
    for compiled decoding): generate would build that float cache and never ours. The
    quantized cache takes its place as the default; a cache named in one ``generate`` call is
    still honoured (with a warning). (Gemma's ``"hybrid"`` default transformers drops itself.)"""
    generation_config = getattr(model, "generation_config", None)
    named = getattr(generation_config, "cache_implementation", None)
    if named in (None, "dynamic"):
        return
    logger.info("the quantized KV cache replaces the generation_config's cache_implementation=%r", named)
    generation_config.cache_implementation = None
    object.__setattr__(model, _DEFAULT_IMPLEMENTATION_ATTR, named)


class _PrepareCache:
    """``model._prepare_cache_for_generation`` while the quantized cache is on: generate's own
    cache preparation, then its default DynamicCache swapped for ours (a cache the caller passed,
    or one named by ``cache_implementation``, is left alone, the latter with a warning). An
    object rather than a bound method, so that the model pickles (``torch.save(model)``) and a
    deep copy prepares its own cache (the copy holds a copy of it)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, generation_config, model_kwargs, *args, **kwargs):
        model = self.model
        result = type(model)._prepare_cache_for_generation(model, generation_config, model_kwargs, *args, **kwargs)
        named = getattr(generation_config, "cache_implementation", None)
        if named not in (None, "dynamic"):
            # The caller asked for another cache by name (static, offloaded, quantized): honour it,
            # but say that this call stores its keys and values without the model's KV stage.
            if any(model_kwargs.get(key) is not None for key in ("cache", "past_key_values")):
                spec = kv_config(model)
                warnings.warn(
                    f"generate(cache_implementation={named!r}) uses transformers' cache of that name, not this "
                    f"model's {spec.bits}-bit KV cache (its kv_cache stage); leave cache_implementation unset "
                    "(or pass cache=hfcompress.QuantizedKVCache(...)) to store keys and values packed",
                    UserWarning,
                    stacklevel=4,
                )
            return result
        for key in ("cache", "past_key_values"):
            cache = model_kwargs.get(key)
            if type(cache) is DynamicCache and not getattr(cache, "_is_user_defined", False):
                model_kwargs[key] = QuantizedKVCache(model.config, spec=kv_config(model))
        return result

    def __setstate__(self, state: dict) -> None:
        # Unpickled in a process where the attention may not be registered yet.
        self.__dict__.update(state)
        register_attention(ATTENTION, kv_attention)


def disable_kv_cache(model: nn.Module) -> None:
    """Undo :func:`enable_kv_cache`: the default cache and the attention the model had before."""
    if kv_config(model) is None:
        return
    restore_attention(model, ATTENTION)
    _remove_default_forward_cache(model)
    for attr in (_CONFIG_ATTR, "_prepare_cache_for_generation"):
        object.__delattr__(model, attr)
    named = model.__dict__.get(_DEFAULT_IMPLEMENTATION_ATTR)
    if named is not None:  # the checkpoint's own default comes back
        model.generation_config.cache_implementation = named
        object.__delattr__(model, _DEFAULT_IMPLEMENTATION_ATTR)


def check_model(model: nn.Module, spec: KVCacheConfig | None = None) -> None:
    """Raise :class:`ModelError` if the quantized KV cache (with ``spec``) cannot serve ``model``."""
    name = type(model).__name__
    can_generate = getattr(model, "can_generate", None)
    if not (callable(can_generate) and can_generate()):
        raise ModelError(
            f"{name} does not generate text, so it has no KV cache to quantize (a kv_cache stage needs a decoder)"
        )
    check_attention_interface(model, "the quantized KV cache")
    config = model.config.get_text_config(decoder=True)
    if getattr(config, "is_encoder_decoder", False):
        raise ModelError(f"{name} is an encoder-decoder model; the quantized KV cache serves decoder-only models")
    _layer_kinds(config)
    v_dim = getattr(config, "v_head_dim", None)
    k_dim = getattr(config, "qk_head_dim", None) or _head_dim(config)
    if getattr(config, "kv_lora_rank", None) or (v_dim is not None and v_dim != k_dim):
        raise ModelError(
            f"{name} uses multi-head latent attention (keys of {k_dim} channels, values of {v_dim}); the quantized KV "
            "cache stores keys and values of one shape per head: this model is not supported"
        )
    if spec is not None:
        _check_head_dim(_head_dim(config), spec)
