"""Config of SmoothQuant."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from hfcompress.config import TechniqueConfig, check_target_fields, invalid

__all__ = ["SmoothQuantConfig", "check_mapping_fields", "parse_mapping"]


def parse_mapping(text: str) -> tuple[str, tuple[str, ...]]:
    """``"input_layernorm -> self_attn.q_proj, self_attn.k_proj"`` as (source, readers)."""
    source, arrow, rest = text.partition("->")
    readers = tuple(r.strip() for r in rest.split(",") if r.strip())
    if not arrow or not source.strip() or not readers:
        raise invalid("mappings", text, "strings 'source -> reader, reader, ...' with names relative to a block")
    return source.strip(), readers


def check_mapping_fields(config: Any) -> None:
    """Check the fields a rescaling stage (``smoothquant``, ``awq``) shares: ``mappings``,
    ``batch_size`` and ``ignore``."""
    for text in config.mappings:
        parse_mapping(text)
    if config.batch_size < 1:
        raise invalid("batch_size", config.batch_size, "an integer >= 1")
    check_target_fields(config, ("ignore",))


@dataclasses.dataclass(frozen=True, kw_only=True)
class SmoothQuantConfig(TechniqueConfig):
    """SmoothQuant: move activation outliers into the weights before 8-bit activation
    quantization, leaving the model's function unchanged (in exact arithmetic).

    Runs block by block on the layerwise runner: each block's input ranges are measured on
    the outputs of the blocks already smoothed. Put it before the weight stage (``rtn`` or
    ``gptq``: they then quantize the smoothed weights) and the ``int8_activations`` stage.

    Which layers are smoothed, and from where: by default discovered in each block by
    tracing one forward pass: every norm whose output only linear layers read (q/k/v after
    the input norm, gate/up after the post-attention norm) and two linear-to-linear pairs
    where the shapes allow (v to o when v's outputs are o's inputs, i.e. no grouped-query
    attention; up to down, through the gated product). Each candidate is kept only if
    smoothing it with random factors leaves the block's output unchanged (a post-norm
    residual stream, as in BERT, or a ``1 + weight`` norm fails that test and is skipped).

    Args:
        alpha: Migration strength (the paper's alpha; 0.5 is its default for most models).
        alpha_grid: If given, each block picks the alpha from this list whose smoothed block,
            with weights fake-quantized to ``search_weight_bits`` per channel and inputs to
            8 bits per token, is closest to the float block on the calibration data.
        search_weight_bits: Weight bits of that search (8 for W8A8, 4 for W4A8).
        search_batches: Calibration batches the search scores each candidate on (the
            search runs the block ``len(alpha_grid)`` times per mapping).
        mappings: Explicit mappings instead of the discovery, names relative to a block:
            ``"input_layernorm -> self_attn.q_proj, self_attn.k_proj, self_attn.v_proj"``.
            ``"self_attn.v_proj -> self_attn.o_proj"`` under grouped-query attention is read as
            the discovery reads it (each v channel feeds its query heads' o columns). A mapping
            whose shapes disagree, or that changes the block's output, is an error.
        ignore: Linear layers never smoothed (nor their mapping).
        batch_size: Calibration sequences per forward pass.
        compute_dtype: Dtype of the calibration passes.
    """

    technique = "smoothquant"
    needs_calibration = True

    alpha: float = 0.5
    alpha_grid: tuple[float, ...] = ()
    search_weight_bits: int = 8
    search_batches: int = 1
    mappings: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ("lm_head",)
    batch_size: int = 8
    compute_dtype: Literal["float32", "bfloat16"] = "float32"

    def _validate(self) -> None:
        for key, value in [("alpha", self.alpha), *(("alpha_grid", a) for a in self.alpha_grid)]:
            if not 0 <= value <= 1:
                raise invalid(key, value, "numbers in [0, 1]")
        if self.search_weight_bits not in (2, 3, 4, 8):
            raise invalid("search_weight_bits", self.search_weight_bits, "2, 3, 4 or 8")
        if self.search_batches < 1:
            raise invalid("search_batches", self.search_batches, "an integer >= 1")
        check_mapping_fields(self)
