"""Quantized layers for the kernel tests, and the error measure they share."""

import torch

from hfcompress.quant.affine import quantize_rtn
from hfcompress.quant.linear import QuantLinear
from hfcompress.quant.scheme import QuantScheme


def quant_layer(n, k, *, bits=4, group_size=32, symmetric=False, float_zero=False, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    qw = quantize_rtn(w, bits=bits, group_size=group_size, symmetric=symmetric, float_zero=float_zero)
    b = torch.randn(n, generator=g) if bias else None
    scheme = QuantScheme.weight_only(
        num_bits=bits, group_size=group_size, in_features=k, symmetric=symmetric, float_zero=float_zero
    )
    return QuantLinear.from_quantized(qw, scheme, bias=b), qw


def rel_err(y, ref):
    return ((y - ref).norm() / ref.norm()).item()


def fast_and_bf16_errors(layer, x, dense):
    """Relative errors against float32 ``x @ dense^T``: the layer's, and that of bfloat16
    activations and output alone (the floor of the fast CPU ops)."""
    ref = x @ dense.t()
    bf16_rounding = (x.bfloat16().float() @ dense.t()).bfloat16().float()
    return rel_err(layer(x), ref), rel_err(bf16_rounding, ref)
