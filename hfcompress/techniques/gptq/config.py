"""Config of GPTQ layerwise post-training quantization."""

from __future__ import annotations

import dataclasses
from typing import Literal

from hfcompress.config import invalid
from hfcompress.techniques.weight_quant import WeightQuantConfig

__all__ = ["GPTQConfig"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTQConfig(WeightQuantConfig):
    """GPTQ (Frantar et al., 2022): quantize each Linear column by column, spreading every
    column's rounding error over the columns not yet quantized, weighted by the inverse
    Hessian of the layer's inputs. Runs block by block on calibration data that flows
    through the already-quantized blocks.

    Grid fields as in :class:`~hfcompress.techniques.weight_quant.WeightQuantConfig`, and:

    Args:
        block_size: Columns per lazy batch update (the paper's B = 128).
        damp: Damping added to ``diag(H)``, relative to its mean (the paper's 1%). Raised
            tenfold, with a warning naming the layer, until ``H`` factorizes.
        act_order: Quantize columns by decreasing Hessian diagonal (the paper's "act-order"
            heuristic). Group parameters are then fixed up front from the original weight
            ("static groups"), so the packed layout stays contiguous for the kernels.
        clip_search: Pick each group's range by searching shrunk min-max ranges for the
            smallest ``|w - w_hat|^2.4`` instead of plain min-max.
        true_sequential: Within a block, quantize the attention input projections, then the
            output projection, then the MLP, re-running the block in between so each group
            sees the quantization error of the ones before (one block pass per group).
        batch_size: Calibration sequences per forward pass.
        compute_dtype: Dtype of the calibration forward passes and of the ``x^T x``
            products: ``float32``, or ``bfloat16`` (autocast; about 3x faster on CPUs with
            AMX/AVX-512-BF16). The Hessian sums and the GPTQ solve stay float32.
        asym_calibration: GPTAQ (Li et al., 2025): fit each layer's output on the quantized
            model's inputs to the *float* model's output at that layer, not to its own float
            output on those inputs, so each layer also corrects the error that reaches it. A
            float copy of each block runs on the float model's activations beside it (one
            more block pass per batch, and a second stream of activations in memory).
        asym_alpha: With ``asym_calibration``: how much of the correction towards the float
            model's output to apply (0: plain GPTQ; the GPTAQ authors' code uses 0.25).
    """

    technique = "gptq"
    needs_calibration = True

    block_size: int = 128
    damp: float = 0.01
    act_order: bool = False
    clip_search: bool = False
    true_sequential: bool = False
    batch_size: int = 8
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    asym_calibration: bool = False
    asym_alpha: float = 0.25

    def _validate(self) -> None:
        super()._validate()
        if self.block_size < 1:
            raise invalid("block_size", self.block_size, "an integer >= 1")
        if not 0 < self.damp <= 1:
            raise invalid("damp", self.damp, "a number in (0, 1]")
        if self.batch_size < 1:
            raise invalid("batch_size", self.batch_size, "an integer >= 1")
        if not 0 <= self.asym_alpha <= 1:
            raise invalid("asym_alpha", self.asym_alpha, "a number in [0, 1] (0.25 by default)")
