"""``QuantLinear``: a Linear layer that stores packed integer weights with scales and zeros."""

from __future__ import annotations

import torch
from torch import nn

from hfcompress.quant import dispatch
from hfcompress.quant.affine import QuantizedWeight, dequantize, num_groups, resolve_group_size
from hfcompress.quant.packing import pack, packed_columns, unpack

__all__ = ["SCALE_DTYPES", "QuantLinear"]

SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class QuantLinear(nn.Module):
    """A Linear layer with ``bits``-bit weights, quantized per channel or per group along K.

    Buffers (all saved in the state dict, under the names a checkpoint uses):
        qweight: ``[N, packed_columns(K, bits)]`` uint8, codes packed along K.
        scales: ``[N, G]`` float scales.
        zeros: ``[N, G]`` zero points, uint8 integers or floats in ``scale_dtype`` (asymmetric
            only; symmetric layers use the constant ``2**(bits-1)``).
    ``bias`` stays a float parameter. ``forward`` dispatches to a kernel (see
    :mod:`hfcompress.quant.dispatch`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int,
        group_size: int,
        symmetric: bool,
        bias: bool = False,
        scale_dtype: torch.dtype = torch.float16,
        zero_dtype: torch.dtype = torch.uint8,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = resolve_group_size(group_size, in_features)
        self.symmetric = symmetric
        groups = num_groups(in_features, self.group_size)
        cols = packed_columns(in_features, bits)
        self.register_buffer("qweight", torch.zeros(out_features, cols, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=scale_dtype, device=device))
        if not symmetric:
            self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=zero_dtype, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._kernel_cache: dict[str, object] = {}  # repacked weights per kernel path
        self._path_cache: dict[tuple, str] = {}  # (device type, dtype, forced) -> path

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, *, symmetric: bool, bias: torch.Tensor | None = None) -> QuantLinear:
        """Build a layer from the result of a quantization algorithm (RTN, GPTQ, ...)."""
        n, k = qw.q.shape
        layer = cls(
            k,
            n,
            bits=qw.bits,
            group_size=qw.group_size,
            symmetric=symmetric,
            bias=bias is not None,
            scale_dtype=qw.scales.dtype,
            zero_dtype=qw.zeros.dtype,
            dtype=bias.dtype if bias is not None else None,
            device=qw.q.device,
        )
        layer.qweight.copy_(pack(qw.q, qw.bits))
        layer.scales.copy_(qw.scales)
        if not symmetric:
            layer.zeros.copy_(qw.zeros)
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer

    def spec(self) -> dict:
        """The layer's layout as plain data (what checkpoints record to rebuild it)."""
        float_zero = not self.symmetric and self.zeros.is_floating_point()
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "zero_point": "float" if float_zero else "integer",
            "scale_dtype": next(k for k, v in SCALE_DTYPES.items() if v == self.scales.dtype),
            "in_features": self.in_features,
            "out_features": self.out_features,
        }

    @classmethod
    def from_spec(
        cls,
        spec: dict,
        *,
        bias: bool,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> QuantLinear:
        """An empty layer (zero codes, unit scales) with the layout :meth:`spec` describes."""
        scale_dtype = SCALE_DTYPES[spec["scale_dtype"]]
        return cls(
            spec["in_features"],
            spec["out_features"],
            bits=spec["bits"],
            group_size=spec["group_size"],
            symmetric=spec["symmetric"],
            bias=bias,
            scale_dtype=scale_dtype,
            zero_dtype=scale_dtype if spec["zero_point"] == "float" else torch.uint8,
            dtype=dtype,
            device=device,
        )

    def zero_points(self) -> torch.Tensor:
        """``[N, G]`` zero points, the constant ``2**(bits-1)`` (uint8) for symmetric layers."""
        if self.symmetric:
            return torch.full_like(self.scales, 2 ** (self.bits - 1), dtype=torch.uint8)
        return self.zeros

    def codes(self) -> torch.Tensor:
        """The unpacked ``[N, K]`` uint8 codes."""
        return unpack(self.qweight, self.bits, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``[N, K]`` weight this layer computes with."""
        return dequantize(self.codes(), self.scales, self.zero_points(), self.group_size, dtype=dtype)

    def _apply(self, fn, recurse: bool = True):
        # Moving or casting the layer replaces its buffers: drop kernel state built from them.
        self._kernel_cache.clear()
        self._path_cache.clear()
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch.quant_linear_forward(self, x)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, symmetric={self.symmetric}, bias={self.bias is not None}"
        )

    def storage_bytes(self) -> int:
        """Bytes of the packed weight, scales and zeros (bias excluded)."""
        total = self.qweight.numel() * self.qweight.element_size()
        total += self.scales.numel() * self.scales.element_size()
        if not self.symmetric:
            total += self.zeros.numel() * self.zeros.element_size()
        return total
