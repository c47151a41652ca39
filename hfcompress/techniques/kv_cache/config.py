"""Config of the quantized KV cache."""

from __future__ import annotations

import dataclasses
from typing import Literal

from hfcompress.config import TechniqueConfig, invalid

__all__ = ["KVCacheConfig"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class KVCacheConfig(TechniqueConfig):
    """Store the keys and values of ``generate`` in 2, 4 or 8 bits (KIVI: keys per channel,
    values per token), with the first tokens (attention sinks) and a window of recent tokens
    kept in full precision. Tokens are quantized once, as they leave the window, in whole
    groups; attention reads the packed cache directly.

    The stage changes no weight: it is recorded in the saved config, and ``from_pretrained``
    switches the cache back on. Put it anywhere in a recipe (it composes with every weight
    stage).

    Args:
        bits: Bits per cached key and value element: 2, 4 or 8.
        group_size: Keys: tokens sharing one scale and zero per channel. Values: channels of
            one token sharing one scale and zero (capped at the head dim).
        residual_length: Recent tokens kept in full precision. Tokens enter the packed cache
            ``group_size`` at a time once more than ``residual_length + group_size - 1`` wait,
            so between ``residual_length`` and ``residual_length + group_size - 1`` recent
            tokens are always full precision.
        sink_tokens: The first tokens of a sequence, kept in full precision (attention sinks:
            quantizing them hurts retrieval most). 0 turns sinks off.
        scale_dtype: Storage dtype of the scales and zeros.
    """

    technique = "kv_cache"

    bits: Literal[2, 4, 8] = 4
    group_size: Literal[16, 32, 64, 128] = 64
    residual_length: int = 128
    sink_tokens: int = 16
    scale_dtype: Literal["float16", "bfloat16", "float32"] = "float16"

    def _validate(self) -> None:
        if self.residual_length < 0:
            raise invalid("residual_length", self.residual_length, "an integer >= 0")
        if self.sink_tokens < 0:
            raise invalid("sink_tokens", self.sink_tokens, "an integer >= 0 (0 turns attention sinks off)")
