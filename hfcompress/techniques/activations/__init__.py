"""8-bit input activations (``W8A8``, ``W4A8``) for layers an earlier stage quantized."""

from hfcompress.registry import register_technique
from hfcompress.techniques.activations.config import ActivationQuantConfig
from hfcompress.techniques.activations.modifier import ActivationQuantModifier

__all__ = ["ActivationQuantConfig", "ActivationQuantModifier"]

register_technique(ActivationQuantConfig, ActivationQuantModifier)
