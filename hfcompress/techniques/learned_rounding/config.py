"""Config of learned rounding: GPTQ (or RTN), then each block's rounding tuned by signed
gradient descent on its output error."""

from __future__ import annotations

import dataclasses
from typing import Literal

from hfcompress.config import check_e2e_fields, invalid
from hfcompress.techniques.gptq.config import GPTQConfig

__all__ = ["LearnedRoundingConfig"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LearnedRoundingConfig(GPTQConfig):
    """Learned rounding (the method of Cheng et al., 2023, "Optimize Weight Rounding via
    Signed Gradient Descent", Intel's AutoRound), started from GPTQ.

    Block by block: each targeted weight is first quantized by GPTQ (``init="gptq"``) or by
    round-to-nearest (``init="rtn"``); then every weight gets a rounding offset ``v`` in
    ``[-0.5, 0.5]`` added before rounding, and every group two range factors (its low and
    high end, in ``[0.5, 1.5]``), and ``steps`` signed-gradient steps on one calibration
    batch each lower the mean squared error between the block's output and its target. The
    codes, scales and zero points that result are stored like GPTQ's: the kernels, the saved
    format and the reload are the same.

    GPTQ's fields (``bits``, ``group_size``, ``act_order``, ``clip_search``, ``damp``, ...)
    shape the start; ``act_order`` and ``clip_search`` default to on here, GPTQ's best
    measured settings. ``batch_size`` is also the batch of one step.

    Args:
        init: Where the rounding starts: ``"gptq"`` (its error-compensated weights, so step
            0 is GPTQ's result exactly) or ``"rtn"`` (the weights themselves, AutoRound's
            start).
        steps: Signed-gradient steps per block (AutoRound's ``iters``; about 50 is a light
            setting, 200 its default).
        lr: Step size; None for ``1 / steps``. It decays linearly to 0 over the steps.
        learn_range: Also learn the range factors; otherwise only the offsets.
        target: What each block's output is fitted to. ``"float_model"``: the unquantized
            model's activations at that block (its input is the quantized blocks' output, so
            the block also learns to undo their error, as AutoRound does; a second stream of
            activations is kept). ``"block"``: the float block's own output on the same input.
        keep_best: End with the values of the step whose batch loss was the lowest
            (AutoRound's choice) instead of the last step's.
        seed: Seeds the order in which batches are visited, so a rerun (or a resumed run)
            gives the same tensors.
        e2e_steps: After the last block, this many Adam steps (one calibration window each)
            tune every quantized layer's scales end to end, codes fixed, to lower the KL
            divergence from the model's next-token distribution to the unquantized model's
            (see :mod:`hfcompress.techniques.learned_rounding.scales`). 0 skips it. It runs
            the whole model on its device, and holds each layer's codes unpacked (one byte per
            weight) meanwhile.
        e2e_lr: Adam's step size for the scales' log-factors (decays linearly to 0).
        e2e_windows: Calibration windows the end-to-end steps visit (the first ones): the
            unquantized model's predictions on them are computed before the first block.
    """

    technique = "learned_rounding"

    act_order: bool = True
    clip_search: bool = True
    compute_dtype: Literal["float32", "bfloat16"] = "bfloat16"
    init: Literal["gptq", "rtn"] = "gptq"
    steps: int = 200
    lr: float | None = None
    learn_range: bool = True
    target: Literal["float_model", "block"] = "float_model"
    keep_best: bool = False
    seed: int = 0
    e2e_steps: int = 0
    e2e_lr: float = 3e-3
    e2e_windows: int = 32

    def _validate(self) -> None:
        super()._validate()
        if self.steps < 0:
            raise invalid("steps", self.steps, "an integer >= 0 (0 keeps the starting point)")
        if self.lr is not None and not 0 < self.lr <= 1:
            raise invalid("lr", self.lr, "a number in (0, 1], or null for 1 / steps")
        if self.e2e_steps < 0:
            raise invalid("e2e_steps", self.e2e_steps, "an integer >= 0 (0 skips the end-to-end pass)")
        check_e2e_fields(self)

    @property
    def step_size(self) -> float:
        return self.lr if self.lr is not None else 1.0 / max(self.steps, 1)
