"""Fused mixture-of-experts weights as one small MLP of Linear layers per expert.

transformers stores the experts of its MoE models (Mixtral, Qwen2/3-MoE, OLMoE, GPT-OSS,
...) as 3-D parameters (``gate_up_proj: [E, 2I, H]``, ``down_proj: [E, H, I]``) used inside
one forward, so neither a hook nor a module swap can see one expert. :class:`LinearExperts`
holds the same weights as ``E`` pairs of ``nn.Linear`` (``<e>.gate_up_proj``,
``<e>.down_proj``; views of the fused tensors, so splitting copies nothing) and computes the
same function, so every weight technique (RTN, GPTQ with per-expert Hessians from the
tokens routed to each expert) treats an expert like any other Linear layer. The split is
the ``unfuse_experts`` model patch: recorded in the saved config and re-applied by
``from_pretrained`` before the checkpoint loads, as llm-compressor and GPTQModel split
experts for calibration.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from hfcompress.errors import ModelError
from hfcompress.patches import register_patch

__all__ = ["LinearExperts", "find_fused_experts", "fuse_experts_back", "unfuse_experts"]

PATCH = "unfuse_experts"


def _is_fused_experts(module: nn.Module) -> bool:
    # `use_experts_implementation` gives every fused experts class these attributes.
    down = getattr(module, "down_proj", None)
    return (
        all(hasattr(module, a) for a in ("has_gate", "is_transposed", "is_concatenated"))
        and isinstance(down, nn.Parameter)
        and down.dim() == 3
    )


def find_fused_experts(model: nn.Module) -> list[str]:
    """Names of the fused experts modules of ``model``."""
    return [name for name, m in model.named_modules() if _is_fused_experts(m)]


def _linear_from(weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> nn.Linear:
    w = weight.t() if transposed else weight  # [N, K]
    layer = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, dtype=w.dtype, device="meta")
    layer.weight = nn.Parameter(w, requires_grad=weight.requires_grad)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=bias.requires_grad)
    return layer


class _Expert(nn.Module):
    def __init__(self, up: nn.Linear, down: nn.Linear, gated: bool) -> None:
        super().__init__()
        if gated:
            self.gate_up_proj = up
        else:
            self.up_proj = up
        self.down_proj = down


class LinearExperts(nn.ModuleList):
    """The experts of one fused module as per-expert Linear layers, computing the same output.

    Args:
        fused: A transformers fused experts module (3-D ``gate_up_proj``/``up_proj`` and
            ``down_proj``, optional biases). Its parameters are taken over as views; the
            module itself is kept, without parameters, for its gating function.
    """

    def __init__(self, fused: nn.Module) -> None:
        if getattr(fused, "has_post_expert_norm", False):
            raise ModelError(f"{type(fused).__name__}: experts with a post-expert norm cannot be split yet")
        gated = bool(fused.has_gate)
        up_name = "gate_up_proj" if gated else "up_proj"
        up, down = getattr(fused, up_name), fused.down_proj
        up_bias = getattr(fused, f"{up_name}_bias", None) if fused.has_bias else None
        down_bias = getattr(fused, "down_proj_bias", None) if fused.has_bias else None
        transposed = bool(fused.is_transposed)
        experts = [
            _Expert(
                _linear_from(up[e], None if up_bias is None else up_bias[e], transposed),
                _linear_from(down[e], None if down_bias is None else down_bias[e], transposed),
                gated,
            )
            for e in range(down.shape[0])
        ]
        super().__init__(experts)
        self.gated = gated
        # A parameterless shallow copy of the fused module keeps its gating function
        # (`_apply_gate`, `act_fn`, GPT-OSS's clamp limits) without holding its weights; it
        # sits outside the module tree, so it is neither saved nor moved.
        gate = copy.copy(fused)
        gate._parameters = {}
        gate._modules = dict(fused._modules)
        object.__setattr__(self, "fused", gate)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """``hidden_states: [T, C]``, ``top_k_index``/``top_k_weights: [T, k]`` -> ``[T, C]``,
        the loop of transformers' eager experts forward."""
        out = torch.zeros_like(hidden_states)
        num_experts = len(self)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=num_experts + 1).permute(2, 1, 0)  # [E+1, k, T]
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for (e,) in hit.tolist():
            if e == num_experts:
                continue
            top_k_pos, token_idx = torch.where(mask[e])
            x = hidden_states[token_idx]
            expert = self[e]
            if self.gated:
                h = self.fused._apply_gate(expert.gate_up_proj(x))
            else:
                h = self.fused.act_fn(expert.up_proj(x))
            y = expert.down_proj(h) * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def unfuse_experts(model: nn.Module, names: list[str] | None = None) -> dict[str, nn.Module]:
    """Replace fused experts modules (all, or ``names``) by :class:`LinearExperts`; return the
    originals by name (for :func:`fuse_experts_back`). Offloaded (meta) experts are refused."""
    originals: dict[str, nn.Module] = {}
    for name in find_fused_experts(model) if names is None else names:
        fused = model.get_submodule(name)
        if not _is_fused_experts(fused):
            raise ModelError(f"{name} is a {type(fused).__name__}, not a fused experts module")
        if getattr(fused, "_hf_hook", None) is not None and fused.down_proj.is_meta:
            raise ModelError(
                f"the experts at {name} are offloaded; load MoE models in memory (no disk/CPU offload) to compress "
                "their experts"
            )
        model.set_submodule(name, LinearExperts(fused))
        originals[name] = fused
    return originals


def fuse_experts_back(model: nn.Module, originals: dict[str, nn.Module]) -> None:
    """Undo :func:`unfuse_experts` (nothing was copied: the originals are put back)."""
    for name, fused in originals.items():
        model.set_submodule(name, fused)


def _apply_patch(model: nn.Module, params: dict[str, Any]) -> None:
    unfuse_experts(model, list(params["modules"]))


register_patch(PATCH, _apply_patch)
