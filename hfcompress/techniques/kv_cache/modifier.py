"""Applies :class:`KVCacheConfig`: switches the model to the quantized KV cache and records the
``kv_cache`` patch, so that ``from_pretrained`` switches it back on."""

from __future__ import annotations

from typing import Any

from torch import nn

from hfcompress.errors import ModelError
from hfcompress.integrations.kv_cache import check_model, enable_kv_cache, kv_config
from hfcompress.modifier import CompressionContext, ModelView, Modifier
from hfcompress.patches import record_patch, recorded_patches, register_patch
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
            check_model(model)
        except ModelError as exc:
            raise self.error(str(exc)) from None
        if kv_config(model) is not None or any(p.get("name") == PATCH for p in recorded_patches(model)):
            raise self.error("the model already has a quantized KV cache; a recipe holds one kv_cache stage")

    def apply(self, model: nn.Module, context: CompressionContext) -> None:
        enable_kv_cache(model, self.config)
        record_patch(model, PATCH, self.config.to_dict())
