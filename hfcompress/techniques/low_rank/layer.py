"""``LowRankLinear``: the ``low_rank_linear`` module kind, ``y = [base(x) +] B (A x)``.

Two uses share it:

* a low-rank layer in place of a Linear (``base`` absent): ``W ~ B A``;
* a quantized layer with a low-rank correction of its error (``base`` a ``QuantLinear``):
  ``W ~ Q(W) + B A`` (EoRA / LQER).

The factors are two child Linear modules, ``factor_in`` (``A: [r, K]``) and ``factor_out``
(``B: [N, r]``), so every other technique sees them as ordinary layers: a later ``rtn`` or
``gptq`` stage can quantize them, peft can put adapters on them, and a checkpoint records the
children's own kinds beside this one (parents before children, so a loader rebuilds this
module first, then swaps its children).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hfcompress.errors import CheckpointError
from hfcompress.kinds import CompressedModule, linear_weight, register_module_kind

__all__ = ["LowRankLinear", "module_storage_bytes"]


def module_storage_bytes(module: nn.Module) -> int:
    """Bytes of a (compressed or float) layer's weights, bias excluded."""
    if isinstance(module, CompressedModule):
        return module.storage_bytes()
    weight = module.weight
    return weight.numel() * weight.element_size()


def _float_dtype(original: nn.Module) -> torch.dtype:
    for tensor in (getattr(original, "weight", None), getattr(original, "bias", None)):
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            return tensor.dtype
    return torch.get_default_dtype()


@register_module_kind
class LowRankLinear(CompressedModule):
    """A Linear layer ``K -> N`` computed through rank ``r``, optionally on top of a base layer.

    Args:
        in_features: K.
        out_features: N.
        rank: r, at most ``min(K, N)``.
        base: The layer the factors correct (a ``QuantLinear``), or None for a pure low-rank
            layer. With a base, the base keeps the bias.
        bias: Whether a pure low-rank layer has a bias (held by ``factor_out``).
        dtype: Dtype of the factors.
        device: Where they live.
    """

    kind = "low_rank_linear"
    marker_tensors = ("factor_in.weight",)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        base: nn.Module | None = None,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(
                f"rank={rank} must be between 1 and min(in_features, out_features) = "
                f"{min(in_features, out_features)} for a {in_features} -> {out_features} layer"
            )
        if base is not None and bias:
            raise ValueError("with a base layer the bias stays in the base")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.stage: str | None = None
        self.base = base
        self.factor_in = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.factor_out = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    @classmethod
    def from_factors(
        cls, a: torch.Tensor, b: torch.Tensor, *, base: nn.Module | None = None, bias: torch.Tensor | None = None
    ) -> LowRankLinear:
        """A layer holding ``A: [r, K]`` and ``B: [N, r]`` (and ``bias: [N]`` without a base).
        Float factors are trainable parameters like the Linear weight they replace (recovery
        by distillation or fine-tuning trains them)."""
        r, k = a.shape
        n = b.shape[0]
        if b.shape[1] != r:
            raise ValueError(f"factors do not chain: A is {tuple(a.shape)}, B is {tuple(b.shape)}")
        layer = cls(k, n, r, base=base, bias=bias is not None, dtype=a.dtype, device=a.device)
        layer.factor_in.weight.data.copy_(a.detach())
        layer.factor_out.weight.data.copy_(b.detach())
        if bias is not None:
            layer.factor_out.bias.data.copy_(bias.detach())
        return layer

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias if self.base is not None else self.factor_out.bias

    def spec(self) -> dict[str, Any]:
        return self.linear_spec(rank=self.rank, base=self.base is not None)

    @classmethod
    def from_spec(cls, spec: dict[str, Any], original: nn.Module) -> LowRankLinear:
        k, n = cls.replaced_features(spec, original)
        dtype = _float_dtype(original)
        has_bias = getattr(original, "bias", None) is not None
        # The base is a placeholder here: its own entry (a quant_linear) replaces it next.
        base = nn.Linear(k, n, bias=has_bias, dtype=dtype) if spec["base"] else None
        layer = cls(k, n, spec["rank"], base=base, bias=has_bias and base is None, dtype=dtype)
        layer.stage = spec.get("stage")
        return layer

    @classmethod
    def validate_spec(cls, name: str, spec: dict[str, Any]) -> None:
        missing = [k for k in ("in_features", "out_features", "rank", "base") if k not in spec]
        if missing:
            raise CheckpointError(f"quantization_config.layers[{name!r}] lacks {missing}")
        k, n, r = spec["in_features"], spec["out_features"], spec["rank"]
        if not all(isinstance(v, int) and v >= 1 for v in (k, n, r)) or r > min(k, n):
            raise CheckpointError(
                f"quantization_config.layers[{name!r}] has rank={r!r} for a {k!r} -> {n!r} layer; "
                "the rank must be between 1 and min(in, out)"
            )

    @classmethod
    def expected_tensors(cls, name: str, spec: dict[str, Any]) -> dict[str, tuple[str | None, tuple[int, ...]]]:
        # Float factors follow the model's dtype (None). A factor or base that is itself a
        # compressed layer is described by its own entry, which the checker prefers.
        k, n, r = spec["in_features"], spec["out_features"], spec["rank"]
        return {f"{name}.factor_in.weight": (None, (r, k)), f"{name}.factor_out.weight": (None, (n, r))}

    def check_loaded(self, name: str) -> None:
        for child in ("factor_in", "factor_out"):
            module = getattr(self, child)
            weight = getattr(module, "weight", None)
            if weight is None:  # a compressed factor checks itself
                continue
            if weight.is_meta:
                raise CheckpointError(f"tensor {name}.{child}.weight was not loaded")
            if not torch.isfinite(weight).all():
                raise CheckpointError(f"tensor {name}.{child}.weight holds NaN or infinite values; it is corrupt")

    def storage_bytes(self) -> int:
        """Bytes of the factors and the base (biases excluded), each as stored."""
        total = module_storage_bytes(self.factor_in) + module_storage_bytes(self.factor_out)
        return total + (module_storage_bytes(self.base) if self.base is not None else 0)

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``[N, K]`` weight this layer computes with (``B A``, plus the base's)."""
        a, b = (_dense(getattr(self, c), dtype) for c in ("factor_in", "factor_out"))
        w = b @ a
        return w + _dense(self.base, dtype) if self.base is not None else w

    def dense_bias(self) -> torch.Tensor | None:
        holder = self.base if self.base is not None else self.factor_out
        return holder.dense_bias() if isinstance(holder, CompressedModule) else holder.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.factor_out(self.factor_in(x))
        return y + self.base(x) if self.base is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def _dense(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(module, CompressedModule):
        return module.dense_weight(dtype)
    return linear_weight(module).to(dtype)
