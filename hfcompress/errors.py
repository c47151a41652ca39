"""Exception types raised by hfcompress.

Every error names the offending value and what would be accepted, so that a user can fix the
input without reading our source.
"""

from __future__ import annotations

__all__ = [
    "CalibrationDataError",
    "CheckpointError",
    "EvaluationError",
    "ExportError",
    "HfCompressError",
    "ModelError",
    "OutputPathError",
    "RecipeError",
    "TrainingDataError",
]


class HfCompressError(Exception):
    """Base class of every error hfcompress raises on purpose."""


class RecipeError(HfCompressError, ValueError):
    """A recipe or a technique config is invalid (unknown key, value out of range, ...)."""


class CalibrationDataError(HfCompressError, ValueError):
    """A stage needs calibration data that was not given, or the data is unusable."""


class CheckpointError(HfCompressError, OSError):
    """A saved compressed checkpoint is missing a tensor, or a tensor is malformed."""


class OutputPathError(HfCompressError, OSError):
    """A model cannot be saved where asked (a file, a read-only folder, a non-empty folder)."""


class ModelError(HfCompressError, ValueError):
    """The model cannot be compressed as asked (non-finite weights, unknown model name, ...)."""


class TrainingDataError(HfCompressError, ValueError):
    """A stage that trains (distillation) got no training set, or an unusable one."""


class EvaluationError(HfCompressError, ValueError):
    """An evaluation cannot give a meaningful number (text too short, a NaN or Inf score, a
    model of the wrong kind for the benchmark)."""


class ExportError(HfCompressError, ValueError):
    """A model cannot be written in the requested external format as it is (a layout the
    format cannot express, a missing optional package)."""
