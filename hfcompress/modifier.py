"""The modifier lifecycle every technique implements, and the context ``compress`` hands it.

``compress`` first calls ``check`` on every stage's modifier (nothing is touched yet: a bad
recipe fails before the model changes), then ``apply`` on each in recipe order.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hfcompress.config import TechniqueConfig
from hfcompress.errors import CalibrationDataError, RecipeError, TrainingDataError

__all__ = ["CompressionContext", "Modifier"]


@dataclass
class CompressionContext:
    """What a stage may need besides the model.

    Attributes:
        tokenizer: Tokenizer for text calibration data.
        calibration_data: Samples for stages that calibrate (GPTQ, activation ranges).
        train_dataset: Training set for stages that train (distillation).
        eval_dataset: Evaluation set for stages that train.
        device: Compute device for layerwise work; None keeps each module where it is.
        progress: Show progress bars.
        num_calibration_samples: Windows drawn from text calibration data.
        calibration_seq_len: Tokens per calibration window.
        seed: Seed of the calibration window draw.
        checkpoint_dir: Where layerwise stages persist finished blocks, to resume a run.
    """

    tokenizer: Any = None
    calibration_data: Any = None
    train_dataset: Any = None
    eval_dataset: Any = None
    device: torch.device | None = None
    progress: bool = True
    num_calibration_samples: int = 128
    calibration_seq_len: int = 512
    seed: int = 0
    checkpoint_dir: Path | None = None


class Modifier(ABC):
    """Applies one recipe stage to a model.

    Args:
        config: The stage's technique config.
        stage: The stage's name in the recipe, used in every error message.
    """

    def __init__(self, config: TechniqueConfig, stage: str) -> None:
        self.config = config
        self.stage = stage

    def error(self, message: str) -> RecipeError:
        """A :class:`RecipeError` that names this stage."""
        return RecipeError(f"stage {self.stage!r} ({self.config.technique}): {message}")

    def check(self, model: nn.Module, context: CompressionContext) -> None:
        """Raise if this stage cannot apply to ``model`` with ``context``; must not modify anything.

        The base check refuses a stage that needs calibration data, or a training set, when
        none was given.
        """
        if type(self.config).needs_training and context.train_dataset is None:
            raise TrainingDataError(
                f"stage {self.stage!r} ({self.config.technique}) trains the model and needs a training set; pass "
                "train_dataset=... to compress() (a tokenized datasets.Dataset with input_ids and labels; for GLUE: "
                "hfcompress.glue.tokenize_glue(hfcompress.glue.load_glue(task, 'train'), tokenizer))"
            )
        if type(self.config).needs_calibration and context.calibration_data is None:
            raise CalibrationDataError(
                f"stage {self.stage!r} ({self.config.technique}) needs calibration data; pass "
                "calibration_data=... to compress() (a list of strings, a text file path or a "
                "datasets.Dataset) or --calibration on the command line"
            )

    @abstractmethod
    def apply(self, model: nn.Module, context: CompressionContext) -> None:
        """Modify ``model`` in place."""
