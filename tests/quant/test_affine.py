import pytest
import torch

from hfcompress.quant.affine import compute_qparams, dequantize, num_groups, quantize, quantize_rtn


@pytest.mark.parametrize("bits", [2, 3, 4, 8], ids=lambda b: f"w{b}")
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_codes_in_range_and_requantize_is_exact(bits, symmetric):
    w = torch.randn(6, 40, generator=torch.Generator().manual_seed(0))
    qw = quantize_rtn(w, bits=bits, group_size=16, symmetric=symmetric)
    assert qw.q.dtype == torch.uint8 and int(qw.q.max()) <= 2**bits - 1
    # Quantizing the dequantized weight again gives the same codes: the grid is a fixed point.
    again = quantize(qw.dequantize(), qw.scales, qw.zeros, bits=bits, group_size=16)
    assert torch.equal(again, qw.q)


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_rtn_error_is_at_most_half_a_step(symmetric):
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    qw = quantize_rtn(w, bits=4, group_size=32, symmetric=symmetric, scale_dtype=torch.float32)
    step = qw.scales.repeat_interleave(32, dim=1)
    # Symmetric ranges put +absmax half a step past the top code: the error bound still holds.
    assert ((w - qw.dequantize()).abs() <= step / 2 + 1e-6).all()


def test_partial_last_group_uses_only_its_own_columns():
    w = torch.randn(3, 576, generator=torch.Generator().manual_seed(2))
    scales, zeros = compute_qparams(w, bits=4, group_size=128, symmetric=False, scale_dtype=torch.float32)
    assert scales.shape == (3, 5) == (3, num_groups(576, 128))
    tail_scales, tail_zeros = compute_qparams(
        w[:, 512:], bits=4, group_size=64, symmetric=False, scale_dtype=torch.float32
    )
    assert torch.equal(scales[:, 4:], tail_scales) and torch.equal(zeros[:, 4:], tail_zeros)


def test_per_channel_is_one_group():
    w = torch.randn(5, 70)
    qw = quantize_rtn(w, bits=8, group_size=-1, symmetric=True)
    assert qw.scales.shape == (5, 1) and qw.group_size == 70


def test_symmetric_zero_point_is_fixed():
    qw = quantize_rtn(torch.randn(4, 32), bits=4, group_size=32, symmetric=True)
    assert (qw.zeros == 8).all()


def test_integer_zero_point_represents_zero_exactly():
    w = torch.randn(4, 32) + 3.0  # all positive: the range is widened to include 0
    w[0, 5] = 0.0
    qw = quantize_rtn(w, bits=4, group_size=32, symmetric=False)
    assert qw.dequantize()[0, 5] == 0.0


def test_float_zero_point_recovers_an_offset_grid_exactly():
    # A GGUF Q4_1-style weight: w = d * q + m with a float offset m per group of 32.
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (4, 64), generator=g).float()
    codes[:, 0], codes[:, 1], codes[:, 32], codes[:, 33] = 0, 15, 0, 15  # each group spans the grid
    d = torch.tensor([0.5, 0.25, 0.125, 1.0]).repeat_interleave(2).reshape(4, 2)
    m = torch.tensor([-3.3, 1.7, 0.2, -0.05, 2.5, -1.1, 0.6, 4.0]).reshape(4, 2)
    w = codes * d.repeat_interleave(32, 1) + m.repeat_interleave(32, 1)
    float_zero = quantize_rtn(w, bits=4, group_size=32, symmetric=False, scale_dtype=torch.float32, float_zero=True)
    integer = quantize_rtn(w, bits=4, group_size=32, symmetric=False, scale_dtype=torch.float32)
    assert torch.allclose(float_zero.dequantize(), w, atol=1e-5)
    assert (integer.dequantize() - w).abs().max() > 1e-2


def test_constant_group_is_exact():
    w = torch.zeros(2, 16)
    qw = quantize_rtn(w, bits=4, group_size=16, symmetric=False)
    assert torch.equal(qw.dequantize(), w)


def test_scales_are_rounded_before_codes():
    w = torch.randn(4, 32)
    qw = quantize_rtn(w, bits=4, group_size=32, symmetric=False, scale_dtype=torch.float16)
    assert qw.scales.dtype == torch.float16
    expected = (qw.q.float() - qw.zeros.float().repeat_interleave(32, 1)) * qw.scales.float().repeat_interleave(32, 1)
    assert torch.equal(dequantize(qw.q, qw.scales, qw.zeros, 32), expected)
