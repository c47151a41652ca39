"""The built-in techniques. Each subpackage registers itself when imported; the list is explicit."""

from hfcompress.techniques import (
    activations,
    awq,
    block_sparse,
    embeddings,
    error_compensation,
    gptq,
    kv_cache,
    learned_rounding,
    low_rank,
    pkd,
    rotation,
    rtn,
    smoothquant,
)

__all__ = [
    "activations",
    "awq",
    "block_sparse",
    "embeddings",
    "error_compensation",
    "gptq",
    "kv_cache",
    "learned_rounding",
    "low_rank",
    "pkd",
    "rotation",
    "rtn",
    "smoothquant",
]
