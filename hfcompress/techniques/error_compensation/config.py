"""Config of low-rank compensation of quantization error (EoRA / LQER)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from hfcompress.config import invalid
from hfcompress.techniques.low_rank.config import FactorStageConfig

__all__ = ["ErrorCompensationConfig"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ErrorCompensationConfig(FactorStageConfig):
    """Add a low-rank correction to layers an earlier ``rtn`` or ``gptq`` stage quantized:
    ``W ~ Q(W) + B A``, with ``B A`` the rank-``rank`` approximation of the error
    ``W - Q(W)`` that minimises the layer's output error on calibration inputs (EoRA, Liu et
    al. 2024; LQER; ZeroQuant-V2's LoRC, which uses plain SVD).

    Runs block by block on the layerwise runner, after the quantizing stage: each layer's
    inputs come from the blocks already quantized and corrected, so the correction fits the
    error the model actually makes. The stage keeps the quantized layers' float weights
    alive until it has run (it needs ``W`` as well as ``Q(W)``).

    Args:
        rank: Rank of the correction per layer (capped at ``min(N, K)``).
        allocation: ``"uniform"``: every layer gets ``rank``. ``"global"``: the same total
            factor weights, spread over the layers by the spectra of their whitened errors
            (a first pass over the quantized model; ranks go where they remove the most
            relative output error per weight).
        method: ``"whitened"`` (output-error optimal on the calibration inputs) or ``"svd"``
            (plain SVD of the weight error; no calibration).
        factor_bits: Bits of the factors: 8 or 4 (symmetric RTN, per channel or per group of
            ``factor_group_size``), or None to keep them in the model's float dtype.
        factor_group_size: Group size of the factors' quantization along their inputs
            (``-1``: per channel); a factor with fewer inputs is quantized per channel.
        damp: Eigenvalue floor of the whitening, relative to the mean eigenvalue.
        targets: Layers to correct (default: every layer an earlier stage quantized).
        ignore: Layers to leave alone.
        batch_size: Calibration sequences per forward pass.
        compute_dtype: Dtype of the calibration passes.
    """

    technique = "error_compensation"

    rank: int = 32
    allocation: Literal["uniform", "global"] = "uniform"
    method: Literal["whitened", "svd"] = "whitened"
    factor_bits: int | None = 8
    factor_group_size: int = 128
    targets: tuple[str, ...] = ("QuantLinear",)
    ignore: tuple[str, ...] = ()

    def _validate(self) -> None:
        super()._validate()
        if self.rank < 1:
            raise invalid("rank", self.rank, "an integer >= 1")
        if self.factor_bits not in (None, 4, 8):
            raise invalid("factor_bits", self.factor_bits, "4, 8, or null (float factors)")
        if self.factor_group_size != -1 and self.factor_group_size < 8:
            raise invalid("factor_group_size", self.factor_group_size, "-1 (per channel) or an integer >= 8")
