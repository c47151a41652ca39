"""Applies :class:`KVCacheConfig`: switches the model to the quantized KV cache and records the
``kv_cache`` patch, so that ``from_pretrained`` switches it back on."""

from __future__ import annotations

from typing import Any

from torch import nn

from hfcompress.errors import ModelError
from hfcompress.integrations.attention import attention_conflict
from hfcompress.integrations.kv_cache import ATTENTION, check_model, enable_kv_cache, kv_config
from hfcompress.modifier import CompressionContext, ModelView, Modifier
from hfcompress.patches import earlier_patch, record_patch, register_patch
from hfcompress.techniques.kv_cache.config import KVCacheConfig

__all__ = ["PATCH", "KVCacheModifier"]

PATCH = "kv_cache"


def _apply_patch(model: nn.Module, params: dict[str, Any]) -> None:
    enable_kv_cache(model, KVCacheConfig.from_dict(params))


register_patch(PATCH, _apply_patch)


class KVCacheModifier(Modifier):
    config: KVCacheConfig

    def check(self, model: nn.Module, context: CompressionContext, view: ModelView) -> None:
        super().check(model, context, view)
        try:
            check_model(model, self.config)
        except ModelError as exc:
            raise self.error(str(exc)) from None
        root = view.entries[""]  # the model itself: where model-level stages leave their mark
        earlier = earlier_patch(root.marks, model, PATCH, kv_config(model) is not None)
        if earlier is not None:
            raise self.error(
                f"the model already has a quantized KV cache (from {earlier}); one kv_cache stage is enough"
            )
        conflict = attention_conflict(root.marks, model, ATTENTION, self.stage)
        if conflict is not None:
            raise self.error(conflict)
        root.marks[PATCH] = self.stage

    def apply(self, model: nn.Module, context: CompressionContext) -> None:
        enable_kv_cache(model, self.config)
        record_patch(model, PATCH, self.config.to_dict())
