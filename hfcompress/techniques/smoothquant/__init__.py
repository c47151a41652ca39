"""SmoothQuant: migrate activation outliers into the weights before int8 activations."""

from hfcompress.registry import register_technique
from hfcompress.techniques.smoothquant.config import SmoothQuantConfig
from hfcompress.techniques.smoothquant.modifier import SmoothQuantModifier

__all__ = ["SmoothQuantConfig", "SmoothQuantModifier"]

register_technique(SmoothQuantConfig, SmoothQuantModifier)
