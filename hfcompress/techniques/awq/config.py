"""Config of AWQ-style activation-aware scaling."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from hfcompress.config import TechniqueConfig, invalid
from hfcompress.techniques.smoothquant.config import check_mapping_fields
from hfcompress.techniques.weight_quant import GRID_FIELDS_ACCEPTED, check_grid_fields

__all__ = ["AWQConfig"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class AWQConfig(TechniqueConfig):
    """AWQ (Lin et al., 2024): scale up the weight columns that read large activations
    before weight-only quantization, so their rounding error counts for less, and fold the
    inverse scale into whatever produces those activations. The float model's function is
    unchanged; a later ``rtn``, ``gptq`` or ``learned_rounding`` stage quantizes the scaled
    weights (llm-compressor stacks AWQ and GPTQ the same way).

    For each mapping (the layers that read one norm's or one linear's output: the same
    discovery as ``smoothquant``), the factor of input channel ``j`` is
    ``s_j = mean|x_j|^a / mean|w_j|^(1 - a)`` (``mean|w_j|`` over the readers' rows, each
    weight relative to its group's largest), normalized to a geometric mid-range of 1. The
    exponent ``a`` is searched on a grid: the one whose readers, round-to-nearest quantized
    on this config's grid after scaling, reproduce their float outputs best on the
    calibration tokens. No scaling is also a candidate, so a mapping is never scaled to a
    larger error on those tokens.

    Args:
        bits, group_size, symmetric: The grid the search quantizes with: set them to the
            weight stage's.
        grid: Exponents tried: ``0, 1/grid, ..., (grid - 1)/grid`` (AWQ's 20).
        duo_scaling: Divide by ``mean|w_j|^(1 - a)`` (llm-compressor's default); False uses
            ``mean|x_j|^a`` alone (the AWQ paper's form).
        search_tokens: Calibration tokens each mapping's search scores on (the first ones
            the block sees); ``mean|x|`` uses all calibration tokens.
        mappings: Explicit mappings instead of the discovery, as in ``smoothquant``.
        ignore: Linear layers never scaled (nor their mapping).
        batch_size: Calibration sequences per forward pass.
        compute_dtype: Dtype of the calibration passes (the search itself runs in float32).
    """

    technique = "awq"
    needs_calibration = True

    _accepted: ClassVar[dict[str, str]] = GRID_FIELDS_ACCEPTED
    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    grid: int = 20
    duo_scaling: bool = True
    search_tokens: int = 4096
    mappings: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ("lm_head",)
    batch_size: int = 8
    compute_dtype: Literal["float32", "bfloat16"] = "float32"

    def _validate(self) -> None:
        check_grid_fields(self)
        if self.grid < 1:
            raise invalid("grid", self.grid, "an integer >= 1")
        if self.search_tokens < 1:
            raise invalid("search_tokens", self.search_tokens, "an integer >= 1")
        check_mapping_fields(self)
