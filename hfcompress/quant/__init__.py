"""Quantization core: affine math, bit packing and the ``QuantLinear`` module."""

from hfcompress.quant.affine import QuantizedWeight, compute_qparams, dequantize, quantize, quantize_rtn
from hfcompress.quant.linear import QuantLinear
from hfcompress.quant.packing import pack, packed_columns, unpack

__all__ = [
    "QuantLinear",
    "QuantizedWeight",
    "compute_qparams",
    "dequantize",
    "pack",
    "packed_columns",
    "quantize",
    "quantize_rtn",
    "unpack",
]
