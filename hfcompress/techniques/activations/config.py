"""Config of 8-bit input-activation quantization."""

from __future__ import annotations

import dataclasses
from typing import Literal

from hfcompress.config import TechniqueConfig, check_e2e_fields, check_target_fields, invalid
from hfcompress.quant.scheme import QuantArgs

__all__ = ["ActivationQuantConfig"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ActivationQuantConfig(TechniqueConfig):
    """Quantize the inputs of already weight-quantized layers to int8 (``W8A16`` -> ``W8A8``,
    ``W4A16`` -> ``W4A8``), so their matmuls run on int8 kernels.

    Put it after the weight stage (``rtn`` or ``gptq``), and after ``smoothquant`` has moved
    the activations' outliers into the weights. Dynamic scales need no data; static scales
    are calibrated block by block on the layerwise runner (each block sees the outputs of the
    blocks before it, with their activations already quantized) and stored in the checkpoint.

    Args:
        bits: Activation bits; only 8.
        strategy: ``"token"``: one scale per row of the input, computed on the fly (needs
            ``dynamic``). ``"tensor"``: one scale per layer, dynamic or static. ``"channel"``:
            one static scale per input column (runs on the reference kernel: a per-column
            scale cannot be applied after an integer matmul).
        dynamic: Compute scales from each input as it arrives; nothing is calibrated.
        observer: Static scales: ``"minmax"``, ``"percentile"``, ``"mse"`` or ``"kl"`` (see
            :mod:`hfcompress.quant.observers`); per-channel scales use ``"minmax"``.
        percentile: For ``observer="percentile"``: the percentile of ``|x|`` kept unclipped.
        ema: For ``"minmax"``/``"percentile"``: weight of the running value in a moving
            average over calibration batches; null takes the statistic over all batches.
        token_outlier_ratio: Static scales: a layer whose calibration inputs hold a token
            whose absolute maximum is more than this many times the median token's keeps
            dynamic per-token scales instead (logged, and recorded in its scheme, so the
            checkpoint reloads it so). One static scale cannot serve such a token and the
            others at once: on SmolLM2 the down projection of layer 11 sees one token at
            2100x the median. null keeps every layer static.
        targets: Layers whose inputs to quantize (by default every ``QuantLinear``); each
            must have been quantized by an earlier stage or an earlier run.
        ignore: Layers to leave alone; wins over ``targets``.
        batch_size: Calibration sequences per forward pass (static scales).
        compute_dtype: Dtype of the calibration passes (static scales).
        e2e_steps: Static scales: after the observers, this many Adam steps (one calibration
            window each) train every static input scale end to end, and with ``e2e_weights``
            the weights' scales too (codes fixed), to lower the KL divergence from the
            model's next-token distribution to the one it had before this stage (see
            :mod:`hfcompress.techniques.learned_rounding.scales`). An observer picks each
            layer's range for that layer alone; these steps pick the ranges for the model's
            output. 0 skips it. It runs the whole model on its device.
        e2e_lr: Adam's step size for the scales' log-factors (decays linearly to 0).
        e2e_windows: Calibration windows the end-to-end steps visit (the first ones).
        e2e_weights: Also train the weights' scales in those steps.
    """

    technique = "int8_activations"

    bits: int = 8
    strategy: Literal["token", "tensor", "channel"] = "token"
    dynamic: bool = True
    observer: Literal["minmax", "percentile", "mse", "kl"] = "minmax"
    percentile: float = 99.99
    ema: float | None = None
    token_outlier_ratio: float | None = None
    targets: tuple[str, ...] = ("QuantLinear",)
    ignore: tuple[str, ...] = ("lm_head",)
    batch_size: int = 8
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    e2e_steps: int = 0
    e2e_lr: float = 5e-3
    e2e_windows: int = 32
    e2e_weights: bool = True

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return not self.dynamic

    def _validate(self) -> None:
        if self.bits != 8:
            raise invalid("bits", self.bits, "8 (int8 activations; lower activation bits lose too much on LLMs)")
        if self.strategy == "token" and not self.dynamic:
            raise invalid(
                "dynamic",
                self.dynamic,
                "true with strategy 'token' (its scales are computed on the fly); static scales (dynamic: false) "
                "need strategy: tensor (one calibrated scale per layer) or channel",
            )
        if self.strategy == "channel" and self.dynamic:
            raise invalid("dynamic", self.dynamic, "false with strategy 'channel' (per-channel scales are calibrated)")
        if self.strategy == "channel" and self.observer != "minmax":
            raise invalid("observer", self.observer, "'minmax' with strategy 'channel'")
        if not 0 < self.percentile <= 100:
            raise invalid("percentile", self.percentile, "a number in (0, 100]")
        if self.ema is not None and not (0 <= self.ema < 1 and self.observer in ("minmax", "percentile")):
            raise invalid("ema", self.ema, "null, or a number in [0, 1) with observer 'minmax' or 'percentile'")
        if self.token_outlier_ratio is not None and not (self.token_outlier_ratio > 1 and not self.dynamic):
            accepted = "null, or a number > 1 with static scales (dynamic: false)"
            raise invalid("token_outlier_ratio", self.token_outlier_ratio, accepted)
        if self.batch_size < 1:
            raise invalid("batch_size", self.batch_size, "an integer >= 1")
        if self.e2e_steps < 0 or (self.e2e_steps and self.dynamic):
            accepted = "0, or an integer >= 1 with static scales (dynamic: false): dynamic scales have nothing to train"
            raise invalid("e2e_steps", self.e2e_steps, accepted)
        check_e2e_fields(self)
        check_target_fields(self)

    def dynamic_fallback_args(self) -> QuantArgs:
        """The args of a layer that ``token_outlier_ratio`` leaves dynamic: 8 bits per token."""
        return dataclasses.replace(self.args(), strategy="token", dynamic=True, observer=None)

    def args(self) -> QuantArgs:
        """The input-activation args this stage gives each layer."""
        return QuantArgs(
            num_bits=self.bits,
            symmetric=True,
            strategy=self.strategy,
            dynamic=self.dynamic,
            observer=None if self.dynamic else self.observer,
            scale_dtype="float32",
            zp_dtype=None,
        )
