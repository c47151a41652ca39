"""Low-rank factorization of Linear layers: plain SVD, whitened SVD (SVD-LLM), ASVD."""

from hfcompress.registry import register_technique
from hfcompress.techniques.low_rank.config import LowRankConfig
from hfcompress.techniques.low_rank.layer import LowRankLinear
from hfcompress.techniques.low_rank.modifier import LowRankModifier

__all__ = ["LowRankConfig", "LowRankLinear", "LowRankModifier"]

register_technique(LowRankConfig, LowRankModifier)
