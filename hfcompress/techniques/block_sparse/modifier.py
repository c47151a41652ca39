"""Applies :class:`BlockSparseConfig`: calibrates the layout when it is ``calibrated``,
switches the model to block-sparse attention and records the ``block_sparse`` patch (with
the calibrated tables), so that ``from_pretrained`` switches it back on."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hfcompress.errors import ModelError
from hfcompress.integrations.attention import attention_conflict
from hfcompress.modifier import CompressionContext, ModelView, Modifier
from hfcompress.patches import earlier_patch, record_patch, register_patch
from hfcompress.techniques.block_sparse.attention import (
    ATTENTION,
    calibrate_tables,
    check_model,
    enable_block_sparse,
    sparse_config,
)
from hfcompress.techniques.block_sparse.config import BlockSparseConfig

__all__ = ["PATCH", "BlockSparseModifier"]

PATCH = "block_sparse"
# Calibrated tables are stored in the saved config (JSON) rounded to this many significant
# digits; the live model uses the rounded tables too, so a reload chooses the same tiles.
_DIGITS = 6


def _apply_patch(model: nn.Module, params: dict[str, Any]) -> None:
    tables = params.get("tables")
    config = BlockSparseConfig.from_dict({k: v for k, v in params.items() if k != "tables"})
    enable_block_sparse(model, config, tables)


register_patch(PATCH, _apply_patch)


def _rounded(table: torch.Tensor) -> list[list[float]]:
    return [[float(f"{x:.{_DIGITS}g}") for x in row] for row in table.tolist()]


class BlockSparseModifier(Modifier):
    config: BlockSparseConfig

    def check(self, model: nn.Module, context: CompressionContext, view: ModelView) -> None:
        super().check(model, context, view)
        try:
            check_model(model)
        except ModelError as exc:
            raise self.error(str(exc)) from None
        root = view.entries[""]
        earlier = earlier_patch(root.marks, model, PATCH, sparse_config(model) is not None)
        if earlier is not None:
            raise self.error(
                f"the model's attention is block-sparse already (from {earlier}); one block_sparse stage is enough"
            )
        conflict = attention_conflict(root.marks, model, ATTENTION, self.stage)
        if conflict is not None:
            raise self.error(conflict)
        root.marks[PATCH] = self.stage
        self._batches = None
        if self.config.needs_calibration:
            self._batches = self.calibration_batches(model, context, self.config.batch_size)

    def apply(self, model: nn.Module, context: CompressionContext) -> None:
        tables = None
        if self._batches is not None:
            measured = calibrate_tables(model, self.config, self._batches)
            tables = {name: _rounded(table) for name, table in measured.items()}
        enable_block_sparse(model, self.config, tables)
        params = self.config.to_dict()
        if tables is not None:
            params["tables"] = tables
        record_patch(model, PATCH, params)
