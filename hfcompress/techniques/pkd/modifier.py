"""Applies :class:`PKDConfig`: the model is shortened to a student and distilled from a frozen
copy of itself through the ``Trainer``."""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
from pathlib import Path

from torch import nn

from hfcompress.architectures import blocks_of
from hfcompress.checkpointing import claim_folder, training_fingerprint
from hfcompress.errors import HfCompressError
from hfcompress.kinds import CompressedModule
from hfcompress.modifier import CompressionContext, ModelView, Modifier
from hfcompress.techniques.pkd.config import PKDConfig
from hfcompress.techniques.pkd.mapping import check_student_layout, drop_layers, layer_map, num_layers

__all__ = ["PKDModifier"]

logger = logging.getLogger(__name__)


class PKDModifier(Modifier):
    config: PKDConfig

    def _keep(self, model: nn.Module) -> tuple[int, ...]:
        c = self.config
        return layer_map(num_layers(model), c.strategy, num_student_layers=c.num_layers, layers=c.layers)

    def layer_pairs(self, keep: tuple[int, ...]) -> list[tuple[int, int]]:
        """(student, teacher) layer pairs of the patient loss."""
        last = len(keep) if self.config.match_last_layer else len(keep) - 1
        return [(i, keep[i]) for i in range(last)]

    def check(self, model: nn.Module, context: CompressionContext, view: ModelView) -> None:
        super().check(model, context, view)
        if "input_ids" not in getattr(context.train_dataset, "column_names", ["input_ids"]):
            raise self.error(
                "train_dataset has no 'input_ids' column; tokenize it first (for GLUE: "
                "hfcompress.glue.tokenize_glue(load_glue(task, 'train'), tokenizer))"
            )
        compressed = [
            n for n, e in view.entries.items() if e.stage is not None or isinstance(e.module, CompressedModule)
        ]
        if compressed:
            raise self.error(
                f"the model is already compressed ({compressed[0]!r}, ...) and cannot be trained; distil first and "
                "quantize in a later stage, or pass a compressed teacher to hfcompress.DistillationTrainer(teacher=...)"
            )
        try:
            keep = self._keep(model)
            prefix, _ = blocks_of(model)
            check_student_layout(model, keep)
        except HfCompressError as exc:  # a bad mapping or a model whose blocks cannot be found
            raise self.error(str(exc)) from exc
        view.rename_blocks(prefix, keep)

    def apply(self, model: nn.Module, context: CompressionContext) -> None:
        from hfcompress.integrations.trainer import make_trainer

        c = self.config
        keep = self._keep(model)
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
        if context.checkpoint_dir is not None:  # what decides the result: settings, model, training data
            settings = {k: v for k, v in c.to_dict().items() if k != "checkpoint_steps"}
            fingerprint = training_fingerprint(settings, model, context.train_dataset)
        drop_layers(model, keep)
        pairs = self.layer_pairs(keep)
        if c.beta > 0 and not pairs:
            logger.warning("stage %r: a 1-layer student has no layer to match; the patient loss is off", self.stage)
        logger.info("stage %r: student keeps teacher layers %s; patient loss on %s", self.stage, list(keep), pairs)
        model.train()
        train = dict(
            teacher=teacher,
            eval_dataset=context.eval_dataset,
            layer_pairs=pairs,
            temperature=c.temperature,
            alpha=c.alpha,
            beta=c.beta,
            epochs=c.epochs,
            learning_rate=c.learning_rate,
            batch_size=c.batch_size,
            seed=c.seed,
            bf16=c.bf16,
            progress=context.progress,
        )
        if context.checkpoint_dir is None:
            with tempfile.TemporaryDirectory(prefix="hfcompress-pkd-") as scratch:
                make_trainer(model, context.train_dataset, context.tokenizer, output_dir=scratch, **train).train()
        else:
            # Checkpoints of the training itself (the student, optimizer, schedule and random
            # state, every checkpoint_steps steps): a killed run started again resumes from the last.
            folder = claim_folder(context.checkpoint_dir / self.stage, fingerprint)  # or another run's: refused
            last = _last_complete_checkpoint(folder)
            if last is not None:
                logger.info("stage %r: resuming the training from %s", self.stage, last)
            trainer = make_trainer(
                model,
                context.train_dataset,
                context.tokenizer,
                output_dir=folder,
                save_strategy="steps",
                save_steps=c.checkpoint_steps,
                save_total_limit=1,
                **train,
            )
            trainer.train(resume_from_checkpoint=last)
        model.eval()


def _last_complete_checkpoint(folder: Path) -> str | None:
    """The Trainer checkpoint a rerun resumes from: the newest one whose ``trainer_state.json``
    (written last) exists. A checkpoint a kill cut short is removed, with a warning (the Trainer
    writes a checkpoint in place, and keeps the one before until the new one is whole)."""
    complete = []
    for path in folder.glob("checkpoint-*"):
        if not path.name.removeprefix("checkpoint-").isdigit():
            continue
        if (path / "trainer_state.json").is_file():
            complete.append((int(path.name.removeprefix("checkpoint-")), path))
        else:
            logger.warning("removing %s, a training checkpoint cut short by a kill", path)
            shutil.rmtree(path, ignore_errors=True)  # another process of the run may remove it first
    return str(max(complete)[1]) if complete else None
