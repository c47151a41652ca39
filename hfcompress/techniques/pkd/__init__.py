"""Layer-dropping distillation with PKD layer mapping."""

from hfcompress.registry import register_technique
from hfcompress.techniques.pkd.config import PKDConfig
from hfcompress.techniques.pkd.loss import distillation_loss, kd_loss, patient_loss, regression_kd_loss
from hfcompress.techniques.pkd.mapping import drop_layers, layer_map
from hfcompress.techniques.pkd.modifier import PKDModifier

__all__ = [
    "PKDConfig",
    "PKDModifier",
    "distillation_loss",
    "drop_layers",
    "kd_loss",
    "layer_map",
    "patient_loss",
    "regression_kd_loss",
]

register_technique(PKDConfig, PKDModifier)
