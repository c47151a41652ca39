"""Applies :class:`RotationConfig` and registers the ``rotation`` patch.

The weights are rotated in place (float64 arithmetic, cast back to the model's dtype). What
the rotated model needs at run time besides its weights is the patch: the final norm as a
:class:`RotatedRMSNorm` and the online Hadamard transform of each down projection's input.
``from_pretrained`` re-applies it from the saved config before the weights load.

The online transform is a forward pre-hook on whichever module sits at ``mlp.down_proj``
(a float Linear, a ``QuantLinear`` after ``rtn``/``gptq``, a learned-rounding stand-in).
Stages replace that module, so the MLP installs the hook on its current down projection
before each call, first in the hook order: every hook a stage adds to observe the layer's
input (GPTQ's Hessian, activation observers) sees the rotated input the weight is paired
with. ``mlp.down_proj(h)`` keeps its meaning: ``h`` is the unrotated gated product.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hfcompress.architectures import blocks_of, outside_language_model, text_config
from hfcompress.errors import ModelError
from hfcompress.kinds import CompressedModule, is_linear_like
from hfcompress.modifier import CompressionContext, ModelView, Modifier
from hfcompress.norms import norm_gain, norm_offset, set_norm_gain
from hfcompress.patches import earlier_patch, record_patch, register_patch
from hfcompress.techniques.rotation.config import RotationConfig
from hfcompress.techniques.rotation.hadamard import block_hadamard, ffn_block_size, hadamard_matrix, random_orthogonal

__all__ = ["PATCH", "RotatedRMSNorm", "RotationModifier"]

PATCH = "rotation"


@dataclass(frozen=True)
class _Layout:
    """Where a block's rotated linears are, relative to the block: those reading the attention
    norm and the MLP norm, those writing the residual stream, and the value projection (a
    layer, or the rows of a fused q/k/v layer that ``value_rows`` picks)."""

    attention_inputs: tuple[str, ...]
    mlp_inputs: tuple[str, ...]
    attention_output: str = "self_attn.o_proj"
    mlp_output: str = "mlp.down_proj"
    value: str = "self_attn.v_proj"
    fused_qkv: bool = False
    attention_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    # A mixture of experts at `mlp` (fused expert tensors, a router, maybe a shared expert): its
    # weights are found by shape and name (:func:`_moe_weights`); no online transform there.
    moe: bool = False

    def paths(self) -> tuple[str, ...]:
        """The block's linear layers that the rotation rewrites (an MoE's weights not included)."""
        mlp = () if self.moe else (*self.mlp_inputs, self.mlp_output)
        return (*self.attention_inputs, self.attention_output, *mlp)

    def value_rows(self, text, head_dim: int) -> slice | None:
        """The value projection's rows within a fused q/k/v layer (None: a layer of its own)."""
        if not self.fused_qkv:
            return None
        q = text.num_attention_heads * head_dim
        kv = (getattr(text, "num_key_value_heads", None) or text.num_attention_heads) * head_dim
        return slice(q + kv, q + 2 * kv)


_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_SEPARATE = _Layout(_ATTENTION, ("mlp.gate_proj", "mlp.up_proj"))
_FUSED = _Layout(("self_attn.qkv_proj",), ("mlp.gate_up_proj",), value="self_attn.qkv_proj", fused_qkv=True)
_UP_ONLY = _Layout(_ATTENTION, ("mlp.up_proj",))  # an MLP without a gate (Arcee's ReLU^2)
_MOE = _Layout(_ATTENTION, (), moe=True)
# Pre-norm RMSNorm decoders whose residual stream is rotation-invariant (scalar multipliers, as
# Granite's and Gemma's embedding scale, keep it so; Gemma's norms scale by 1 + weight).
LAYOUTS: dict[str, _Layout] = {
    "llama": _SEPARATE,
    "mistral": _SEPARATE,
    "qwen2": _SEPARATE,
    "qwen3": _SEPARATE,
    "granite": _SEPARATE,
    "gemma": _SEPARATE,
    "phi3": _FUSED,
    "smollm3": _SEPARATE,
    "ernie4_5": _SEPARATE,
    "seed_oss": _SEPARATE,
    "helium": _SEPARATE,
    "arcee": _UP_ONLY,
    "apertus": _Layout(
        _ATTENTION, ("mlp.up_proj",), attention_norm="attention_layernorm", mlp_norm="feedforward_layernorm"
    ),
    "mixtral": _MOE,
    "qwen2_moe": _MOE,
    "qwen3_moe": _MOE,
    "olmoe": _MOE,
}


def _moe_weights(mlp: nn.Module, hidden: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """An MoE block's weights that read the residual stream (the router, the experts' gate/up
    tensors, a shared expert's layers and its gate: last dimension ``hidden``) and those that
    write it (``down`` tensors, ``w2``: dimension -2 is ``hidden``).

    Raises:
        ModelError: a weight that is neither (rotation cannot place it).
    """
    inputs, outputs = [], []
    for name, param in mlp.named_parameters():
        leaf = name.removesuffix(".weight").rpartition(".")[2]
        if param.dim() >= 2 and (leaf.startswith("down") or leaf == "w2") and param.shape[-2] == hidden:
            outputs.append(param)
        elif param.dim() >= 2 and param.shape[-1] == hidden:
            inputs.append(param)
        else:
            raise ModelError(f"the MoE weight {name} {tuple(param.shape)} neither reads nor writes the residual stream")
    return inputs, outputs


SUPPORTED_MODEL_TYPES = tuple(LAYOUTS)
_BLOCK_ATTR = "_hfc_ffn_hadamard"  # the Hadamard block of the down projection's input
# Largest relative change of the probe's logits that rotating may cause, by model dtype: the
# guard is against a model that is not rotation-invariant (a change of order 1), and must pass
# the rounding of rotated weights. SmolLM2-135M changes by 2e-3 in float16 and by 3.2e-2 in
# bfloat16, where the unrotated model is itself 2.6e-2 from its float32 logits (and the rotated
# one 1.3e-2): bfloat16's 0.03 refused a good model.
_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8, torch.float16: 3e-2, torch.bfloat16: 0.15}


class RotatedRMSNorm(nn.Module):
    """RMSNorm followed by a ``[hidden, hidden]`` matrix: ``rmsnorm(x) @ weight``. The final
    norm of a rotated model, where ``weight = Q^T diag(g) Q`` applies the norm's gain within the
    rotated basis (the LM head reads it rotated), or ``Q^T diag(g)`` for a model without an LM
    head, whose other heads read the output unrotated."""

    def __init__(
        self,
        hidden_size: int,
        eps: float,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size, hidden_size, dtype=dtype, device=device))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return torch.matmul(h.to(x.dtype), self.weight.to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.variance_epsilon}"


@dataclass
class _Parts:
    """Where the rotated pieces of a supported model are."""

    layout: _Layout
    value_rows: slice | None
    blocks_prefix: str
    blocks: nn.ModuleList
    embed: nn.Module
    norm_name: str
    norm: nn.Module
    head: nn.Module | None
    head_name: str | None
    hidden: int
    head_dim: int
    intermediate: int
    vocab_size: int


def _parts(model: nn.Module) -> _Parts:
    """The model's pieces, or a :class:`ModelError` saying why it cannot be rotated."""
    text = text_config(model)
    model_type = getattr(text, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(
            f"rotation supports pre-norm RMSNorm decoders ({', '.join(SUPPORTED_MODEL_TYPES)}), not model_type "
            f"{model_type!r}: a LayerNorm or post-norm residual stream is not rotation-invariant. Use smoothquant "
            "instead"
        )
    if outside_language_model(model):
        raise ModelError(
            f"{type(model).__name__} is a multimodal model: its image features enter the language model's residual "
            "stream from the vision tower's projector, unrotated, so rotating the language model would change what "
            "it computes on images. Use smoothquant instead"
        )
    prefix, blocks = blocks_of(model)
    base = getattr(model, "base_model", model)
    norm = getattr(base, "norm", None)
    embed = model.get_input_embeddings()
    if norm is None or not hasattr(norm, "weight") or embed is None:
        raise ModelError(f"cannot find the final norm and the input embedding of {type(model).__name__}")
    layout = LAYOUTS[model_type]
    for i, block in enumerate(blocks):
        for path in layout.paths():
            try:
                block.get_submodule(path)
            except AttributeError:
                raise ModelError(f"block {i} of {type(model).__name__} has no {path}; rotation cannot map it") from None
        for path in (layout.attention_norm, layout.mlp_norm):
            if not type(getattr(block, path, None)).__name__.endswith("RMSNorm"):
                raise ModelError(f"block {i} of {type(model).__name__} has no RMSNorm {path}; rotation needs one")
        if layout.moe:
            _moe_weights(block.mlp, text.hidden_size)  # every weight placed, before anything changes
    names = {id(m): n for n, m in model.named_modules()}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    hidden = text.hidden_size
    head_dim = getattr(text, "head_dim", None) or hidden // text.num_attention_heads
    return _Parts(
        layout=layout,
        value_rows=layout.value_rows(text, head_dim),
        blocks_prefix=prefix,
        blocks=blocks,
        embed=embed,
        norm_name=names[id(norm)],
        norm=norm,
        head=head,
        head_name=names.get(id(head)) if head is not None else None,
        hidden=hidden,
        head_dim=head_dim,
        intermediate=0
        if layout.moe
        else getattr(blocks[0].get_submodule(layout.mlp_output), "in_features", text.intermediate_size),
        vocab_size=text.vocab_size,
    )


def _rotate_down_input(module: nn.Module, args: tuple) -> tuple:
    return (block_hadamard(args[0], getattr(module, _BLOCK_ATTR)), *args[1:])


def _install_down_hook(mlp: nn.Module, _args: tuple) -> None:
    """MLP pre-hook: make sure the current down projection rotates its input, first."""
    down = mlp.down_proj
    block = getattr(mlp, _BLOCK_ATTR)
    if getattr(down, _BLOCK_ATTR, None) != block:
        setattr(down, _BLOCK_ATTR, block)
        down.register_forward_pre_hook(_rotate_down_input, prepend=True)


def _restructure(model: nn.Module, parts: _Parts, block: int) -> RotatedRMSNorm:
    """Structure only (runs on the meta device when loading): put the matrix final norm in
    place of the old one (returned, its weight not yet set) and, for ``block`` > 0, the online
    transform of the down projections."""
    old = parts.norm
    eps = getattr(old, "variance_epsilon", getattr(old, "eps", 1e-6))
    new = RotatedRMSNorm(parts.hidden, eps, dtype=old.weight.dtype, device=old.weight.device)
    model.set_submodule(parts.norm_name, new)
    if block:
        for layer in parts.blocks:
            setattr(layer.mlp, _BLOCK_ATTR, block)
            layer.mlp.register_forward_pre_hook(_install_down_hook)
    return new


def _apply_patch(model: nn.Module, params: dict[str, Any]) -> None:
    _restructure(model, _parts(model), int(params.get("ffn_block", 0)))


register_patch(PATCH, _apply_patch)


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data.copy_(value.to(param.dtype))


def _fold_and_rotate_inputs(norm: nn.Module, weights: list[torch.Tensor], q: torch.Tensor) -> None:
    """``W <- W diag(g) Q`` for each weight reading ``norm``'s output (along its last dimension:
    a layer's ``[N, H]``, fused experts' ``[E, N, H]``); the norm's gain -> 1."""
    try:
        offset = norm_offset(norm)
    except ValueError as exc:
        raise ModelError(f"rotation cannot fold the norm's gain: {exc}") from None
    g = norm.weight.detach().double() + offset
    for weight in weights:
        w = weight.detach().double()
        _set(weight, (w * g.to(w.device)) @ q.to(w.device))
    set_norm_gain(norm, torch.ones_like(g), offset)


def _rotate_output_rows(weight: torch.Tensor, q: torch.Tensor) -> None:
    """``W <- Q^T W`` over dimension -2 (a layer's ``[H, K]``, fused experts' ``[E, H, I]``)."""
    _set(weight, torch.matmul(q.t().to(weight.device), weight.detach().double()))


def _rotate_outputs(layer: nn.Module, q: torch.Tensor) -> None:
    """``W <- Q^T W`` (and ``b <- b Q``) for a layer writing the residual stream."""
    _rotate_output_rows(layer.weight, q)
    if layer.bias is not None:
        _set(layer.bias, layer.bias.detach().double() @ q.to(layer.bias.device))


def _head_rotation(head_dim: int, seed: int) -> torch.Tensor:
    """The Hadamard matrix of a power-of-two head dimension, else a random orthogonal one
    (offline, any orthogonal matrix keeps the function)."""
    if head_dim & (head_dim - 1) == 0:
        return hadamard_matrix(head_dim, dtype=torch.float64)
    return random_orthogonal(head_dim, seed)


def _rotate_value_heads(v: nn.Module, o: nn.Module, h: torch.Tensor, rows: slice | None = None) -> None:
    """Value head outputs by ``h`` (rows of ``v``, or its ``rows`` in a fused q/k/v layer), the
    matching input columns of ``o``."""
    head_dim = h.shape[0]
    h = h.to(v.weight.device)
    rows = rows if rows is not None else slice(None)
    wv = v.weight.detach()[rows].double()
    v.weight.data[rows] = (h.t() @ wv.reshape(-1, head_dim, wv.shape[1])).reshape(wv.shape).to(v.weight.dtype)
    if v.bias is not None:
        bv = v.bias.detach()[rows].double()
        v.bias.data[rows] = (bv.reshape(-1, head_dim) @ h).reshape(-1).to(v.bias.dtype)
    wo = o.weight.detach().double()
    _set(o.weight, (wo.reshape(wo.shape[0], -1, head_dim) @ h).reshape(wo.shape))


def _probe_output(model: nn.Module, probe: torch.Tensor) -> torch.Tensor:
    """What the model computes on ``probe``: its logits, or a base model's last hidden state."""
    out = model(input_ids=probe, use_cache=False)
    logits = getattr(out, "logits", None)
    return (logits if logits is not None else out[0]).float()


class RotationModifier(Modifier):
    config: RotationConfig

    def check(self, model: nn.Module, context: CompressionContext, view: ModelView) -> None:
        super().check(model, context, view)
        try:
            parts = _parts(model)
        except ModelError as exc:
            raise self.error(str(exc)) from None
        root = view.entries[""]
        earlier = earlier_patch(root.marks, model, PATCH, False)
        if earlier is not None:
            raise self.error(f"the model is rotated already (by {earlier}); one rotate stage is enough")
        paths = parts.layout.paths()
        names = [f"{parts.blocks_prefix}.{i}.{path}" for i in range(len(parts.blocks)) for path in paths]
        if parts.head_name is not None:
            names.append(parts.head_name)
        for name in names:
            entry = view.entries.get(name)
            if entry is None or entry.stage is not None or not is_linear_like(entry.module):
                by = f"stage {entry.stage!r}" if entry is not None and entry.stage else "an earlier run"
                raise self.error(
                    f"{name} is compressed by {by}; rotation changes float weights, so put the rotate stage "
                    "before every stage that compresses the model's linear layers"
                )
        embed = next(n for n, m in model.named_modules() if m is parts.embed)
        entry = view.entries.get(embed)
        if entry is None or entry.stage is not None or isinstance(parts.embed, CompressedModule):
            by = f"stage {entry.stage!r}" if entry is not None and entry.stage else "an earlier run"
            raise self.error(
                f"the input embedding {embed} is quantized by {by}; rotation changes its float weight, so put the "
                "rotate stage before the embeddings stage"
            )
        if any(p.is_meta for p in model.parameters()):
            raise self.error("the model has offloaded (meta) weights; rotation needs every weight in memory")
        root.marks[PATCH] = self.stage

    @torch.no_grad()
    def apply(self, model: nn.Module, context: CompressionContext) -> None:
        parts = _parts(model)
        device = parts.embed.weight.device
        probe = torch.randint(0, parts.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0)).to(device)
        reference = _probe_output(model, probe)

        q = random_orthogonal(parts.hidden, self.config.seed)
        tied = parts.head is not None and parts.head.weight is parts.embed.weight
        embed = parts.embed.weight
        _set(embed, embed.detach().double() @ q.to(embed.device))
        block_size = ffn_block_size(parts.intermediate) if self.config.ffn and not parts.layout.moe else 0
        head_rotation = _head_rotation(parts.head_dim, self.config.seed + 1)
        layout = parts.layout
        for layer in parts.blocks:
            get = layer.get_submodule
            _fold_and_rotate_inputs(get(layout.attention_norm), [get(p).weight for p in layout.attention_inputs], q)
            o_proj = get(layout.attention_output)
            _rotate_outputs(o_proj, q)
            if layout.moe:
                reads, writes = _moe_weights(layer.mlp, parts.hidden)
                _fold_and_rotate_inputs(get(layout.mlp_norm), reads, q)
                for weight in writes:
                    _rotate_output_rows(weight, q)
            else:
                _fold_and_rotate_inputs(get(layout.mlp_norm), [get(p).weight for p in layout.mlp_inputs], q)
                down = get(layout.mlp_output)
                _rotate_outputs(down, q)
                if block_size:
                    _set(down.weight, block_hadamard(down.weight.detach().double(), block_size))
            if self.config.heads:
                _rotate_value_heads(get(layout.value), o_proj, head_rotation, parts.value_rows)
        gain = norm_gain(parts.norm).to(q.device)
        # With an LM head the final norm's output stays rotated, and the head reads it rotated (a
        # tied head through the rotated embedding); a model without one (a sequence classifier's
        # `score`, a QA head) gets the output back unrotated, and its heads stay as they are.
        matrix = q.t() @ torch.diag(gain) @ q if parts.head is not None else q.t() @ torch.diag(gain)
        if parts.head is not None and not tied:
            _set(parts.head.weight, parts.head.weight.detach().double() @ q.to(parts.head.weight.device))
        norm = _restructure(model, parts, block_size)
        _set(norm.weight, matrix.to(norm.weight.device))
        record_patch(model, PATCH, {"ffn_block": block_size})

        after = _probe_output(model, probe)
        change = float((after - reference).norm() / reference.norm().clamp(min=1e-30))
        limit = _TOLERANCE.get(embed.dtype, _TOLERANCE[torch.bfloat16])  # another dtype: the loosest
        if not change <= limit:
            raise ModelError(
                f"stage {self.stage!r}: rotating changed the model's output by {change:.2e} (relative; at most "
                f"{limit:g} expected), so this model is not rotation-invariant as built. The model is no longer "
                "usable: reload it, and compress it without the rotate stage"
            )
