"""Config of round-to-nearest weight quantization."""

from __future__ import annotations

import dataclasses

from hfcompress.techniques.weight_quant import WeightQuantConfig

__all__ = ["RTNConfig"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RTNConfig(WeightQuantConfig):
    """Round-to-nearest (RTN) weight quantization with min-max ranges; needs no data.

    The baseline every calibrated method is measured against. Fields as in
    :class:`~hfcompress.techniques.weight_quant.WeightQuantConfig`.
    """

    technique = "rtn"
