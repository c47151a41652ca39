"""How many bytes a model's weights take, and bits per weight of its (quantized) Linear layers."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from hfcompress.kinds import CompressedModule

__all__ = ["SizeReport", "compressed_layer_names", "linear_layer_stats", "size_report", "total_bytes"]


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
    if isinstance(module, CompressedModule):
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


def _layers(model: nn.Module, embeddings: bool = False) -> dict[str, nn.Module]:
    """Linear layers as the model computes them: each outermost compressed module (a
    low-rank layer counts with its factors, a quantized embedding as a ``V x D`` table), and
    each float Linear outside one (and each float embedding, when ``embeddings``)."""
    out: dict[str, nn.Module] = {}
    inside: tuple[str, ...] = ()
    for name, m in model.named_modules():
        if inside and name.startswith(inside):
            continue
        if isinstance(m, CompressedModule) and hasattr(m, "in_features"):
            out[name] = m
            inside = (*inside, f"{name}.")
        elif isinstance(m, nn.Linear) or (embeddings and isinstance(m, nn.Embedding)):
            out[name] = m
    return out


def compressed_layer_names(model: nn.Module) -> list[str]:
    """The outermost compressed Linear layers (what a recipe compressed), in module order."""
    return [n for n, m in _layers(model).items() if isinstance(m, CompressedModule)]


def linear_layer_stats(model: nn.Module) -> dict[str, tuple[int, int]]:
    """For every Linear layer (see :func:`_layers`), by name: (weights of the ``N x K``
    layer it computes, bytes it takes); float embeddings too (``V x D``), to compare with a
    model whose embedding a recipe quantized."""
    return {
        name: (m.weight.numel() if isinstance(m, nn.Embedding) else m.in_features * m.out_features, _layer_bytes(m))
        for name, m in _layers(model, embeddings=True).items()
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
            after compression); None measures every outermost compressed layer, or every
            ``nn.Linear`` when there is none.
        stats: Layer statistics taken earlier with :func:`linear_layer_stats` (to report on a
            model as it was before it was compressed in place); default: measure now.
        model_bytes: Total bytes taken earlier with :func:`total_bytes`; default: measure now.
    """
    if layer_names is None:
        layer_names = compressed_layer_names(model) or list(_layers(model))
    stats = linear_layer_stats(model) if stats is None else stats
    chosen = [stats[n] for n in layer_names]
    return SizeReport(
        total_bytes(model) if model_bytes is None else model_bytes,
        len(chosen),
        sum(w for w, _ in chosen),
        sum(b for _, b in chosen),
    )
