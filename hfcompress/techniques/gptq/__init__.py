"""GPTQ layerwise post-training quantization."""

from hfcompress.registry import register_technique
from hfcompress.techniques.gptq.config import GPTQConfig
from hfcompress.techniques.gptq.modifier import GPTQModifier

__all__ = ["GPTQConfig", "GPTQModifier"]

register_technique(GPTQConfig, GPTQModifier)
