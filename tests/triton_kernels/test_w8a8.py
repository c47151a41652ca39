"""The Triton W8A8 kernels against their torch twins (TRITON_INTERPRET=1 on CPU, see conftest)."""

import pytest
import torch

triton = pytest.importorskip("triton")
from hfcompress_triton import w8a8, w8a8_ref  # noqa: E402

# M = 1 (decode), 13 and 67 (not multiples of any tile); K = 100 and 200 are not multiples of
# the 64-wide K tile, K = 576 is SmolLM2's hidden size.
MS = [1, 13, 67]
KS = [100, 200, 576]


def _x(m, k, device, dtype=torch.float32, seed=0):
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed))
    x[:, 3] *= 20  # an outlier channel, as LLM activations have
    return x.to(device=device, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("k", KS, ids=lambda k: f"K{k}")
@pytest.mark.parametrize("m", MS, ids=lambda m: f"M{m}")
def test_per_token_quant_matches_reference(m, k, dtype, device):
    x = _x(m, k, device, dtype)
    q, s = w8a8.per_token_quant(x)
    q_ref, s_ref = w8a8_ref.per_token_quant_ref(x)
    assert q.dtype == torch.int8 and s.shape == (m, 1)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
    assert torch.equal(q, q_ref)


def test_per_token_quant_with_a_static_scale(device):
    x = _x(13, 100, device)
    scale = torch.tensor([0.05], device=device)
    q, s = w8a8.per_token_quant(x, scale)
    q_ref, s_ref = w8a8_ref.per_token_quant_ref(x, scale)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref) and torch.equal(s, scale.expand(13, 1))
    assert int(q.max()) == 127 and int(q.min()) == -128  # the outlier channel clips


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_per_token_quant_gives_a_row_with_nan_or_inf_the_scale_nan(static, device):
    # An int8 code cannot hold a NaN or an infinity: the row's scale carries it, so the GEMM's
    # output row is NaN (it was a finite number), and the other rows keep their scales.
    x = _x(5, 100, device)
    x[1, 7], x[3, 99] = float("nan"), float("-inf")
    scale = torch.tensor([0.05], device=device) if static else None
    q, s = w8a8.per_token_quant(x, scale)
    q_ref, s_ref = w8a8_ref.per_token_quant_ref(x, scale)
    assert s[[1, 3]].isnan().all() and s[[0, 2, 4]].isfinite().all()
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(q[[0, 2, 4]], q_ref[[0, 2, 4]])
    w_q = torch.randint(-127, 128, (6, 100), dtype=torch.int8, device=device)
    y = w8a8.int8_gemm(q, w_q, s, torch.ones(6, device=device), None, torch.float32)
    assert y[[1, 3]].isnan().all() and y[[0, 2, 4]].isfinite().all()


@pytest.mark.parametrize("k", KS, ids=lambda k: f"K{k}")
@pytest.mark.parametrize("m", MS, ids=lambda m: f"M{m}")
def test_int8_gemm_accumulates_exactly_in_int32(m, k, device):
    g = torch.Generator().manual_seed(k)
    x_q = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8).to(device)
    w_q = torch.randint(-128, 128, (48, k), generator=g, dtype=torch.int8).to(device)
    ones = torch.ones(48, device=device)
    y = w8a8.int8_gemm(x_q, w_q, torch.ones(m, 1, device=device), ones, out_dtype=torch.float32)
    # |sum| <= 128 * 128 * 576 < 2**24: every int32 result is exact in float32, so equality
    # checks the integer accumulation itself.
    assert torch.equal(y, w8a8_ref.int8_matmul_int32_ref(x_q, w_q).float())


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("per_token", [True, False], ids=["per-token", "per-tensor"])
@pytest.mark.parametrize("m", MS, ids=lambda m: f"M{m}")
def test_int8_gemm_epilogue_matches_reference(m, per_token, out_dtype, device):
    k, n = 200, 72
    x_q, x_scale = w8a8_ref.per_token_quant_ref(_x(m, k, device))
    if not per_token:
        x_scale = x_scale.amax().reshape(1)
    g = torch.Generator().manual_seed(1)
    w_q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).to(device)
    w_scale = (torch.rand(n, generator=g) / 100).to(device)
    bias = torch.randn(n, generator=g).to(device)
    y = w8a8.int8_gemm(x_q, w_q, x_scale, w_scale, bias, out_dtype)
    ref = w8a8_ref.int8_gemm_ref(x_q, w_q, x_scale, w_scale, bias, out_dtype)
    assert y.dtype == out_dtype and y.shape == (m, n)
    # Same exact integers, same float32 epilogue; only the final rounding to out_dtype and
    # the order of two float32 products may differ by one unit.
    tol = {torch.float32: 1e-6, torch.float16: 1e-3}[out_dtype]
    torch.testing.assert_close(y, ref, rtol=tol, atol=tol)


def test_launchers_name_bad_shapes(device):
    x_q = torch.zeros(4, 64, dtype=torch.int8, device=device)
    with pytest.raises(ValueError, match=r"x_q \(4, 64\) and w_q \(8, 32\)"):
        w8a8.int8_gemm(x_q, torch.zeros(8, 32, dtype=torch.int8, device=device), torch.ones(4, 1), torch.ones(8))
    with pytest.raises(ValueError, match="must be int8"):
        w8a8.int8_gemm(x_q.float(), x_q, torch.ones(4, 1), torch.ones(4))
    with pytest.raises(ValueError, match=r"w_scale \(3,\) must be \[N\] = \[8\]"):
        w8a8.int8_gemm(x_q, torch.zeros(8, 64, dtype=torch.int8, device=device), torch.ones(4, 1), torch.ones(3))
    with pytest.raises(ValueError, match="contiguous rows"):
        w8a8.per_token_quant(torch.zeros(64, 4, device=device).t())


@pytest.mark.parametrize("bits", [8, 4], ids=["W8A8", "W4A8"])
@pytest.mark.parametrize("strategy,dynamic", [("token", True), ("tensor", True), ("tensor", False)])
def test_bridge_matches_the_reference_kernel(bits, strategy, dynamic, device):
    """``triton_w8a8`` (what a CUDA ``QuantLinear`` runs) against the reference kernel."""
    from hfcompress.quant import dispatch, triton_bridge
    from hfcompress.quant.affine import quantize_rtn
    from hfcompress.quant.linear import QuantLinear
    from hfcompress.quant.scheme import QuantArgs, QuantScheme

    w = torch.randn(48, 200, generator=torch.Generator().manual_seed(2))
    qw = quantize_rtn(w, bits=bits, group_size=-1, symmetric=True)
    weights = QuantScheme.weight_only(num_bits=bits, group_size=-1, in_features=200, symmetric=True).weights
    layer = QuantLinear.from_quantized(qw, QuantScheme(weights=weights), bias=torch.randn(48)).to(device)
    act = QuantArgs(num_bits=8, symmetric=True, strategy=strategy, dynamic=dynamic, zp_dtype=None)
    layer.set_input_activations(act, None if dynamic else torch.tensor([0.08]))
    x = _x(13, 200, device)
    y = triton_bridge.w8a8_linear(layer, x)
    ref = dispatch.reference_forward(layer, x)
    # The reference dequantizes and multiplies in float32; the kernel multiplies the exact
    # integers and scales once: they differ by float32 round-off of a 200-term sum.
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
