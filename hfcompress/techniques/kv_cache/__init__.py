"""A 2-, 4- or 8-bit KV cache for ``generate`` (KIVI with attention sinks), as a recipe stage."""

from hfcompress.integrations.kv_cache import QuantizedKVCache, disable_kv_cache, enable_kv_cache
from hfcompress.registry import register_technique
from hfcompress.techniques.kv_cache.config import KVCacheConfig
from hfcompress.techniques.kv_cache.modifier import KVCacheModifier

__all__ = ["KVCacheConfig", "KVCacheModifier", "QuantizedKVCache", "disable_kv_cache", "enable_kv_cache"]

register_technique(KVCacheConfig, KVCacheModifier)
