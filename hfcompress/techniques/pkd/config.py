"""Config of layer-dropping distillation with PKD layer mapping."""

from __future__ import annotations

import dataclasses
from typing import Literal

from hfcompress.config import TechniqueConfig, invalid

__all__ = ["PKDConfig"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class PKDConfig(TechniqueConfig):
    """Patient Knowledge Distillation (Sun et al., 2019): the model becomes a student with fewer
    layers, each initialised from a teacher layer, trained with the ``Trainer`` against a frozen
    copy of the model as it was (the teacher).

    Defaults come from the PKD paper's grid (T in {5, 10, 20}, alpha in {0.2, 0.5, 0.7},
    beta in {10, 100, 500, 1000}) and its fine-tuning setup (lr 5e-5, batch 32, 3 epochs
    for small GLUE tasks; the paper trains 4).

    Args:
        strategy: ``"skip"`` (PKD-Skip: student layer i takes teacher layer
            ``ceil((i + 1) * n / k) - 1``, spread over the whole teacher and ending on its last
            layer: 6 -> 3 keeps 1, 3, 5; 6 -> 4 keeps 1, 2, 4, 5), ``"last"``
            (PKD-Last: the last k) or ``"explicit"`` (``layers``).
        num_layers: Student layers k, for ``skip`` and ``last``.
        layers: Teacher layers to keep (0-based, increasing), for ``explicit``.
        temperature: Softmax temperature T of the KD term.
        alpha: Weight of the KD term; the task loss gets ``1 - alpha``.
        beta: Weight of the patient loss over the mapped layers.
        match_last_layer: Include the student's last layer in the patient loss. The paper
            leaves it out: the KD term on the logits already covers it.
        epochs: Training epochs over ``train_dataset``.
        learning_rate: Peak AdamW learning rate (linear warm-up over 10%, then linear decay).
        batch_size: Examples per step and device.
        seed: Seed of the initialisation-independent randomness (shuffling, dropout).
        bf16: Train under bfloat16 autocast (float32, with a warning, on a device without a
            fast bfloat16 matmul, such as an AVX2-only CPU or one measured slower in bfloat16).
        checkpoint_steps: With ``compress(checkpoint_dir=...)``: training steps between the
            checkpoints (student, optimizer, schedule, random state) a killed run resumes from.
    """

    technique = "pkd"
    needs_training = True

    strategy: Literal["skip", "last", "explicit"] = "skip"
    num_layers: int | None = None
    layers: tuple[int, ...] = ()
    temperature: float = 5.0
    alpha: float = 0.5
    beta: float = 100.0
    match_last_layer: bool = False
    epochs: float = 3.0
    learning_rate: float = 5e-5
    batch_size: int = 32
    seed: int = 42
    bf16: bool = False
    checkpoint_steps: int = 500

    def _validate(self) -> None:
        if self.strategy in ("skip", "last"):
            if self.num_layers is None or self.num_layers < 1:
                raise invalid(
                    "num_layers", self.num_layers, f"an integer >= 1 (student layers) for strategy={self.strategy!r}"
                )
            if self.layers:
                raise invalid(
                    "layers", list(self.layers), f"[] with strategy={self.strategy!r}; use strategy='explicit'"
                )
        elif not self.layers:
            raise invalid("layers", [], "a non-empty list of teacher layers (0-based) for strategy='explicit'")
        if self.temperature <= 0:
            raise invalid("temperature", self.temperature, "a number > 0")
        if not 0 <= self.alpha <= 1:
            raise invalid("alpha", self.alpha, "a number in [0, 1]")
        if self.beta < 0:
            raise invalid("beta", self.beta, "a number >= 0")
        if self.epochs <= 0:
            raise invalid("epochs", self.epochs, "a number > 0")
        if self.learning_rate <= 0:
            raise invalid("learning_rate", self.learning_rate, "a number > 0")
        if self.batch_size < 1:
            raise invalid("batch_size", self.batch_size, "an integer >= 1")
        if self.checkpoint_steps < 1:
            raise invalid("checkpoint_steps", self.checkpoint_steps, "an integer >= 1")
