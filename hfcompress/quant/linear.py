"""``QuantLinear``: the ``quant_linear`` module kind, a Linear layer with packed integer weights."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hfcompress.errors import CheckpointError
from hfcompress.kinds import CompressedModule, register_module_kind
from hfcompress.quant import compiled, dispatch
from hfcompress.quant.affine import QuantizedWeight, dequantize, num_groups
from hfcompress.quant.packing import SUPPORTED_BITS, pack, packed_columns, unpack
from hfcompress.quant.scheme import QuantArgs, QuantScheme

__all__ = ["SCALE_DTYPES", "PackedWeight", "QuantLinear", "input_scale_size", "quantized_bytes"]

SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_SAFETENSORS_DTYPES = {torch.uint8: "U8", torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}
# Tensors whose dtype is part of the layout: `model.to(dtype)` moves them but never casts them.
_LAYOUT_BUFFERS = ("qweight", "scales", "zeros", "input_scale")
# Layer keys of checkpoint format 1 (before schemes); read by `spec_from_v1`.
_V1_KEYS = ("bits", "group_size", "symmetric", "zero_point", "scale_dtype", "in_features", "out_features")


def input_scale_size(act: QuantArgs, in_features: int) -> int:
    """Values in the stored static input scale: 1 per tensor, ``in_features`` per channel."""
    return in_features if act.strategy == "channel" else 1


class PackedWeight(CompressedModule):
    """Packed integer weights ``W: [N, K]``, quantized per channel or per group along K; the
    storage that :class:`QuantLinear` computes with and :class:`~hfcompress.quant.embedding.
    QuantEmbedding` looks rows up in.

    Buffers (saved in the state dict under these names):
        qweight: ``[N, packed_columns(K, bits)]`` uint8, codes packed along K.
        scales: ``[N, G]`` float scales.
        zeros: ``[N, G]`` zero points, uint8 or floats in the scales' dtype (asymmetric
            only; symmetric layers use the constant ``2**(bits-1)``).
    Rows are independent: row ``n`` of each buffer holds row ``n`` of ``W``.
    """

    marker_tensors = ("qweight",)

    def _init_packed(
        self, in_features: int, out_features: int, scheme: QuantScheme, device: torch.device | str | None
    ) -> None:
        w = scheme.weights
        if w.num_bits not in SUPPORTED_BITS:
            raise ValueError(f"num_bits={w.num_bits} cannot be packed; supported: {SUPPORTED_BITS}")
        self.in_features = in_features
        self.out_features = out_features
        self.scheme = scheme
        self.bits = w.num_bits
        self.group_size = w.group_size if w.strategy == "group" else in_features
        self.symmetric = w.symmetric
        self.stage: str | None = None  # the recipe stage that made this module, recorded in its spec
        scale_dtype = SCALE_DTYPES[w.scale_dtype]
        groups = num_groups(in_features, self.group_size)
        cols = packed_columns(in_features, self.bits)
        self.register_buffer("qweight", torch.zeros(out_features, cols, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=scale_dtype, device=device))
        if not self.symmetric:
            zero_dtype = scale_dtype if w.float_zero else torch.uint8
            self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=zero_dtype, device=device))

    def _fill(self, qw: QuantizedWeight) -> None:
        """Store the codes, scales and zero points of ``qw`` (of this module's grid)."""
        if self.group_size != qw.group_size or self.scales.dtype != qw.scales.dtype:
            raise ValueError(
                f"quantized weight (group {qw.group_size}, {qw.scales.dtype}) does not match the scheme "
                f"(group {self.group_size}, {self.scales.dtype})"
            )
        self.qweight.copy_(pack(qw.q, qw.bits))
        self.scales.copy_(qw.scales)
        if not self.symmetric:
            self.zeros.copy_(qw.zeros)

    @staticmethod
    def packed_tensors(name: str, scheme: QuantScheme, n: int, k: int) -> dict[str, tuple[str, tuple[int, ...]]]:
        """The packed weight's tensors a checkpoint holds, by full key: (safetensors dtype, shape)."""
        w = scheme.weights
        groups = num_groups(k, w.group_size if w.strategy == "group" else k)
        scale = _SAFETENSORS_DTYPES[SCALE_DTYPES[w.scale_dtype]]
        out = {
            f"{name}.qweight": ("U8", (n, packed_columns(k, w.num_bits))),
            f"{name}.scales": (scale, (n, groups)),
        }
        if not w.symmetric:
            out[f"{name}.zeros"] = (scale if w.float_zero else "U8", (n, groups))
        return out

    def check_loaded(self, name: str) -> None:
        if self.qweight.is_meta:
            raise CheckpointError(f"tensor {name}.qweight was not loaded")
        scales = self.scales.float()
        if not torch.isfinite(scales).all() or not (scales > 0).all():
            raise CheckpointError(
                f"tensor {name}.scales holds NaN, infinite or non-positive values; the checkpoint is corrupt"
            )
        if not self.symmetric:
            if self.zeros.is_floating_point():
                if not torch.isfinite(self.zeros.float()).all():
                    raise CheckpointError(
                        f"tensor {name}.zeros holds NaN or infinite values; the checkpoint is corrupt"
                    )
            elif int(self.zeros.max()) > 2**self.bits - 1:
                raise CheckpointError(
                    f"tensor {name}.zeros exceeds {2**self.bits - 1}, the largest {self.bits}-bit code"
                )
        if hasattr(self, "input_scale"):
            s = self.input_scale
            if not torch.isfinite(s).all() or not (s > 0).all():
                raise CheckpointError(f"tensor {name}.input_scale is not a finite positive scale")

    # -- what kernels and lookups read -------------------------------------------------------------

    def zero_points(self) -> torch.Tensor:
        """``[N, G]`` zero points, the constant ``2**(bits-1)`` (uint8) for symmetric layers."""
        if self.symmetric:
            return torch.full_like(self.scales, 2 ** (self.bits - 1), dtype=torch.uint8)
        return self.zeros

    def codes(self) -> torch.Tensor:
        """The unpacked ``[N, K]`` uint8 codes."""
        return unpack(self.qweight, self.bits, self.in_features)

    def signed_codes(self) -> torch.Tensor:
        """The ``[N, K]`` codes minus ``2**(bits-1)`` as int8 (what int8 matmuls multiply;
        4- and 8-bit codes fit)."""
        return (self.codes().to(torch.int16) - 2 ** (self.bits - 1)).to(torch.int8)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``[N, K]`` weight this layer computes with."""
        return dequantize(self.codes(), self.scales, self.zero_points(), self.group_size, dtype=dtype)

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.dequantize(dtype)

    def _drop_derived(self) -> None:
        """Forget state built from the buffers (a kernel's repacked weights); called when they move."""

    def _apply(self, fn, recurse: bool = True):
        # Moving or casting the layer replaces its buffers: drop state built from them.
        self._drop_derived()
        # The layout tensors follow a move but never a cast: their dtypes are the format (as
        # bitsandbytes and torchao keep theirs). `fn` is tried on an empty probe first, so a
        # cast is never applied to them, even transiently.
        layout = {n: self._buffers[n] for n in _LAYOUT_BUFFERS if self._buffers.get(n) is not None}
        for n in layout:
            self._buffers[n] = None
        try:
            result = super()._apply(fn, recurse)
        finally:
            for n, tensor in layout.items():
                probe = fn(torch.empty(0, dtype=tensor.dtype, device=tensor.device))
                self._buffers[n] = fn(tensor) if probe.dtype == tensor.dtype else tensor.to(device=probe.device)
        return result

    def rows(self, index: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows ``W[index]`` in ``dtype``: ``[*index.shape, K]``, dequantizing only those rows."""
        flat = index.reshape(-1)
        scales = self.scales[flat]
        if self.symmetric:
            zeros = torch.full_like(scales, 2 ** (self.bits - 1), dtype=torch.uint8)
        else:
            zeros = self.zeros[flat]
        codes = unpack(self.qweight[flat], self.bits, self.in_features)
        out = dequantize(codes, scales, zeros, self.group_size, dtype=dtype)
        return out.reshape(*index.shape, self.in_features)

    def storage_bytes(self) -> int:
        """Bytes of the packed weight, scales and zeros (bias excluded)."""
        total = self.qweight.numel() * self.qweight.element_size()
        total += self.scales.numel() * self.scales.element_size()
        if not self.symmetric:
            total += self.zeros.numel() * self.zeros.element_size()
        return total


@register_module_kind
class QuantLinear(PackedWeight):
    """A Linear layer with ``bits``-bit weights, quantized per channel or per group along K,
    and optionally 8-bit input activations; its :class:`QuantScheme` says which.

    Buffers (saved in the state dict under these names):
        qweight: ``[N, packed_columns(K, bits)]`` uint8, codes packed along K.
        scales: ``[N, G]`` float scales.
        zeros: ``[N, G]`` zero points, uint8 or floats in the scales' dtype (asymmetric
            only; symmetric layers use the constant ``2**(bits-1)``).
        input_scale: float32 static input-activation scale (static schemes only): ``[1]`` per
            tensor, ``[K]`` per input channel.
    ``bias`` stays a float parameter. ``forward`` dispatches to a kernel (see
    :mod:`hfcompress.quant.dispatch`).

    Args:
        in_features: K.
        out_features: N.
        scheme: The layer's quantization scheme.
        bias: Whether the layer has a bias.
        dtype: Dtype of the bias.
        device: Where the buffers live.
    """

    kind = "quant_linear"
    marker_tensors = ("qweight",)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        scheme: QuantScheme,
        *,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self._init_packed(in_features, out_features, scheme, device)
        self._register_input_scale(device)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._kernel_cache: dict[str, object] = {}  # repacked weights per kernel
        self._path_cache: dict[tuple, object] = {}  # (device type, dtype, forced) -> kernel
        self._handle = compiled.register_layer(self)  # what the torch.compile op calls it by

    def _drop_derived(self) -> None:
        self._kernel_cache.clear()
        self._path_cache.clear()

    def __setstate__(self, state: dict) -> None:
        # A copy (copy.deepcopy, pickle) is a new layer: it gets its own handle for the op.
        super().__setstate__(state)
        self._handle = compiled.register_layer(self)

    def _register_input_scale(self, device: torch.device | str | None) -> None:
        act = self.scheme.input_activations
        if act is not None and not act.dynamic:
            size = input_scale_size(act, self.in_features)
            self.register_buffer("input_scale", torch.ones(size, dtype=torch.float32, device=device))
        elif "input_scale" in self._buffers:
            del self._buffers["input_scale"]

    # -- building ---------------------------------------------------------------------------

    def set_input_activations(self, act: QuantArgs | None, input_scale: torch.Tensor | None = None) -> None:
        """Quantize this layer's inputs by ``act`` from now on (None: keep them in float).

        Args:
            act: The input-activation args (8 bits, symmetric).
            input_scale: The calibrated scale of a static scheme: ``[1]`` per tensor, ``[K]``
                per channel (float32, positive). Required exactly when ``act`` is static.
        """
        scheme = QuantScheme(weights=self.scheme.weights, input_activations=act)  # validates act
        static = act is not None and not act.dynamic
        if static != (input_scale is not None):
            raise ValueError(
                "a static activation scheme needs its calibrated input_scale"
                if static
                else "input_scale is only stored for static activation schemes"
            )
        if static:
            size = input_scale_size(act, self.in_features)
            scale = input_scale.detach().float().reshape(-1)
            if scale.numel() != size:
                raise ValueError(f"input_scale has {scale.numel()} values; a {act.strategy} scale here has {size}")
            if not torch.isfinite(scale).all() or not (scale > 0).all():
                raise ValueError("input_scale must be finite and positive")
        self.scheme = scheme
        self._register_input_scale(self.scales.device)
        if static:
            self.input_scale.copy_(scale)
        self._kernel_cache.clear()
        self._path_cache.clear()

    @classmethod
    def from_quantized(
        cls, qw: QuantizedWeight, scheme: QuantScheme, *, bias: torch.Tensor | None = None
    ) -> QuantLinear:
        """Build a layer from the result of a quantization algorithm (RTN, GPTQ, ...)."""
        n, k = qw.q.shape
        if qw.bits != scheme.weights.num_bits:
            raise ValueError(f"codes of {qw.bits} bits do not fit a {scheme.name} scheme")
        layer = cls(
            k, n, scheme, bias=bias is not None, dtype=bias.dtype if bias is not None else None, device=qw.q.device
        )
        layer._fill(qw)
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer

    def spec(self) -> dict[str, Any]:
        return self.linear_spec(scheme=self.scheme.to_dict())

    @classmethod
    def from_spec(cls, spec: dict[str, Any], original: nn.Module) -> QuantLinear:
        k, n = cls.replaced_features(spec, original)
        weight = original.weight
        layer = cls(k, n, QuantScheme.from_dict(spec["scheme"]), bias=original.bias is not None, dtype=weight.dtype)
        layer.stage = spec.get("stage")
        return layer

    @classmethod
    def validate_spec(cls, name: str, spec: dict[str, Any]) -> None:
        missing = [k for k in ("in_features", "out_features", "scheme") if k not in spec]
        if missing:
            raise CheckpointError(f"quantization_config.layers[{name!r}] lacks {missing}")
        scheme = QuantScheme.from_dict(spec["scheme"])
        if scheme.weights.num_bits not in SUPPORTED_BITS:
            raise CheckpointError(f"quantization_config.layers[{name!r}] has num_bits={scheme.weights.num_bits}")

    @staticmethod
    def spec_from_v1(name: str, spec: dict[str, Any]) -> dict[str, Any]:
        """A layer entry of checkpoint format 1 (flat bits/group_size/... keys) as a format-2 spec."""
        missing = [k for k in _V1_KEYS if k not in spec] if isinstance(spec, dict) else list(_V1_KEYS)
        if missing:
            raise CheckpointError(f"quantization_config.layers[{name!r}] lacks {missing}")
        if spec["zero_point"] not in ("integer", "float") or spec["scale_dtype"] not in SCALE_DTYPES:
            raise CheckpointError(f"quantization_config.layers[{name!r}] is malformed: {spec}")
        try:
            scheme = QuantScheme.weight_only(
                num_bits=spec["bits"],
                group_size=spec["group_size"],
                in_features=spec["in_features"],
                symmetric=spec["symmetric"],
                float_zero=spec["zero_point"] == "float",
                scale_dtype=spec["scale_dtype"],
            )
        except ValueError as exc:
            raise CheckpointError(f"quantization_config.layers[{name!r}] is malformed: {exc}") from None
        return {
            "kind": QuantLinear.kind,
            "in_features": spec["in_features"],
            "out_features": spec["out_features"],
            "scheme": scheme.to_dict(),
        }

    @classmethod
    def expected_tensors(cls, name: str, spec: dict[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
        scheme = QuantScheme.from_dict(spec["scheme"])
        k = spec["in_features"]
        out = cls.packed_tensors(name, scheme, spec["out_features"], k)
        act = scheme.input_activations
        if act is not None and not act.dynamic:
            out[f"{name}.input_scale"] = ("F32", (input_scale_size(act, k),))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if compiled.uses_op(x):  # under torch.compile: one opaque op (see hfcompress.quant.compiled)
            return compiled.compiled_forward(self, x)
        return dispatch.quant_linear_forward(self, x)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.name}, "
            f"group_size={self.group_size}, symmetric={self.symmetric}, bias={self.bias is not None}"
        )


def quantized_bytes(
    out_features: int,
    in_features: int,
    *,
    bits: int,
    group_size: int,
    symmetric: bool,
    float_zero: bool,
    scale_dtype: str,
) -> int:
    """What :meth:`QuantLinear.storage_bytes` will be for a layer of these shapes and this
    grid, before it exists (a size budget plans with it)."""
    groups = num_groups(in_features, group_size)
    scale_bytes = SCALE_DTYPES[scale_dtype].itemsize
    zero_bytes = 0 if symmetric else (scale_bytes if float_zero else 1)
    return out_features * (packed_columns(in_features, bits) + groups * (scale_bytes + zero_bytes))
