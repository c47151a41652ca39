"""Block-sparse attention as a recipe stage: layouts (``layout.py``, pure functions), the
attention function (``attention.py``) with its Triton kernel and torch twin
(:mod:`hfcompress_triton.block_sparse`), and the stage that switches a model to it."""

from hfcompress.registry import register_technique
from hfcompress.techniques.block_sparse.attention import disable_block_sparse, enable_block_sparse
from hfcompress.techniques.block_sparse.config import BlockSparseConfig
from hfcompress.techniques.block_sparse.modifier import BlockSparseModifier

__all__ = ["BlockSparseConfig", "BlockSparseModifier", "disable_block_sparse", "enable_block_sparse"]

register_technique(BlockSparseConfig, BlockSparseModifier)
