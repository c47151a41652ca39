"""End-to-end tuning of the quantization scales of a quantized model, its codes fixed.

After the blocks are quantized one at a time, each block's error was fitted locally; what the
model as a whole loses is not. This pass trains one factor per group scale of every
quantized layer (``s = s0 * exp(t)``, ``t`` starting at 0) with Adam, to lower the
Kullback-Leibler divergence between the model's next-token distribution and the unquantized
model's on calibration windows (the end-to-end step size training of EfficientQAT, Chen et
al. 2024, with the float model as the teacher instead of labels). The codes and zero points
stay as they are, so the stored format, the kernels and the reload are unchanged.

Layers with static input-activation scales (``int8_activations`` with ``dynamic: false``)
can have those trained too (``inputs=True``): the input is rounded onto its int8 grid with
a straight-through estimate, so the scale gets the gradient of learned step size
quantization (LSQ, Esser et al. 2020): the rounding error inside the range and the clipped
value outside it. Layers with dynamic input scales compute with their inputs rounded as the
int8 kernels round them, so every layer trains as it will run.

The teacher is kept as its top ``TOP_K`` log-probabilities per token and the probability of
all other tokens together, computed once before any block is quantized: a few MB for 32
windows of 512 tokens at any vocabulary size. The loss is the KL divergence over those
``TOP_K + 1`` outcomes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from hfcompress.layerwise import autocast_for
from hfcompress.loss_scaling import LossScaler
from hfcompress.quant.activations import fake_quantize_activations
from hfcompress.quant.affine import dequantize
from hfcompress.quant.linear import QuantLinear
from hfcompress.techniques.learned_rounding.algorithm import _cast_ste, _round_ste

__all__ = ["TOP_K", "calibration_windows", "check_in_memory", "partial_kl", "teacher_top_k", "tune_scales"]

logger = logging.getLogger(__name__)

TOP_K = 64


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _logits(model: nn.Module, ids: torch.Tensor, compute_dtype: torch.dtype | None) -> torch.Tensor:
    device = _model_device(model)
    compute_dtype = autocast_for(model, compute_dtype)
    cast = torch.autocast(device.type, dtype=compute_dtype) if compute_dtype is not None else contextlib.nullcontext()
    with cast:
        out = model(input_ids=ids[None].to(device))
    logits = getattr(out, "logits", None)
    if logits is None:
        raise TypeError(f"{type(model).__name__} returns no logits: end-to-end scale tuning needs them")
    return logits.float()


def _rest(logp_top: torch.Tensor) -> torch.Tensor:
    """``log(1 - sum(exp(logp_top)))`` over the last dimension: the log-probability of every
    token outside the top ones (clamped away from log 0)."""
    top = torch.logsumexp(logp_top, dim=-1).clamp(max=-1e-6)
    return torch.log(-torch.expm1(top))


@torch.no_grad()
def teacher_top_k(
    model: nn.Module, windows: Sequence[torch.Tensor], compute_dtype: torch.dtype | None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per window ``[T]``: the model's ``TOP_K`` largest log-probabilities per position with
    the log-probability of all other tokens appended (``[T, k + 1]``), and the top tokens'
    ids (``[T, k]``); on the CPU."""
    out = []
    for ids in windows:
        logp = F.log_softmax(_logits(model, ids, compute_dtype)[0], dim=-1)
        values, index = logp.topk(min(TOP_K, logp.shape[-1]), dim=-1)
        values = torch.cat([values, _rest(values)[..., None]], dim=-1)
        out.append((values.cpu(), index.cpu()))
    return out


def partial_kl(logits: torch.Tensor, teacher_logp: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``KL(teacher || student)`` over the teacher's top tokens and one bucket for all the
    others, averaged over positions: zero exactly when the student gives each top token, and
    the rest together, the teacher's probability."""
    logq = F.log_softmax(logits.float(), dim=-1).gather(-1, index)
    logq = torch.cat([logq, _rest(logq)[..., None]], dim=-1)
    return (teacher_logp.exp() * (teacher_logp - logq)).sum(-1).mean()


def check_in_memory(model: nn.Module, error: Callable[[str], Exception]) -> None:
    """Raise ``error(message)`` if the end-to-end steps cannot run on ``model``: some of its
    weights are offloaded (on the meta device; the steps run the whole model at once), or it
    returns no logits to match (a base model without its head). Checked before any stage runs."""
    if any(p.device.type == "meta" for p in model.parameters()):
        raise error(
            "e2e_steps runs the whole model at once, but some of its weights are offloaded (on the meta "
            "device); load the model into memory, or set e2e_steps: 0"
        )
    try:
        with torch.no_grad():
            out = model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=_model_device(model)))
    except Exception:  # a model that needs more inputs: the steps themselves will say what fails
        return
    if getattr(out, "logits", None) is None:
        raise error(
            f"e2e_steps matches the model's output distribution to the float model's, but {type(model).__name__} "
            "returns no logits (a base model without its head); set e2e_steps: 0, or compress the model with its "
            "head (e.g. AutoModelForCausalLM, AutoModelForMaskedLM) and load the base model from the result"
        )


def calibration_windows(batches: list[dict], count: int) -> list[torch.Tensor]:
    """The first ``count`` token windows of the calibration batches, one tensor each."""
    return list(torch.cat([b["input_ids"] for b in batches])[:count])


class _TunedScales:
    """A ``QuantLinear`` computing with trainable scale factors (its codes held unpacked,
    one byte per weight): its weights' group scales with ``weights``, its static input scale
    with ``inputs``."""

    def __init__(self, layer: QuantLinear, *, weights: bool = True, inputs: bool = False) -> None:
        self.layer = layer
        self.codes, self.zeros = layer.codes(), layer.zero_points()
        self.base = layer.scales.detach().float()
        self.log_factor = nn.Parameter(torch.zeros_like(self.base)) if weights else None
        self.act = layer.scheme.input_activations
        self.static_input = _has_static_input(layer)
        if inputs and not self.static_input:
            raise ValueError("only a static input scale can be trained: this layer has none")
        self.input_base = layer.input_scale.detach().float() if self.static_input else None
        self.input_log_factor = nn.Parameter(torch.zeros_like(self.input_base)) if inputs else None
        # Without weight factors the weight is fixed: dequantized once.
        self._weight = None if weights else dequantize(self.codes, self.base, self.zeros, layer.group_size)

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in (self.log_factor, self.input_log_factor) if p is not None]

    def scales(self) -> torch.Tensor:
        """The scales now chosen, rounded to their storage dtype (gradients pass through)."""
        if self.log_factor is None:
            return self.layer.scales
        return _cast_ste(self.base * self.log_factor.exp(), self.layer.scales.dtype)

    def input_scale(self) -> torch.Tensor:
        """The static input scale now chosen (float32, as stored)."""
        if self.input_log_factor is None:
            return self.layer.input_scale
        return self.input_base * self.input_log_factor.exp()

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` on the int8 grid the layer's kernel puts it on, gradients straight through
        (and into a trained input scale)."""
        if self.act is None:
            return x
        if self.input_log_factor is None:
            return x + (fake_quantize_activations(x, self.act, self.input_base) - x).detach()
        qmax = 2 ** (self.act.num_bits - 1) - 1
        scale = self.input_scale()
        return (torch.clamp(_round_ste(x.float() / scale), -qmax - 1, qmax) * scale).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self._weight
        if weight is None:
            weight = dequantize(self.codes, self.scales(), self.zeros, self.layer.group_size)
        return F.linear(self._inputs(x), weight.to(x.dtype), self.layer.bias)

    @torch.no_grad()
    def write(self) -> None:
        """Store the chosen scales in the layer."""
        if self.log_factor is not None:
            self.layer.scales.copy_(self.scales().to(self.layer.scales.dtype))
        if self.input_log_factor is not None:
            self.layer.input_scale.copy_(self.input_scale())


def _has_static_input(layer: QuantLinear) -> bool:
    act = layer.scheme.input_activations
    return act is not None and not act.dynamic


def tune_scales(
    model: nn.Module,
    layers: Sequence[QuantLinear],
    windows: Sequence[torch.Tensor],
    teacher: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    steps: int,
    lr: float,
    compute_dtype: torch.dtype | None,
    seed: int = 0,
    weights: bool = True,
    inputs: bool = False,
    progress: bool = False,
    desc: str = "scales, end to end",
) -> list[float]:
    """Train the scales of ``layers`` for ``steps`` Adam steps of one window each (visited
    in a seeded random order; the step size decays linearly to 0), then write them into the
    layers. Returns each step's loss (:func:`partial_kl` against ``teacher``).

    ``weights`` trains the weights' group scales; ``inputs`` the static input scales of the
    layers that have one (the others keep theirs)."""
    tuned = [_TunedScales(layer, weights=weights, inputs=inputs and _has_static_input(layer)) for layer in layers]
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    params = [p for t in tuned for p in t.trainable()]
    if not params:
        raise ValueError("nothing to tune: no weight scales asked for and no layer has a static input scale")
    optimizer = torch.optim.Adam(params, lr=lr)
    scaler = LossScaler(model)
    generator = torch.Generator().manual_seed(seed)
    device = _model_device(model)
    order: list[int] = []
    losses: list[float] = []
    try:
        for t in tuned:
            t.layer.forward = t.forward  # an instance attribute: removed in the finally below
        with torch.enable_grad():
            for step in tqdm(range(steps), desc=desc, disable=not progress):
                if not order:
                    order = torch.randperm(len(windows), generator=generator).tolist()
                i = order.pop()
                values, index = (v.to(device) for v in teacher[i])
                loss = partial_kl(_logits(model, windows[i], compute_dtype)[0], values, index)
                if scaler.backward(loss, params):  # else a float16 gradient overflowed: no step
                    scaler.unscale_(params)
                    for group in optimizer.param_groups:
                        group["lr"] = lr * (1 - step / steps)
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
    finally:
        for t in tuned:
            t.layer.__dict__.pop("forward", None)
        for p in frozen:
            p.requires_grad_(True)
    for t in tuned:
        t.write()
    if losses:
        head, tail = losses[: max(1, steps // 8)], losses[-max(1, steps // 8) :]
        logger.info(
            "%s: KL to the unquantized model %.4g over the first steps, %.4g over the last",
            desc, sum(head) / len(head), sum(tail) / len(tail),
        )  # fmt: skip
    if scaler.skipped:
        logger.info("%s: %d of %d steps dropped, their float16 gradients overflowed", desc, scaler.skipped, steps)
    return losses
