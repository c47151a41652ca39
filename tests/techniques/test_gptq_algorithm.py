"""GPTQ's pure functions on tiny tensors."""

import pytest
import torch

from hfcompress.quant.affine import compute_qparams, dequantize, quantize, quantize_rtn
from hfcompress.quant.linear import QuantLinear
from hfcompress.quant.scheme import QuantScheme
from hfcompress.techniques.gptq.algorithm import HessianAccumulator, quantize_weight, search_qparams


def _correlated_inputs(k: int, n: int = 512, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    scales = torch.logspace(-1, 1, k)[torch.randperm(k, generator=g)]
    return (torch.randn(n, k, generator=g) @ mix) * scales  # [n, K], correlated and uneven


def _hessian(x: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator(x.shape[1])
    acc.add(x[: len(x) // 2])
    acc.add(x[len(x) // 2 :])
    return acc.hessian()


def test_hessian_accumulator_is_two_x_xt_over_n():
    x = torch.randn(10, 3, 6)
    acc = HessianAccumulator(6)
    acc.add(x)
    flat = x.reshape(-1, 6)
    torch.testing.assert_close(acc.hessian(), 2 * flat.t() @ flat / 30)


GRIDS = [
    dict(bits=4, group_size=16, symmetric=False),
    dict(bits=4, group_size=16, symmetric=True),
    dict(bits=3, group_size=-1, symmetric=False),
    dict(bits=4, group_size=24, symmetric=False),  # K = 40: a partial last group of 16
    dict(bits=4, group_size=16, symmetric=False, float_zero=True),
]


@pytest.mark.parametrize("grid", GRIDS, ids=["w4g16", "w4g16sym", "w3pc", "w4g24-partial", "w4g16-float-zero"])
def test_identity_hessian_gives_rtn(grid):
    # With H = I no column's error can be compensated: GPTQ must reduce to round-to-nearest.
    w = torch.randn(12, 40, generator=torch.Generator().manual_seed(1))
    result = quantize_weight(w, torch.eye(40), scale_dtype=torch.float32, **grid)
    rtn = quantize_rtn(w, scale_dtype=torch.float32, **grid)
    assert torch.equal(result.weight.q, rtn.q)
    assert torch.equal(result.weight.scales, rtn.scales) and torch.equal(result.weight.zeros, rtn.zeros)


@pytest.mark.parametrize("act_order", [False, True], ids=["natural", "act-order"])
@pytest.mark.parametrize(
    "bits,group_size,bound",
    # 2-bit groups re-fit to already-updated columns gain least in natural order (0.90 measured).
    [(4, 16, 0.8), (3, -1, 0.8), (2, 16, 1.0)],
    ids=["w4g16", "w3pc", "w2g16"],
)
def test_lower_output_error_than_rtn_on_correlated_inputs(bits, group_size, bound, act_order):
    x = _correlated_inputs(48)
    w = torch.randn(32, 48, generator=torch.Generator().manual_seed(2))
    h = _hessian(x)
    gptq = quantize_weight(w, h, bits=bits, group_size=group_size, symmetric=False, act_order=act_order, block_size=16)
    rtn = quantize_rtn(w, bits=bits, group_size=group_size, symmetric=False)

    def err(qw):
        return (x @ (w - qw.dequantize()).t()).pow(2).mean().item()

    assert err(gptq.weight) < bound * err(rtn)


def test_act_order_keeps_static_groups_and_the_packed_layout():
    x = _correlated_inputs(64, seed=3)
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    result = quantize_weight(w, _hessian(x), bits=4, group_size=16, symmetric=False, act_order=True)
    # Static groups: the parameters are those of the original weight, group by group.
    scales, zeros = compute_qparams(w, bits=4, group_size=16, symmetric=False)
    assert torch.equal(result.weight.scales, scales) and torch.equal(result.weight.zeros, zeros)
    # Codes are in natural column order: packing and unpacking gives the same weight and output.
    scheme = QuantScheme.weight_only(num_bits=4, group_size=16, in_features=64, symmetric=False, actorder=True)
    layer = QuantLinear.from_quantized(result.weight, scheme)
    assert torch.equal(layer.dequantize(), result.weight.dequantize())
    torch.testing.assert_close(torch.nn.functional.linear(x, layer.dequantize()), x @ result.weight.dequantize().t())


def test_indefinite_hessian_escalates_damping():
    x = _correlated_inputs(32, n=8)  # 8 samples for K = 32: H is singular
    h = _hessian(x) - 0.005 * torch.eye(32) * _hessian(x).diag().mean()  # and slightly indefinite
    w = torch.randn(8, 32)
    result = quantize_weight(w, h, bits=4, group_size=16, symmetric=False, damp=0.001)
    assert result.damp >= 0.01
    assert torch.isfinite(result.weight.dequantize()).all()


def test_dead_inputs_zero_their_weights():
    x = _correlated_inputs(16)
    x[:, 3] = 0
    result = quantize_weight(torch.randn(4, 16), _hessian(x), bits=4, group_size=-1, symmetric=False)
    assert torch.isfinite(result.weight.dequantize()).all()
    assert (result.weight.dequantize()[:, 3] == 0).all()


def test_clip_search_never_loses_to_min_max_on_its_metric():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(4))
    w[:, 5] *= 8  # an outlier per row makes min-max ranges wasteful
    searched = search_qparams(w, bits=3, group_size=32, symmetric=False, scale_dtype=torch.float32, float_zero=False)
    plain = compute_qparams(w, bits=3, group_size=32, symmetric=False, scale_dtype=torch.float32)

    def err(params):
        codes = quantize(w, *params, bits=3, group_size=32)
        return (dequantize(codes, *params, 32) - w).abs().pow(2.4).sum().item()

    assert err(searched) <= err(plain)
    assert not torch.equal(searched[0], plain[0])


@pytest.mark.parametrize(
    ("group_size", "symmetric", "float_zero"),
    [(32, False, False), (48, False, True), (-1, True, False)],
    ids=["g32", "g48-partial-float-zero", "channel-symmetric"],
)
def test_clip_search_picks_the_shrunk_min_max_grid_with_the_least_error(group_size, symmetric, float_zero):
    # The search reads each group's range once and shrinks it: the same parameters, bit for
    # bit, as computing min-max on the shrunk weight at every step of the grid.
    w = torch.randn(12, 100, generator=torch.Generator().manual_seed(5)) * torch.rand(12, 1) * 3
    options = dict(bits=4, group_size=group_size, symmetric=symmetric, scale_dtype=torch.float16, float_zero=float_zero)
    size = 100 if group_size == -1 else group_size
    candidates = [compute_qparams(w * (1.0 - 0.2 * step / 20), **options) for step in range(21)]
    errors = []
    for scales, zeros in candidates:
        codes = quantize(w, scales, zeros, bits=4, group_size=size)
        e = (dequantize(codes, scales, zeros, size) - w).abs().pow(2.4)
        errors.append(torch.nn.functional.pad(e, (0, -100 % size)).reshape(12, -1, size).sum(-1))
    best = torch.stack(errors).argmin(0)  # the first of equal errors, as the search keeps it
    rows, groups = torch.meshgrid(torch.arange(12), torch.arange(best.shape[1]), indexing="ij")
    want_s = torch.stack([c[0] for c in candidates])[best, rows, groups]
    want_z = torch.stack([c[1] for c in candidates])[best, rows, groups]
    got_s, got_z = search_qparams(w, **options)
    assert torch.equal(got_s, want_s) and torch.equal(got_z, want_z)
