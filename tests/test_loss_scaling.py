"""Loss scaling of the backward passes through a float16 model (hfcompress.loss_scaling)."""

import pytest
import torch
from torch import nn

from hfcompress.loss_scaling import LossScaler


def _layer(dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor]:
    """A float16/bfloat16/float32 layer and a float32 parameter trained through it, as the
    rounding offsets and scale factors are trained through a model's own activations."""
    torch.manual_seed(0)
    layer = nn.Linear(64, 64).to(dtype)
    factor = torch.ones(64, requires_grad=True)
    return layer, factor


def _mse(layer, factor, x, target):
    out = layer(x * factor.to(x.dtype))
    return nn.functional.mse_loss(out.float(), target)


def test_float16_gradients_that_underflow_come_back_with_scaling():
    torch.manual_seed(1)
    x = torch.randn(4096, 64)
    layer32, factor32 = _layer(torch.float32)
    target = layer32(x).detach() + 3e-2 * torch.randn(4096, 64)  # a small error, as a tuned block's
    _mse(layer32, factor32, x, target).backward()
    expected = factor32.grad

    def error(grad):
        return ((grad - expected).norm() / expected.norm()).item()

    layer16, plain = _layer(torch.float16)
    _mse(layer16, plain, x.half(), target).backward()
    # Each output's gradient is ~2e-7: a float16 subnormal, a few bits of it left.
    assert error(plain.grad) > 0.1

    layer16, factor16 = _layer(torch.float16)
    scaler = LossScaler(layer16)
    assert scaler.enabled and scaler.scale == 2.0**16
    assert scaler.backward(_mse(layer16, factor16, x.half(), target), [factor16])
    got = scaler.unscaled(factor16)
    assert got.dtype == torch.float32
    assert error(got) < 0.05  # what float16's rounding of the forward pass leaves
    scaler.unscale_([factor16])
    assert torch.equal(factor16.grad, got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_off_where_no_float16_takes_part(dtype):
    layer, factor = _layer(dtype)
    scaler = LossScaler(layer)
    assert not scaler.enabled and scaler.scale == 1.0
    x = torch.randn(8, 64, dtype=dtype)
    reference = factor.grad
    assert scaler.backward(_mse(layer, factor, x, torch.zeros(8, 64)), [factor])
    reference = factor.grad.clone()
    factor.grad = None
    _mse(layer, factor, x, torch.zeros(8, 64)).backward()
    assert torch.equal(factor.grad, reference)  # a plain backward pass
    scaler.unscale_([factor])
    assert torch.equal(factor.grad, reference)


def test_an_overflow_drops_the_step_and_halves_the_scale():
    layer, factor = _layer(torch.float16)
    scaler = LossScaler(layer, init_scale=2.0**40)  # 2^40 times any gradient overflows float16
    x = torch.randn(8, 64, dtype=torch.float16)
    assert not scaler.backward(_mse(layer, factor, x, torch.zeros(8, 64)), [factor])
    assert factor.grad is None and scaler.skipped == 1 and scaler.scale == 2.0**39
    while not scaler.backward(_mse(layer, factor, x, torch.zeros(8, 64)), [factor]):
        pass
    assert torch.isfinite(factor.grad).all() and scaler.scale < 2.0**39


def test_the_scale_grows_back_after_a_run_of_finite_steps():
    layer, factor = _layer(torch.float16)
    scaler = LossScaler(layer, init_scale=4.0, growth_interval=3)
    x = torch.randn(8, 64, dtype=torch.float16)
    for _ in range(3):
        assert scaler.backward(_mse(layer, factor, x, torch.zeros(8, 64)), [factor])
        factor.grad = None
    assert scaler.scale == 8.0


def test_a_nan_is_an_error_not_an_endless_retry():
    layer, factor = _layer(torch.float16)
    scaler = LossScaler(layer, init_scale=4.0)
    x = torch.full((8, 64), float("nan"), dtype=torch.float16)
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        while not scaler.backward(_mse(layer, factor, x, torch.zeros(8, 64)), [factor]):
            pass


def test_learned_rounding_and_its_end_to_end_steps_scale_the_loss_of_a_float16_model(monkeypatch):
    import copy

    import hfcompress.loss_scaling as loss_scaling
    from hfcompress import LearnedRoundingConfig, RTNConfig, compress
    from tests.conftest import make_tiny_llama

    scalers = []
    real_init = loss_scaling.LossScaler.__init__

    def spy(self, module, **kwargs):
        real_init(self, module, **kwargs)
        scalers.append(self)

    monkeypatch.setattr(loss_scaling.LossScaler, "__init__", spy)
    # As where float16 is fast (a GPU): elsewhere the steps run in float32 (hfcompress.upcast)
    monkeypatch.setattr("hfcompress.layerwise.native_float16", lambda device_type: True)
    calib = torch.randint(0, 128, (16, 24), generator=torch.Generator().manual_seed(5))
    ids = torch.randint(0, 128, (16, 24), generator=torch.Generator().manual_seed(6))
    base = make_tiny_llama(layers=3).half()
    with torch.no_grad():
        reference = base(ids).logits.float()
    rtn, rounded = copy.deepcopy(base), copy.deepcopy(base)
    compress(rtn, [RTNConfig(bits=3, group_size=16)], progress=False)
    config = LearnedRoundingConfig(
        bits=3, group_size=16, init="rtn", clip_search=False, steps=100, batch_size=4, e2e_steps=8, e2e_windows=8
    )
    compress(rounded, [config], calibration_data=calib, progress=False)
    assert len(scalers) == 3 + 1 and all(s.enabled for s in scalers)  # each block's steps, then the model's
    with torch.no_grad():
        errors = [(m(ids).logits.float() - reference).pow(2).mean().item() for m in (rtn, rounded)]
    assert errors[1] < 0.7 * errors[0]
    assert all(p.dtype == torch.float16 for p in rounded.parameters())
