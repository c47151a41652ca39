"""The built-in techniques. Each subpackage registers itself when imported; the list is explicit."""

from hfcompress.techniques import activations, gptq, kv_cache, pkd, rtn, smoothquant

__all__ = ["activations", "gptq", "kv_cache", "pkd", "rtn", "smoothquant"]
