"""Orthogonal rotations before quantization (QuaRot-style): the residual stream, value heads
and the down projection's input, so that 8-bit activations lose less."""

from hfcompress.registry import register_technique
from hfcompress.techniques.rotation.config import RotationConfig
from hfcompress.techniques.rotation.modifier import RotatedRMSNorm, RotationModifier

__all__ = ["RotatedRMSNorm", "RotationConfig", "RotationModifier"]

register_technique(RotationConfig, RotationModifier)
