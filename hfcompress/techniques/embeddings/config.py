"""Config of token-embedding quantization."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from hfcompress.config import TechniqueConfig, invalid
from hfcompress.quant.scheme import QuantScheme
from hfcompress.techniques.weight_quant import GRID_FIELDS_ACCEPTED, check_grid_fields

__all__ = ["EmbeddingQuantConfig"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class EmbeddingQuantConfig(TechniqueConfig):
    """Round-to-nearest quantization of the model's input token embedding; needs no data.

    In a model whose LM head is tied to that embedding (SmolLM2, Gemma, Qwen2.5-0.5B, most
    small LMs), the one shared matrix is quantized once: the head becomes a packed layer that
    decodes on the integer kernels, and the embedding looks its rows up in the head's codes,
    so the matrix is stored once, at ``bits`` bits. In an untied model only the input
    embedding is quantized (quantize the head with a weight stage targeting ``lm_head``).

    Args:
        bits: Bits per weight: 2, 3, 4 or 8.
        group_size: Columns (along the embedding dimension) sharing one scale; ``-1`` for one
            per row (per token, per output channel of a tied head).
        symmetric: Symmetric range, the zero point fixed at ``2**(bits-1)``.
        zero_point: Asymmetric only: ``"integer"`` or ``"float"`` zero points.
        scale_dtype: Storage dtype of the scales.
    """

    technique = "embeddings"

    _accepted: ClassVar[dict[str, str]] = GRID_FIELDS_ACCEPTED
    bits: int = 8
    group_size: int = -1
    symmetric: bool = True
    zero_point: Literal["integer", "float"] = "integer"
    scale_dtype: Literal["float16", "bfloat16", "float32"] = "float16"

    def _validate(self) -> None:
        check_grid_fields(self)
        if self.symmetric and self.zero_point == "float":
            raise invalid("zero_point", self.zero_point, "'integer' when symmetric is true (its zero point is fixed)")

    def scheme(self, embedding_dim: int) -> QuantScheme:
        """The weight-only scheme of a table whose rows have ``embedding_dim`` values."""
        return QuantScheme.weight_only(
            num_bits=self.bits,
            group_size=self.group_size,
            in_features=embedding_dim,
            symmetric=self.symmetric,
            float_zero=self.zero_point == "float",
            scale_dtype=self.scale_dtype,
        )
