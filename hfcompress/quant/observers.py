"""Observers: how a static activation scale is chosen from calibration data.

The textbook's calibration list, for a symmetric 8-bit grid with ``s = t / 127`` for a
clipping threshold ``t`` on ``|x|``:

* ``minmax``: ``t = max |x|`` (every value representable, the grid as coarse as the largest
  outlier makes it);
* ``percentile``: ``t`` = the given percentile of ``|x|`` (outliers above it clip);
* ``mse``: the ``t`` minimising the expected squared quantization error, clipping included,
  searched over a grid of thresholds;
* ``kl``: entropy calibration (TensorRT's method): the ``t`` whose clipped, 128-level
  quantized distribution of ``|x|`` is closest in KL divergence to the observed one.

Per-tensor observers keep a histogram of ``|x|`` over every calibration batch (2048 bins,
widened as larger values arrive), so percentile, MSE and KL see all the data, not one batch.
With ``ema``, ``minmax`` and ``percentile`` instead take each batch's statistic and average
them exponentially (``running = ema * running + (1 - ema) * batch``), the moving-average
observers of quantization-aware training. Per-channel observers (``strategy="channel"``)
keep each input column's absmax (``minmax`` only).
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["OBSERVERS", "ActivationObserver", "kl_threshold", "mse_threshold", "percentile_threshold"]

OBSERVERS = ("minmax", "percentile", "mse", "kl")
ObserverName = Literal["minmax", "percentile", "mse", "kl"]
QMAX = 127


class ActivationObserver:
    """Statistics of one layer's inputs over calibration batches, and the static scale they give.

    Args:
        observer: ``"minmax"``, ``"percentile"``, ``"mse"`` or ``"kl"``.
        strategy: ``"tensor"`` (one scale) or ``"channel"`` (one scale per input column).
        percentile: For ``"percentile"``: the percentile of ``|x|`` kept unclipped, in (0, 100].
        ema: Weight of the running value in an exponential moving average over batches
            (``minmax`` and ``percentile``); None takes the statistic over all batches.
        bins: Histogram bins (per-tensor ``percentile`` without ``ema``, ``mse``, ``kl``).
    """

    def __init__(
        self,
        observer: ObserverName = "minmax",
        strategy: Literal["tensor", "channel"] = "tensor",
        *,
        percentile: float = 99.99,
        ema: float | None = None,
        bins: int = 2048,
    ) -> None:
        if observer not in OBSERVERS:
            raise ValueError(f"observer={observer!r} is invalid; accepted: {', '.join(OBSERVERS)}")
        if strategy == "channel" and observer != "minmax":
            raise ValueError(f"observer={observer!r} is per tensor only; per-channel scales use 'minmax'")
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile={percentile!r} is invalid; accepted: a number in (0, 100]")
        if ema is not None and not (0 <= ema < 1 and observer in ("minmax", "percentile")):
            raise ValueError(f"ema={ema!r} is invalid; accepted: a number in [0, 1) with 'minmax' or 'percentile'")
        self.observer = observer
        self.strategy = strategy
        self.percentile = percentile
        self.ema = ema
        self.bins = bins
        self.batches = 0
        self.running: torch.Tensor | None = None  # minmax, or percentile with ema
        self.hist: torch.Tensor | None = None  # [bins] float64 counts of |x| over [0, top]
        self.top = 0.0

    @property
    def uses_histogram(self) -> bool:
        return self.observer in ("mse", "kl") or (self.observer == "percentile" and self.ema is None)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add one batch of inputs ``x: [..., K]``; raise ``ValueError`` on NaN or Inf."""
        a = x.detach().reshape(-1, x.shape[-1]).float().abs()
        if not torch.isfinite(a).all():
            bad = int((~torch.isfinite(a)).sum())
            raise ValueError(f"{bad} NaN or infinite input value(s) in a calibration batch")
        self.batches += 1
        if self.uses_histogram:
            self._add_to_histogram(a.reshape(-1))
            return
        if self.strategy == "channel":
            stat = a.amax(dim=0)
        elif self.observer == "minmax":
            stat = a.amax().reshape(1)
        else:
            stat = _quantile(a.reshape(-1), self.percentile / 100).reshape(1)
        if self.running is None:
            self.running = stat
        elif self.ema is None:
            self.running = torch.maximum(self.running, stat)
        else:
            self.running = self.ema * self.running + (1 - self.ema) * stat

    def _add_to_histogram(self, a: torch.Tensor) -> None:
        peak = float(a.max()) if a.numel() else 0.0
        if self.hist is None:
            self.top = max(peak, torch.finfo(torch.float32).tiny)
            self.hist = torch.zeros(self.bins, dtype=torch.float64, device=a.device)
        elif peak > self.top:
            # Widen by at least 1.5x so repeated growth re-bins (and blurs) only a few times.
            new_top = max(peak, 1.5 * self.top)
            width = self.top / self.bins
            centers = (torch.arange(self.bins, dtype=torch.float64, device=a.device) + 0.5) * width
            idx = (centers / (new_top / self.bins)).long().clamp(max=self.bins - 1)
            self.hist = torch.zeros_like(self.hist).index_add_(0, idx, self.hist)
            self.top = new_top
        self.hist += torch.histc(a, bins=self.bins, min=0.0, max=self.top).double()

    def threshold(self) -> torch.Tensor:
        """The clipping threshold ``t`` on ``|x|``: ``[1]`` or ``[K]`` float32."""
        if self.batches == 0:
            raise ValueError("the observer saw no calibration batch")
        if not self.uses_histogram:
            return self.running.float()
        if self.observer == "percentile":
            t = percentile_threshold(self.hist, self.top, self.percentile)
        elif self.observer == "mse":
            t = mse_threshold(self.hist, self.top)
        else:
            t = kl_threshold(self.hist, self.top)
        return torch.tensor([t], dtype=torch.float32)

    def scale(self) -> torch.Tensor:
        """The static scale ``t / 127`` (float32, positive): ``[1]`` or ``[K]``."""
        return (self.threshold() / QMAX).clamp(min=torch.finfo(torch.float32).tiny).cpu()


def _quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    # torch.quantile refuses inputs over 2**24 elements; kthvalue has no such limit.
    k = min(values.numel(), max(1, round(q * values.numel())))
    return values.kthvalue(k).values


def percentile_threshold(hist: torch.Tensor, top: float, percentile: float) -> float:
    """Upper edge of the histogram bin where the cumulative share reaches ``percentile``."""
    cdf = hist.cumsum(0) / hist.sum()
    index = int(torch.searchsorted(cdf, torch.tensor([percentile / 100], dtype=cdf.dtype, device=cdf.device)))
    return min(index + 1, hist.numel()) * top / hist.numel()


def mse_threshold(hist: torch.Tensor, top: float, candidates: int = 200) -> float:
    """The threshold minimising the expected squared error of the 8-bit grid on ``|x|``:
    values under it round with error ``s^2 / 12`` (``s = t / 127``), values above clip to it."""
    bins = hist.numel()
    width = top / bins
    centers = (torch.arange(bins, dtype=torch.float64, device=hist.device) + 0.5) * width
    ts = torch.linspace(top / candidates, top, candidates, dtype=torch.float64, device=hist.device)  # [C]
    s = ts / QMAX
    inside = centers[None, :] <= ts[:, None]  # [C, bins]
    err = torch.where(inside, (s**2 / 12)[:, None], (centers[None, :] - ts[:, None]) ** 2)
    return float(ts[int((err * hist[None, :]).sum(1).argmin())])


def kl_threshold(hist: torch.Tensor, top: float, levels: int = QMAX + 1, stride: int = 8) -> float:
    """TensorRT's entropy calibration: for each candidate bin count ``i`` (from ``levels`` up,
    every ``stride`` bins), clip the histogram at bin ``i`` (outliers added to the last bin),
    merge it into ``levels`` quantization bins and expand them back over the non-empty bins;
    return the edge of the ``i`` whose expansion has the least KL divergence from the clipped
    histogram."""
    bins = hist.numel()
    h = hist.double()
    best, best_i = float("inf"), bins
    for i in range(levels, bins + 1, stride):
        p = h[:i].clone()
        p[-1] += h[i:].sum()
        # Merge bins [0, i) into `levels` chunks, then spread each chunk's count evenly over
        # its non-empty bins (vectorised: chunk of bin b is b * levels // i).
        chunk = torch.arange(i, device=h.device) * levels // i
        nonzero = (h[:i] > 0).double()
        sums = torch.zeros(levels, dtype=h.dtype, device=h.device).index_add_(0, chunk, h[:i])
        counts = torch.zeros(levels, dtype=h.dtype, device=h.device).index_add_(0, chunk, nonzero)
        q = nonzero * (sums / counts.clamp(min=1))[chunk]
        p_sum, q_sum = p.sum(), q.sum()
        if p_sum == 0 or q_sum == 0:
            continue
        p, q = p / p_sum, q / q_sum
        mask = p > 0
        # A bin the clipped histogram has but the expansion lacks (the outlier bin) gets a
        # small floor instead of an infinite divergence.
        kl = float((p[mask] * torch.log(p[mask] / q[mask].clamp(min=1e-12))).sum())
        if kl < best:
            best, best_i = kl, i
    return best_i * top / bins
