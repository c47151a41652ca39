"""AWQ: activation-aware weight scaling before a weight-quantization stage."""

from hfcompress.registry import register_technique
from hfcompress.techniques.awq.config import AWQConfig
from hfcompress.techniques.awq.modifier import AWQModifier

__all__ = ["AWQConfig", "AWQModifier"]

register_technique(AWQConfig, AWQModifier)
