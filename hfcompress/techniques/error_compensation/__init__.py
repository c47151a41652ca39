"""Low-rank compensation of quantization error (EoRA / LQER): ``W ~ Q(W) + B A``."""

from hfcompress.registry import register_technique
from hfcompress.techniques.error_compensation.config import ErrorCompensationConfig
from hfcompress.techniques.error_compensation.modifier import ErrorCompensationModifier

__all__ = ["ErrorCompensationConfig", "ErrorCompensationModifier"]

register_technique(ErrorCompensationConfig, ErrorCompensationModifier)
