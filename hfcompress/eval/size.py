"""How many bytes a model's weights take, and bits per weight of its (quantized) Linear layers."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from hfcompress.quant.linear import QuantLinear

__all__ = ["SizeReport", "linear_layer_stats", "size_report", "total_bytes"]


@dataclass(frozen=True)
class SizeReport:
    """Attributes:
    total_bytes: Bytes of every parameter and buffer, each storage counted once (tied
        weights once).
    layer_count: Linear layers measured.
    layer_weights: Weights in those layers (``in_features * out_features`` summed).
    layer_bytes: Bytes those weights take, scales and zeros included, biases excluded.
    """

    total_bytes: int
    layer_count: int
    layer_weights: int
    layer_bytes: int

    @property
    def bits_per_weight(self) -> float:
        """Effective bits per weight of the measured layers, scales and zeros included."""
        return 8 * self.layer_bytes / self.layer_weights if self.layer_weights else float("nan")

    @property
    def fraction_of_fp16(self) -> float:
        """``layer_bytes`` over what the same weights take in float16."""
        return self.layer_bytes / (2 * self.layer_weights) if self.layer_weights else float("nan")


def _layer_bytes(module: nn.Module) -> int:
    if isinstance(module, QuantLinear):
        return module.storage_bytes()
    return module.weight.numel() * module.weight.element_size()


def total_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, each storage counted once (tied weights once)."""
    seen: set[int] = set()
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def linear_layer_stats(model: nn.Module) -> dict[str, tuple[int, int]]:
    """For every Linear or QuantLinear layer, by name: (weights, bytes those weights take)."""
    return {
        name: (m.in_features * m.out_features, _layer_bytes(m))
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, QuantLinear))
    }


def size_report(
    model: nn.Module,
    layer_names: Iterable[str] | None = None,
    *,
    stats: dict[str, tuple[int, int]] | None = None,
    model_bytes: int | None = None,
) -> SizeReport:
    """Measure ``model``.

    Args:
        model: The model.
        layer_names: The Linear layers to measure (pass the same names for a model before and
            after compression); None measures every ``QuantLinear``, or every ``nn.Linear``
            when there is none.
        stats: Layer statistics taken earlier with :func:`linear_layer_stats` (to report on a
            model as it was before it was compressed in place); default: measure now.
        model_bytes: Total bytes taken earlier with :func:`total_bytes`; default: measure now.
    """
    if layer_names is None:
        quantized = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
        layer_names = quantized or [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    stats = linear_layer_stats(model) if stats is None else stats
    chosen = [stats[n] for n in layer_names]
    return SizeReport(
        total_bytes(model) if model_bytes is None else model_bytes,
        len(chosen),
        sum(w for w, _ in chosen),
        sum(b for _, b in chosen),
    )
