"""GPTQ's column loop: the C loop against its torch twin, alone and inside quantize_weight."""

from __future__ import annotations

import pytest
import torch

import hfcompress.techniques.gptq.columns as columns
from hfcompress.techniques.gptq.algorithm import cholesky_inverse_upper, quantize_weight

needs_c = pytest.mark.skipif(columns._native_library() is None, reason="no C compiler: GPTQ runs its torch loop")


def _block(n: int, width: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W1 = torch.randn(n, width, generator=g)
    x = torch.randn(4 * width, width, generator=g)
    Hinv1, _ = cholesky_inverse_upper(x.t() @ x / x.shape[0], 0.01)
    return W1, Hinv1


def _run(fn, W1, Hinv1, c0, c1, s, z, k):
    W1, n = W1.clone(), W1.shape[0]
    Q = torch.zeros(n, k, dtype=torch.uint8)
    unrounded = torch.zeros(n, k)
    Err1 = torch.zeros_like(W1)
    fn(W1, Hinv1, c0, c1, s, z, 15, Q, unrounded, 3, Err1)
    return W1, Q, unrounded, Err1


@needs_c
@pytest.mark.parametrize(
    ("n", "width", "c0", "c1", "shared"),
    [(1, 128, 0, 128, True), (13, 37, 5, 37, False), (67, 128, 64, 100, True), (16, 1, 0, 1, False)],
    ids=["m1-shared", "m13-odd-width", "m67-mid-block", "one-column"],
)
def test_c_loop_equals_the_torch_loop_bit_for_bit(n, width, c0, c1, shared):
    # The same float32 operations in the same order (no fused multiply-add in the C build), so
    # every output is equal, not close.
    W1, Hinv1 = _block(n, width)
    g = torch.Generator().manual_seed(1)
    if shared:  # one group's parameters for the whole run: a column stride of 0
        s = (torch.rand(n, 1, generator=g) * 0.2 + 0.05).expand(n, c1 - c0)
        z = torch.randint(0, 16, (n, 1), generator=g).float().expand(n, c1 - c0)
    else:  # act-order's static groups: one column of parameters per column
        s = torch.rand(n, c1 - c0, generator=g) * 0.2 + 0.05
        z = torch.randint(0, 16, (n, c1 - c0), generator=g).float()
    k = 3 + c1 - c0 + 2
    ours = _run(columns.quantize_columns, W1, Hinv1, c0, c1, s, z, k)
    reference = _run(columns.quantize_columns_ref, W1, Hinv1, c0, c1, s, z, k)
    # The quantized columns' own values after their update are read by nothing, and torch's
    # addr_ on a one-column slice rounds them its own way (a fused multiply-add).
    torch.testing.assert_close(ours[0][:, c0:c1], reference[0][:, c0:c1], rtol=0, atol=1e-6)
    assert torch.equal(ours[0][:, c1:], reference[0][:, c1:])
    for got, want in zip(ours[1:], reference[1:], strict=True):
        assert torch.equal(got, want)
    assert ours[1][:, 3 : 3 + c1 - c0].max() == 15 and ours[1][:, 3 : 3 + c1 - c0].min() == 0  # clamped both ways
    assert torch.equal(ours[0][:, :c0], W1[:, :c0])  # columns before the run are left alone


@needs_c
@pytest.mark.parametrize(
    "options",
    [
        dict(bits=4, group_size=64, symmetric=False),
        dict(bits=4, group_size=256, symmetric=False),  # a group reaches past the 128-column block
        dict(bits=3, group_size=64, symmetric=True, act_order=True, clip_search=True),
        dict(bits=4, group_size=-1, symmetric=False),
        dict(bits=8, group_size=32, symmetric=True, clip_search=True),
    ],
    ids=["w4-g64", "w4-g256", "w3-g64-act-order-clip", "w4-channel", "w8-g32-clip"],
)
def test_quantize_weight_is_the_same_with_the_c_loop_and_the_torch_loop(options, monkeypatch):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(67, 300, generator=g)
    x = torch.randn(1200, 300, generator=g) * torch.rand(300, generator=g) * 3
    h = x.t() @ x / x.shape[0]
    ours = quantize_weight(w, h, **options)
    monkeypatch.setattr(columns, "_native_library", lambda: None)
    reference = quantize_weight(w, h, **options)
    for name in ("q", "scales", "zeros"):
        assert torch.equal(getattr(ours.weight, name), getattr(reference.weight, name))
    assert torch.equal(ours.unrounded, reference.unrounded) and ours.loss == reference.loss


def test_tensors_the_c_loop_does_not_take_run_the_torch_loop(monkeypatch):
    calls = []
    monkeypatch.setattr(columns, "quantize_columns_ref", lambda *args: calls.append(args))
    W1, Hinv1 = _block(8, 16)
    s = z = torch.ones(8, 16, dtype=torch.float64)
    columns.quantize_columns(
        W1.double(), Hinv1.double(), 0, 16, s, z, 15, torch.zeros(8, 16, dtype=torch.uint8),
        torch.zeros(8, 16, dtype=torch.float64), 0, torch.zeros(8, 16, dtype=torch.float64),
    )  # fmt: skip
    assert len(calls) == 1


def test_scales_of_another_shape_are_refused():
    W1, Hinv1 = _block(8, 16)
    with pytest.raises(ValueError, match=r"columns 0\.\.16 of a \[8, 16\] block with scales \(8, 15\)"):
        _run(columns.quantize_columns, W1, Hinv1, 0, 16, torch.ones(8, 15), torch.ones(8, 15), 16)
