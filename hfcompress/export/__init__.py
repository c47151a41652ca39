"""Writing compressed models in other tools' formats (see :mod:`.compressed_tensors`)."""

from hfcompress.export.compressed_tensors import (
    ExportSummary,
    check_with_transformers,
    export_compressed_tensors,
    plan_compressed_tensors,
    requantize_partial_groups,
)

__all__ = [
    "ExportSummary",
    "check_with_transformers",
    "export_compressed_tensors",
    "plan_compressed_tensors",
    "requantize_partial_groups",
]
