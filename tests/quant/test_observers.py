"""Observers for static activation scales: each one's threshold on data whose answer is known."""

import pytest
import torch

from hfcompress.quant.observers import ActivationObserver, kl_threshold, mse_threshold, percentile_threshold


def _heavy_tailed(n=200_000, seed=0, outliers=20):
    """Gaussian bulk (std 1) with a few outliers at 40: what LLM activations look like."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    x[:outliers] = 40.0
    return x.reshape(-1, 100)


def _fq_error(x, t):
    s = t / 127
    return float(((torch.clamp(torch.round(x / s), -128, 127) * s - x) ** 2).mean())


def test_minmax_is_the_largest_magnitude_over_all_batches():
    obs = ActivationObserver("minmax")
    obs.update(torch.tensor([[1.0, -3.0]]))
    obs.update(torch.tensor([[2.0, 0.5]]))
    assert obs.threshold().item() == 3.0
    assert obs.scale().item() == pytest.approx(3.0 / 127)


def test_ema_averages_the_batches_statistics():
    obs = ActivationObserver("minmax", ema=0.9)
    obs.update(torch.tensor([[10.0]]))
    obs.update(torch.tensor([[0.0, 20.0]]))
    assert obs.threshold().item() == pytest.approx(0.9 * 10 + 0.1 * 20)


def test_percentile_clips_the_outliers():
    x = _heavy_tailed()
    obs = ActivationObserver("percentile", percentile=99.9)
    for batch in x.split(500):
        obs.update(batch)
    # The 99.9th percentile of |N(0,1)| is 3.29; the histogram bin is 40/2048 wide.
    assert 3.29 - 0.05 <= obs.threshold().item() <= 3.29 + 0.1


def test_histogram_widening_keeps_every_count():
    obs = ActivationObserver("kl")
    obs.update(torch.full((1, 10), 0.5))
    obs.update(torch.full((1, 30), 8.0))
    assert obs.hist.sum().item() == 40
    assert obs.top >= 8.0


def test_mse_clips_rare_outliers_when_that_lowers_the_error():
    x = _heavy_tailed(outliers=2)
    obs = ActivationObserver("mse")
    obs.update(x)
    t = obs.threshold().item()
    # With 2 outliers in 200k the modelled optimum is t = 26.4 (clipping 2 (40 - t)^2 against
    # rounding 200k t^2 / (127^2 12)).
    assert 24.0 < t < 29.0
    assert _fq_error(x, t) < 0.7 * _fq_error(x, 40.0)


def test_mse_keeps_outliers_that_would_cost_more_clipped():
    obs = ActivationObserver("mse")
    obs.update(_heavy_tailed(outliers=20))
    assert obs.threshold().item() > 35.0


def test_kl_keeps_the_bulk_and_clips_the_outliers():
    obs = ActivationObserver("kl")
    obs.update(_heavy_tailed(outliers=20))
    assert 2.5 < obs.threshold().item() < 10.0


def test_mse_threshold_minimizes_the_error_it_models():
    x = _heavy_tailed(outliers=2).abs().reshape(-1)
    hist = torch.histc(x, bins=2048, min=0, max=40).double()
    t = mse_threshold(hist, 40.0)
    best = min((_fq_error(x, c), c) for c in torch.linspace(0.5, 40, 80).tolist())[1]
    assert abs(t - best) < 1.0


def test_kl_threshold_of_uniform_data_keeps_the_whole_range():
    hist = torch.ones(2048, dtype=torch.float64)
    assert kl_threshold(hist, 1.0) > 0.9
    assert percentile_threshold(hist, 1.0, 50.0) == pytest.approx(0.5, abs=1e-3)


def test_channel_observer_keeps_each_column():
    obs = ActivationObserver("minmax", "channel")
    obs.update(torch.tensor([[1.0, -5.0, 0.0], [2.0, 1.0, 0.0]]))
    assert obs.threshold().tolist() == [2.0, 5.0, 0.0]
    assert (obs.scale() > 0).all()  # a dead channel still gets a usable scale


def test_bad_values_and_settings_are_refused():
    obs = ActivationObserver("mse")
    with pytest.raises(ValueError, match="1 NaN or infinite"):
        obs.update(torch.tensor([[1.0, float("inf")]]))
    with pytest.raises(ValueError, match="per tensor only"):
        ActivationObserver("kl", "channel")
    with pytest.raises(ValueError, match="ema"):
        ActivationObserver("mse", ema=0.9)
    with pytest.raises(ValueError, match="no calibration batch"):
        ActivationObserver().threshold()
