"""The PKD loss terms on tiny hand-made tensors."""

from __future__ import annotations

import math

import pytest
import torch

from hfcompress.techniques.pkd.loss import distillation_loss, kd_loss, patient_loss, regression_kd_loss


def test_kd_is_zero_for_equal_logits_and_positive_otherwise():
    t = torch.randn(4, 3)
    assert kd_loss(t, t, 5.0).item() == pytest.approx(0.0, abs=1e-7)
    assert kd_loss(t + torch.randn(4, 3), t, 5.0).item() > 0


def test_kd_equals_t_squared_kl_by_hand():
    s, t = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    temperature = 2.0
    p = torch.softmax(t / temperature, -1)[0]
    q = torch.softmax(s / temperature, -1)[0]
    expected = temperature**2 * float((p * (p / q).log()).sum())
    assert kd_loss(s, t, temperature).item() == pytest.approx(expected, rel=1e-6)


def test_kd_mask_ignores_padding_tokens():
    s, t = torch.randn(1, 3, 5), torch.randn(1, 3, 5)
    mask = torch.tensor([[1, 1, 0]])
    garbage = s.clone()
    garbage[0, 2] = 100.0  # a padded position's logits must not count
    assert kd_loss(garbage, t, 1.0, mask=mask).item() == pytest.approx(
        kd_loss(s[:, :2], t[:, :2], 1.0).item(), rel=1e-6
    )


def test_kd_refuses_shape_mismatch():
    with pytest.raises(ValueError, match=r"student logits \(2, 3\) != teacher \(2, 4\)"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 4), 1.0)


def test_patient_loss_uses_normalised_cls_states():
    t = torch.randn(2, 4, 8)
    s = 3.0 * t.clone()  # same direction, another scale: no distance after normalising
    s[:, 1:] = torch.randn(2, 3, 8)  # positions other than [CLS] do not count
    assert patient_loss([s], [t]).item() == pytest.approx(0.0, abs=1e-6)
    opposite = -t
    assert patient_loss([opposite], [t]).item() == pytest.approx(4.0, rel=1e-5)  # |u - (-u)|^2 = 4


def test_patient_loss_averages_layer_pairs():
    t = torch.randn(2, 1, 8)
    assert patient_loss([t, -t], [t, t]).item() == pytest.approx(2.0, rel=1e-5)


def test_patient_loss_on_tokens_with_mask_for_causal_lms():
    t = torch.randn(1, 3, 8)
    s = t.clone()
    s[0, 2] = -t[0, 2]
    mask = torch.tensor([[1, 1, 0]])
    assert patient_loss([s], [t], cls_only=False, mask=mask).item() == pytest.approx(0.0, abs=1e-6)
    assert patient_loss([s], [t], cls_only=False).item() == pytest.approx(4.0 / 3, rel=1e-5)


def test_regression_kd_is_mse():
    assert regression_kd_loss(torch.tensor([[1.0], [3.0]]), torch.tensor([[0.0], [1.0]])).item() == 2.5


def test_distillation_loss_weights_the_terms():
    ce, kd, pkd = torch.tensor(2.0), torch.tensor(3.0), torch.tensor(0.5)
    loss = distillation_loss(ce, kd, pkd, alpha=0.25, beta=10.0)
    assert loss.total.item() == pytest.approx(0.75 * 2 + 0.25 * 3 + 10 * 0.5)
    assert (loss.ce, loss.kd, loss.pkd) == (ce, kd, pkd)
    assert not math.isnan(loss.total.item())
