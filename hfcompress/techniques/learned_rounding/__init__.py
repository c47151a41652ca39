"""Learned rounding (AutoRound's signed gradient descent) after GPTQ or RTN."""

from hfcompress.registry import register_technique
from hfcompress.techniques.learned_rounding.config import LearnedRoundingConfig
from hfcompress.techniques.learned_rounding.modifier import LearnedRoundingModifier

__all__ = ["LearnedRoundingConfig", "LearnedRoundingModifier"]

register_technique(LearnedRoundingConfig, LearnedRoundingModifier)
