"""The modifier lifecycle every technique implements, and the context ``compress`` hands it.

``compress`` first calls ``check`` on every stage's modifier, in recipe order, against a
:class:`ModelView`: the model as the stages before will have left it (which layers they
compressed, how they renamed blocks). Each check records in the view what its stage will
change. Nothing is touched yet, so a bad recipe fails before the model changes, including a
stage that the stages before it leave with nothing to do. Then ``apply`` runs on each.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hfcompress.architectures import text_config
from hfcompress.config import TechniqueConfig
from hfcompress.data import reusable
from hfcompress.errors import CalibrationDataError, RecipeError, TrainingDataError

__all__ = ["CompressionContext", "ModelView", "Modifier", "ViewEntry"]


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
        checkpoint_dir: Where layerwise stages persist finished blocks (and a pkd stage its
            training checkpoints), to resume a run.
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
    # The checked calibration windows, once a stage asked for them: later stages batch the
    # same tensor instead of tokenizing the data again.
    calibration_windows: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.calibration_data = reusable(self.calibration_data)


@dataclass
class ViewEntry:
    """One module of a :class:`ModelView`.

    Attributes:
        class_name: Its class name (what it will be once the earlier stages ran).
        module: The module object as it is now (before any stage runs).
        stage: The earlier stage that compresses or replaces it, or None.
        marks: What earlier stages add to it without replacing it, e.g.
            ``{"input_activations": stage}``.
    """

    class_name: str
    module: nn.Module
    stage: str | None = None
    marks: dict[str, str] = field(default_factory=dict)


class ModelView:
    """The model as the stages checked so far will leave it: module name -> :class:`ViewEntry`.

    Args:
        model: The model before any stage runs.
    """

    def __init__(self, model: nn.Module) -> None:
        from hfcompress.architectures import outside_language_model

        self.entries: dict[str, ViewEntry] = {n: ViewEntry(type(m).__name__, m) for n, m in model.named_modules()}
        # A multimodal model's modules outside its language model: "Linear" does not target them.
        self.outside = outside_language_model(model)

    def pairs(self) -> list[tuple[str, str]]:
        """``(name, class name)`` of every module, in module order (what target patterns match)."""
        return [(name, e.class_name) for name, e in self.entries.items()]

    def claim(self, names: list[str], stage: str, class_name: str) -> None:
        """Record that ``stage`` turns the modules ``names`` into ``class_name`` modules."""
        for name in names:
            entry = self.entries[name]
            entry.class_name, entry.stage = class_name, stage

    def add(self, name: str, module: nn.Module, stage: str | None = None, class_name: str | None = None) -> None:
        """Record that a stage creates the module ``name``: ``module`` is a stand-in with its
        shapes (e.g. a Linear on the meta device), ``class_name`` what it will be (default:
        the stand-in's class), ``stage`` the stage that compresses it (None: free for later
        stages to compress)."""
        self.entries[name] = ViewEntry(class_name or type(module).__name__, module, stage)

    def free_linear(self, targets: tuple[str, ...], ignore: tuple[str, ...]) -> tuple[list[str], list[str]]:
        """(float linear-like layers that ``targets``/``ignore`` select and no earlier stage
        compresses, selected linear-like layers that an earlier stage compresses)."""
        from hfcompress.kinds import is_linear_like
        from hfcompress.targets import select

        free, taken = [], []
        for name in select(self.pairs(), targets, ignore, self.outside):
            entry = self.entries[name]
            if entry.module is None or not is_linear_like(entry.module):
                continue
            (free if entry.stage is None else taken).append(name)
        return free, taken

    def rename_blocks(self, prefix: str, keep: tuple[int, ...]) -> None:
        """Record that only the blocks ``keep`` of the list at ``prefix`` remain, renumbered."""
        renamed: dict[str, ViewEntry] = {}
        new_index = {old: new for new, old in enumerate(keep)}
        for name, entry in self.entries.items():
            if not name.startswith(f"{prefix}."):
                renamed[name] = entry
                continue
            index, _, rest = name[len(prefix) + 1 :].partition(".")
            if index.isdigit() and int(index) in new_index:
                renamed[".".join(filter(None, [prefix, str(new_index[int(index)]), rest]))] = entry
        self.entries = renamed


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

    def check(self, model: nn.Module, context: CompressionContext, view: ModelView) -> None:
        """Raise if this stage cannot apply to the model as ``view`` shows it (after the
        earlier stages), and record in ``view`` what this stage will change. Must not modify
        ``model``.

        The base check refuses a stage that needs calibration data, or a training set, when
        none was given.
        """
        if type(self.config).needs_training and context.train_dataset is None:
            raise TrainingDataError(
                f"stage {self.stage!r} ({self.config.technique}) trains the model and needs a training set; pass "
                "train_dataset=... to compress() (a tokenized datasets.Dataset with input_ids and labels; for GLUE: "
                "hfcompress.glue.tokenize_glue(hfcompress.glue.load_glue(task, 'train'), tokenizer))"
            )
        if self.config.needs_calibration and context.calibration_data is None:
            raise CalibrationDataError(
                f"stage {self.stage!r} ({self.config.technique}) needs calibration data; pass "
                "calibration_data=... to compress() (a list of strings, a text file path or a "
                "datasets.Dataset) or --calibration on the command line"
            )

    def check_later_stages(self, later: list[Modifier]) -> None:
        """Raise if this stage needs a later stage of the same ``compress()`` call that is not
        there (``later``: the stages after it, in order). Default: none needed."""
        return None

    def takes_gradients(self) -> bool:
        """Whether :meth:`apply` runs backward passes through the model (training, gradient
        sensitivity, tuned scales). Default: the stages that train."""
        return type(self.config).needs_training

    def calibration_batches(
        self, model: nn.Module, context: CompressionContext, batch_size: int
    ) -> list[dict[str, torch.Tensor]]:
        """The context's calibration data as batches of ``batch_size`` windows, checked
        against the model's vocabulary and context length (call it from ``check``, before any
        stage changes the model). The data is tokenized once per ``compress`` call; every
        stage that asks gets the same windows."""
        from hfcompress.data import calibration_ids

        if context.calibration_windows is None:
            text = text_config(model)
            context.calibration_windows = calibration_ids(
                context.calibration_data,
                context.tokenizer,
                num_samples=context.num_calibration_samples,
                seq_len=context.calibration_seq_len,
                seed=context.seed,
                vocab_size=getattr(text, "vocab_size", None),
                max_length=getattr(text, "max_position_embeddings", None),
            )
        return [{"input_ids": chunk} for chunk in context.calibration_windows.split(batch_size)]

    def before_stage(self, model: nn.Module, stage: str) -> None:
        """Called on every later stage just before the earlier stage ``stage`` applies, with the
        model as the stages before ``stage`` left it. Default: nothing. A stage that needs a
        module that an earlier stage of the same call creates and a later one replaces (the
        float factors of a low-rank layer, which a quantizing stage then rounds) takes it here:
        at ``check`` time only its stand-in exists."""
        return None

    @abstractmethod
    def apply(self, model: nn.Module, context: CompressionContext) -> None:
        """Modify ``model`` in place."""
