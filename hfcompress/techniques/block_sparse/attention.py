"""Block-sparse attention as a transformers attention function (``hfcompress_block_sparse``).

:func:`enable_block_sparse` attaches a :class:`SparseState` to every attention module and
switches the model's attention to :func:`block_sparse_attention`. Each call picks the layout
(``layout.py``) for the input and attends over the kept tiles: on CUDA through the Triton
kernel (:mod:`hfcompress_triton.block_sparse`), elsewhere, or with a padding mask or attention
dropout, through SDPA over the expanded token mask (the kernel's twin plus the mask).

Only forwards whose queries are the whole sequence, longer than one block and at least
``min_tokens`` long are sparse (a prefill, a training step, an encoder); a step over a cache
(decoding) attends densely.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hfcompress.architectures import outside_language_model
from hfcompress.errors import ModelError
from hfcompress.integrations.attention import (
    WINDOWED_LAYER_TYPES,
    check_attention_interface,
    check_layer_types,
    dense_attention,
    register_attention,
    restore_attention,
    set_inner_attention,
    switch_attention,
)
from hfcompress.quant.dispatch import _force_reference
from hfcompress.quant.triton_bridge import available as triton_available
from hfcompress.techniques.block_sparse import layout as L
from hfcompress.techniques.block_sparse.config import BlockSparseConfig

__all__ = [
    "ATTENTION",
    "SparseState",
    "attention_modules",
    "block_sparse_attention",
    "calibrate_tables",
    "choose_layout",
    "disable_block_sparse",
    "enable_block_sparse",
    "kept_density",
    "sparse_config",
    "states",
]

logger = logging.getLogger(__name__)

ATTENTION = "hfcompress_block_sparse"
_STATE = "_hfcompress_block_sparse"
_CONFIG = "_hfcompress_block_sparse_config"


@dataclasses.dataclass
class SparseState:
    """What one attention module needs: the config, its calibrated table (``calibrated``
    layout: ``[H, sinks + 2n - 1]``, see :func:`layout.distance_table`), fixed layouts cached
    per block count, and, while calibrating, the running sum of tables."""

    config: BlockSparseConfig
    table: torch.Tensor | None = None
    fixed: dict[tuple, torch.Tensor] = dataclasses.field(default_factory=dict)
    recorded: torch.Tensor | None = None
    recording: bool = False
    # The density actually kept by the last sparse call (diagonal and sinks included), and
    # the tiles kept and computable over every full-sequence call since enabling (a sequence
    # of one block runs dense and counts as fully kept).
    last_density: float | None = None
    kept_tiles: int = 0
    total_tiles: int = 0
    # A sliding-window or chunked layer of a hybrid model, or a multimodal model's vision
    # attention: it keeps its dense attention.
    windowed: bool = False

    def __setstate__(self, state: dict) -> None:
        # Unpickled (``torch.load`` of a whole model) in a process where the attention may not
        # be registered yet.
        self.__dict__.update(state)
        register_attention(ATTENTION, block_sparse_attention)


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules that call the attention function: those with ``is_causal`` and a config."""
    from transformers import PreTrainedModel

    return {
        name: module
        for name, module in model.named_modules()
        if hasattr(module, "is_causal") and hasattr(module, "config") and not isinstance(module, PreTrainedModel)
    }


def _sinks(n: int, cfg: BlockSparseConfig, causal: bool) -> torch.Tensor:
    # Encoders: the sink blocks are global both ways (BigBird's CLS block).
    return L.sink_layout(n, n, cfg.sink_blocks, causal=causal, global_rows=not causal)


def _fixed_layout(n: int, cfg: BlockSparseConfig, heads: int, causal: bool) -> torch.Tensor:
    """``local`` / ``bigbird``: the widest window whose layout stays within the density."""
    base = _sinks(n, cfg, causal)
    if cfg.layout == "bigbird" and cfg.random_blocks:
        base = base | L.random_layout(n, n, cfg.random_blocks, causal=causal, seed=cfg.seed, heads=heads)
    best = base | L.local_layout(n, n, 1, causal=causal)
    for window in range(2, n + 1):
        candidate = base | L.local_layout(n, n, window, causal=causal)
        if L.density(candidate, causal=causal) > cfg.density + 1e-9:
            break
        best = candidate
    return best.expand(heads, n, n) if best.dim() == 2 else best


def _visible_keys(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """``[B, T]`` bool: the keys some query may see under transformers' ``[B, 1, T, T]`` mask."""
    if attention_mask is None:
        return None
    if attention_mask.dtype == torch.bool:
        return attention_mask[:, 0].any(-2)
    return (attention_mask[:, 0] > torch.finfo(attention_mask.dtype).min / 2).any(-2)


def choose_layout(
    state: SparseState,
    query: torch.Tensor,
    key: torch.Tensor,
    causal: bool,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ``[B or 1, H, n, n]`` layout of one call.

    Args:
        state: The module's :class:`SparseState`.
        query: ``[B, H, T, D]``.
        key: ``[B, Hk, T, D]``.
        causal: Whether the attention is causal.
        attention_mask: transformers' ``[B, 1, T, T]`` mask: data-driven layouts estimate
            the mass over the keys it lets some query see (padding gets none).
    """
    cfg = state.config
    b, h, t, _ = query.shape
    n = L.num_blocks(t, cfg.block_size)
    if cfg.layout in ("local", "bigbird", "calibrated"):
        cache_key = (n, h, causal, query.device)
        if cache_key not in state.fixed:
            if cfg.layout == "calibrated":
                if state.table is None:
                    raise ModelError(
                        "a calibrated block-sparse layout has no table: calibrate it (a block_sparse stage)"
                    )
                reach = (state.table.shape[1] - cfg.sink_blocks + 1) // 2
                if n > reach:
                    logger.warning(
                        "the calibrated block-sparse layout was measured on sequences of %d blocks; this one has %d, "
                        "and its tiles farther than %d blocks score 0 (calibrate on windows as long as the inputs)",
                        reach, n, reach - 1,
                    )  # fmt: skip
                scores = L.table_scores(state.table.to(query.device), n, n, sinks=cfg.sink_blocks)
                fixed = L.topk_layout(scores, cfg.density, causal=causal, keep=_sinks(n, cfg, causal), scope=cfg.scope)
            else:
                fixed = _fixed_layout(n, cfg, h, causal)
            state.fixed[cache_key] = fixed.to(query.device)[None]
        return state.fixed[cache_key]
    keep = _sinks(n, cfg, causal).to(query.device)
    visible = _visible_keys(attention_mask)
    layouts = []
    with torch.no_grad():
        for i in range(b):
            if cfg.layout == "pooled":
                scores = L.pooled_scores(query[i], key[i].repeat_interleave(h // key.shape[1], 0), cfg.block_size)
            else:
                samples = None if cfg.layout == "oracle" else cfg.samples
                key_mask = None if visible is None else visible[min(i, len(visible) - 1)]
                scores = L.attention_mass(
                    query[i], key[i], cfg.block_size, causal=causal, samples=samples, key_mask=key_mask
                )
            layouts.append(L.topk_layout(scores, cfg.density, causal=causal, keep=keep, scope=cfg.scope))
    return torch.stack(layouts)


def _use_kernel(query: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float) -> bool:
    return query.is_cuda and attention_mask is None and dropout == 0.0 and triton_available() and not _force_reference()


def _masked_sdpa(query, key, value, layout, block, causal, scale, attention_mask, dropout) -> torch.Tensor:
    """SDPA over the layout's token mask combined with transformers' mask ([B, 1, T, T], bool
    or additive), grouped-query keys repeated."""
    from hfcompress_triton.block_sparse_ref import token_mask

    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    mask = token_mask(layout, block, query.shape[2], causal)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            mask = mask & attention_mask
        else:
            mask = (
                torch.zeros_like(attention_mask, dtype=query.dtype).masked_fill(~mask, float("-inf")) + attention_mask
            )
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scale)


def block_sparse_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The ``hfcompress_block_sparse`` attention function (``query: [B, H, T, D]``, ``key,
    value: [B, Hk, T, D]``); returns ``([B, T, H, D], None)`` as transformers expects."""
    state: SparseState | None = getattr(module, _STATE, None)
    if state is None:
        raise ModelError(
            f"{type(module).__name__} runs the block-sparse attention function but was not set up by "
            "enable_block_sparse (a module created after the switch?); call enable_block_sparse(model, ...) again"
        )
    if state.windowed:
        return dense_attention(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    cfg = state.config
    t, d = query.shape[2:]
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else bool(causal)
    if state.recording:
        _record(state, query, key, causal)
    if state.recording or key.shape[2] != t or t <= cfg.block_size or t < cfg.min_tokens or cfg.density >= 1:
        state.last_density = None
        if key.shape[2] == t and not state.recording:
            n = L.num_blocks(t, cfg.block_size)
            tiles = int(L.allowed(n, n, causal=causal).sum()) * query.shape[0] * query.shape[1]
            state.kept_tiles, state.total_tiles = state.kept_tiles + tiles, state.total_tiles + tiles
        return dense_attention(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    layout = choose_layout(state, query, key, causal, attention_mask)
    n = layout.shape[-1]
    ok = L.allowed(n, n, causal=causal, device=layout.device)
    kept = int((layout & ok).expand(query.shape[0], query.shape[1], n, n).sum())
    total = int(ok.sum()) * query.shape[0] * query.shape[1]
    state.last_density = kept / total
    state.kept_tiles, state.total_tiles = state.kept_tiles + kept, state.total_tiles + total
    scale = scaling if scaling is not None else d**-0.5
    if _use_kernel(query, attention_mask, dropout if module.training else 0.0):
        from hfcompress_triton.block_sparse import block_sparse_attention as kernel

        out = kernel(query, key, value, layout, cfg.block_size, causal, scale)
    else:
        drop = dropout if module.training else 0.0
        out = _masked_sdpa(query, key, value, layout, cfg.block_size, causal, scale, attention_mask, drop)
    return out.transpose(1, 2).contiguous(), None


def _record(state: SparseState, query: torch.Tensor, key: torch.Tensor, causal: bool) -> None:
    """Calibration: add this input's mass-by-place table (each sequence of the batch) to the sum."""
    cfg = state.config
    with torch.no_grad():
        for i in range(query.shape[0]):
            mass = L.attention_mass(query[i], key[i], cfg.block_size, causal=causal)
            table = L.distance_table(mass, sinks=cfg.sink_blocks, causal=causal).cpu()
            if state.recorded is not None and state.recorded.shape != table.shape:
                raise ModelError(
                    f"calibration sequences of different lengths give tables of {tuple(state.recorded.shape)} and "
                    f"{tuple(table.shape)}; calibrate the block-sparse layout on windows of one length"
                )
            state.recorded = table if state.recorded is None else state.recorded + table


def sparse_config(model: nn.Module) -> BlockSparseConfig | None:
    """The block-sparse config :func:`enable_block_sparse` set on ``model``, or None."""
    return getattr(model, _CONFIG, None)


def check_model(model: nn.Module) -> None:
    """Raise :class:`ModelError` if block-sparse attention cannot serve ``model``."""
    check_attention_interface(model, "block-sparse attention")
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise ModelError(
            f"{type(model).__name__} is an encoder-decoder model; block-sparse attention serves decoders and encoders"
        )
    types = check_layer_types(
        config.get_text_config(),
        "block-sparse attention",
        "replaces full attention",
        "its windowed attention costs linear time already",
    )
    modules = attention_modules(model)
    if not modules:
        raise ModelError(f"found no attention module in {type(model).__name__} (modules with is_causal and a config)")
    if types is not None and set(types) != {"full_attention"}:
        unplaced = [name for name, module in modules.items() if not isinstance(getattr(module, "layer_idx", None), int)]
        if unplaced:
            raise ModelError(
                f"{type(model).__name__} mixes layer types {sorted(set(types))}, and its attention module "
                f"{unplaced[0]!r} has no layer_idx to tell which kind it is"
            )


def _dense_modules(model: nn.Module, modules: dict[str, nn.Module]) -> set[str]:
    """Those of ``modules`` (:func:`attention_modules`) that keep dense attention: the attention of
    sliding-window or chunked layers, and a multimodal model's outside its language model (the
    vision tower's)."""
    types = getattr(model.config.get_text_config(), "layer_types", None) or []
    outside = outside_language_model(model)
    dense = set()
    for name, module in modules.items():
        index = getattr(module, "layer_idx", None)
        if name in outside or (isinstance(index, int) and index < len(types) and types[index] in WINDOWED_LAYER_TYPES):
            dense.add(name)
    return dense


def enable_block_sparse(
    model: nn.Module,
    config: BlockSparseConfig | None = None,
    tables: dict[str, torch.Tensor] | None = None,
    **kwargs: Any,
) -> BlockSparseConfig:
    """Switch ``model``'s attention to block-sparse attention.

    Args:
        model: A model whose attention goes through transformers' ``AttentionInterface``.
        config: The layout; or its fields as keyword arguments.
        tables: ``calibrated`` layout: each attention module's table (by module name).

    Raises:
        ModelError: The model's attention cannot be replaced, or a calibrated layout lacks a
            module's table.
    """
    config = config if config is not None else BlockSparseConfig(**kwargs)
    check_model(model)
    modules = attention_modules(model)
    dense = _dense_modules(model, modules)
    if config.layout == "calibrated":
        missing = sorted(set(modules) - dense - set(tables or {}))
        if missing:
            raise ModelError(
                f"the calibrated block-sparse layout has no table for {missing[:3]} (of {len(missing)} modules)"
            )
    register_attention(ATTENTION, block_sparse_attention)
    switch_attention(model, ATTENTION, "block-sparse attention")
    for name, module in modules.items():
        table = (
            None
            if tables is None or name not in tables
            else torch.tensor(tables[name], dtype=torch.float32, device="cpu")
        )
        _attach(module, SparseState(config, table, windowed=name in dense))
    object.__setattr__(model, _CONFIG, config)
    return config


def disable_block_sparse(model: nn.Module) -> None:
    """Undo :func:`enable_block_sparse`: the attention the model had before."""
    if sparse_config(model) is None:
        return
    restore_attention(model, ATTENTION)
    for module in attention_modules(model).values():
        _detach(module)
    object.__delattr__(model, _CONFIG)


def _attach(module: nn.Module, state: SparseState) -> None:
    """Give ``module`` its state, and block-sparse attention as its inner function (what the
    quantized KV cache's attention runs for a prefill)."""
    object.__setattr__(module, _STATE, state)
    set_inner_attention(module, block_sparse_attention)


def _detach(module: nn.Module) -> None:
    if hasattr(module, _STATE):
        object.__delattr__(module, _STATE)
    set_inner_attention(module, None)


def calibrate_tables(
    model: nn.Module, config: BlockSparseConfig, batches: list[dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Each attention module's table of mean attention mass by place (``calibrated`` layout),
    from dense forwards over ``batches`` (each a dict of model inputs, windows of one length).

    Returns:
        ``{module name: [H, sinks + 2n - 1] float32}``.
    """
    check_model(model)
    if sparse_config(model) is not None:
        raise ModelError("calibrate block-sparse layouts on a dense model: this one is block-sparse already")
    register_attention(ATTENTION, block_sparse_attention)
    switch_attention(model, ATTENTION, "block-sparse attention")
    modules = attention_modules(model)
    dense = _dense_modules(model, modules)
    for name, module in modules.items():
        _attach(module, SparseState(config, recording=name not in dense, windowed=name in dense))
    device = next(model.parameters()).device
    sequences = 0
    try:
        with torch.no_grad():
            for batch in batches:
                model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)
                sequences += len(batch["input_ids"])
    finally:
        recorded = {name: getattr(m, _STATE).recorded for name, m in modules.items() if name not in dense}
        for module in modules.values():
            _detach(module)
        restore_attention(model, ATTENTION)
    missing = [name for name, table in recorded.items() if table is None]
    if missing:
        raise ModelError(
            f"the calibration passes never reached the attention of {missing[:3]}; is the model's attention dense?"
        )
    broken = [name for name, table in recorded.items() if not torch.isfinite(table).all()]
    if broken:
        more = f" and {len(broken) - 1} after it" if len(broken) > 1 else ""
        raise ModelError(
            f"the attention of {broken[0]}{more} gave NaN or Inf during "
            "block-sparse calibration: the model's weights or activations are not finite (float16 may "
            "overflow where bfloat16 or float32 does not); fix the model before calibrating its layout"
        )
    return {name: table / sequences for name, table in recorded.items()}


def kept_density(model: nn.Module) -> float | None:
    """Tiles kept over tiles a dense attention computes, over every layer and full-sequence
    call since :func:`enable_block_sparse` (None before any)."""
    all_states = states(model).values()
    total = sum(s.total_tiles for s in all_states)
    return sum(s.kept_tiles for s in all_states) / total if total else None


def states(model: nn.Module) -> dict[str, SparseState]:
    """Each attention module's :class:`SparseState`, by module name."""
    return {name: getattr(m, _STATE) for name, m in attention_modules(model).items() if hasattr(m, _STATE)}
