"""Round-to-nearest weight quantization."""

from hfcompress.registry import register_technique
from hfcompress.techniques.rtn.config import RTNConfig
from hfcompress.techniques.rtn.modifier import RTNModifier

__all__ = ["RTNConfig", "RTNModifier"]

register_technique(RTNConfig, RTNModifier)
