"""The quantization scheme of one layer: what its weights and its input activations are.

One frozen object that the recipe builds, the layer stores, the checkpoint records, the kernel
dispatch reads and the exporters translate. Field names follow compressed-tensors'
``QuantizationArgs`` / ``QuantizationScheme`` where the meaning is the same (``num_bits``,
``type``, ``symmetric``, ``strategy``, ``group_size``, ``dynamic``, ``actorder``,
``observer``, ``scale_dtype``, ``zp_dtype``), so that an export is a renaming of nothing.
Where ours differs it says so:

* codes are unsigned, ``q in [0, 2**num_bits - 1]``, with the zero point stored as a uint8
  (``zp_dtype="uint8"``) or as a float in the scales' dtype (the GGUF Q4_1 / HQQ kind of
  zero point); compressed-tensors stores signed codes;
* ``group_size`` is always the resolved number of input columns per group for weights
  (``in_features`` for per channel); a partial last group is allowed.

A recipe's ``bits`` is a scheme's ``num_bits``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from hfcompress.errors import CheckpointError

__all__ = ["SCALE_DTYPE_NAMES", "QuantArgs", "QuantScheme"]

SCALE_DTYPE_NAMES = ("float16", "bfloat16", "float32")
Strategy = Literal["tensor", "channel", "group", "token"]


def _bad(field: str, value: Any, accepted: str) -> ValueError:
    return ValueError(f"{field}={value!r} is invalid; accepted: {accepted}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantArgs:
    """How one tensor (a weight, or a layer's input activations) is quantized.

    Args:
        num_bits: Bits per code (weights: 2, 3, 4 or 8; activations: 8).
        type: ``"int"`` (uniform integer grid); the only type implemented.
        symmetric: Range symmetric around 0 with the zero point fixed at ``2**(num_bits-1)``.
        strategy: What shares one scale: ``"group"`` (``group_size`` input columns of one
            output row), ``"channel"`` (one output row), ``"tensor"`` (everything) or
            ``"token"`` (one row of the activations; activations only). For input
            activations ``"channel"`` means one static scale per input column.
        group_size: Input columns per group (``strategy="group"``); None otherwise.
        dynamic: Activations only: scales computed from each input as it arrives, nothing
            stored. Static activation scales are stored with the layer.
        actorder: ``"weight"`` when the columns were quantized in activation order with
            static groups (the stored layout is unchanged, so kernels need nothing).
        observer: How static ranges were chosen (``"minmax"``, ``"mse"``, ``"percentile"``,
            ``"kl"``); informational for weights.
        scale_dtype: Storage dtype of the scales.
        zp_dtype: ``"uint8"`` for integer zero points, the scale dtype's name for float zero
            points, None when symmetric.
    """

    num_bits: int
    type: Literal["int"] = "int"
    symmetric: bool = False
    strategy: Strategy = "group"
    group_size: int | None = None
    dynamic: bool = False
    actorder: Literal["weight"] | None = None
    observer: str | None = "minmax"
    scale_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    zp_dtype: str | None = "uint8"

    def __post_init__(self) -> None:
        if not isinstance(self.num_bits, int) or not 1 <= self.num_bits <= 8:
            raise _bad("num_bits", self.num_bits, "an integer in 1..8")
        if self.type != "int":
            raise _bad("type", self.type, "'int'")
        if self.strategy not in ("tensor", "channel", "group", "token"):
            raise _bad("strategy", self.strategy, "'tensor', 'channel', 'group' or 'token'")
        if (self.strategy == "group") != (self.group_size is not None):
            raise _bad("group_size", self.group_size, "a positive integer exactly when strategy='group'")
        if self.group_size is not None and self.group_size < 1:
            raise _bad("group_size", self.group_size, "a positive integer")
        if self.scale_dtype not in SCALE_DTYPE_NAMES:
            raise _bad("scale_dtype", self.scale_dtype, ", ".join(SCALE_DTYPE_NAMES))
        accepted_zp = (None,) if self.symmetric else ("uint8", self.scale_dtype)
        if self.zp_dtype not in accepted_zp:
            raise _bad("zp_dtype", self.zp_dtype, " or ".join(map(repr, accepted_zp)))
        if self.dynamic and self.strategy not in ("token", "tensor"):
            raise _bad("dynamic", self.dynamic, "False unless strategy is 'token' or 'tensor'")
        if self.actorder is not None and self.strategy not in ("group", "channel"):
            raise _bad("actorder", self.actorder, "None unless the weights are grouped or per channel")

    @property
    def float_zero(self) -> bool:
        """True when zero points are stored as floats (the exact min-max grid)."""
        return self.zp_dtype is not None and self.zp_dtype != "uint8"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantArgs:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown quantization args {unknown}; accepted: {sorted(known)}")
        return cls(**data)


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantScheme:
    """A layer's quantization: its weights and, optionally, its input activations.

    Args:
        weights: The weight's args.
        input_activations: The input's args; None keeps activations in floating point
            (weight-only, ``W4A16``).
    """

    weights: QuantArgs
    input_activations: QuantArgs | None = None

    def __post_init__(self) -> None:
        if self.weights.strategy not in ("group", "channel"):
            raise _bad("weights.strategy", self.weights.strategy, "'group' or 'channel'")
        if self.weights.dynamic:
            raise _bad("weights.dynamic", True, "False (weights are quantized once)")
        act = self.input_activations
        if act is not None:
            if act.num_bits != 8:
                raise _bad("input_activations.num_bits", act.num_bits, "8")
            if act.strategy not in ("token", "tensor", "channel"):
                raise _bad("input_activations.strategy", act.strategy, "'token', 'tensor' or 'channel'")
            if not act.symmetric:
                raise _bad("input_activations.symmetric", act.symmetric, "True")
            if act.strategy == "token" and not act.dynamic:
                raise _bad("input_activations.dynamic", act.dynamic, "True for per-token scales")
            if act.strategy == "channel" and act.dynamic:
                raise _bad("input_activations.dynamic", act.dynamic, "False for per-channel scales (static only)")

    @property
    def name(self) -> str:
        """vLLM / llm-compressor style name: ``W4A16``, ``W8A8``, ``W4A8``."""
        act = self.input_activations
        return f"W{self.weights.num_bits}A{act.num_bits if act is not None else 16}"

    def to_dict(self) -> dict[str, Any]:
        act = self.input_activations
        return {"weights": self.weights.to_dict(), "input_activations": act.to_dict() if act else None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantScheme:
        try:
            unknown = sorted(set(data) - {"weights", "input_activations"})
            if unknown:
                raise ValueError(f"unknown scheme keys {unknown}; accepted: ['input_activations', 'weights']")
            act = data.get("input_activations")
            return cls(
                weights=QuantArgs.from_dict(data["weights"]),
                input_activations=QuantArgs.from_dict(act) if act is not None else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"malformed quantization scheme {data!r}: {exc}") from None

    @classmethod
    def weight_only(
        cls,
        *,
        num_bits: int,
        group_size: int,
        in_features: int,
        symmetric: bool,
        float_zero: bool = False,
        scale_dtype: str = "float16",
        actorder: bool = False,
        observer: str = "minmax",
    ) -> QuantScheme:
        """A weight-only scheme; ``group_size`` -1 or ``in_features`` means per channel."""
        per_channel = group_size in (-1, in_features)
        zp = None if symmetric else (scale_dtype if float_zero else "uint8")
        weights = QuantArgs(
            num_bits=num_bits,
            symmetric=symmetric,
            strategy="channel" if per_channel else "group",
            group_size=None if per_channel else group_size,
            actorder="weight" if actorder else None,
            observer=observer,
            scale_dtype=scale_dtype,
            zp_dtype=zp,
        )
        return cls(weights=weights)
