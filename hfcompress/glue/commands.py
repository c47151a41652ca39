"""The GLUE commands of the CLI: ``hfcompress eval glue`` and ``hfcompress distill``.

    hfcompress eval glue --model teacher=out/teacher-{task} --model student=out/student-{task} \\
        --tasks sst2,mrpc --markdown table.md --json scores.json
    hfcompress eval glue --model minilm-l6 --finetune --tasks rte --output-dir out/ft
    hfcompress distill --teacher out/teacher-rte --task rte --recipe recipes/minilm_pkd_skip3.yaml \\
        --output out/student-rte                   # also under `accelerate launch`

``{task}`` in a model path is replaced by each task's name, so per-task fine-tuned models sit
in one row.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from hfcompress.cli_args import int_at_least
from hfcompress.errors import HfCompressError

__all__ = ["add_distill_parser", "add_eval_glue_parser", "run_distill", "run_eval_glue"]

logger = logging.getLogger("hfcompress")
DEFAULT_TASKS = "sst2,mrpc,cola,rte,stsb,wnli"


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir",
        default=None,
        help="GLUE folder in the original layout, or nyu-mll/glue (default: $HFCOMPRESS_DATA_DIR/glue, a "
        "shared/data/glue folder beside the working folder, else the Hub's nyu-mll/glue)",
    )
    p.add_argument(
        "--max-length",
        type=int_at_least(2),
        default=128,
        help="tokens per example, pairs truncated longest-first (default: %(default)s)",
    )
    p.add_argument("--limit", type=int_at_least(1), default=None, help="use only the first N examples of each split")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=float, default=3.0, help="training epochs (default: %(default)s)")
    p.add_argument("--learning-rate", type=float, default=5e-5, help="peak learning rate (default: %(default)s)")
    p.add_argument("--batch-size", type=int_at_least(1), default=32, help="training batch size (default: %(default)s)")
    p.add_argument("--seed", type=int, default=42, help="training seed (default: %(default)s)")
    p.add_argument("--bf16", action="store_true", help="train under bfloat16 autocast")


def add_eval_glue_parser(esub: argparse._SubParsersAction) -> None:
    g = esub.add_parser("glue", help="GLUE dev scores of one or more models, side by side")
    g.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="[NAME=]PATH",
        help="a model to score (repeatable); {task} in PATH is replaced by the task name",
    )
    g.add_argument("--tasks", default=DEFAULT_TASKS, help="comma-separated GLUE tasks (default: %(default)s)")
    g.add_argument("--finetune", action="store_true", help="fine-tune each model on each task's train split first")
    g.add_argument("--output-dir", default=None, help="with --finetune: save the fine-tuned models here")
    g.add_argument(
        "--eval-batch-size", type=int_at_least(1), default=64, help="examples per scoring batch (default: %(default)s)"
    )
    g.add_argument("--json", default=None, help="write all scores to this JSON file")
    g.add_argument("--markdown", default=None, help="write the table to this markdown file")
    _add_data_args(g)
    _add_train_args(g)


def add_distill_parser(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("distill", help="distil a GLUE teacher into a student with a recipe (PKD)")
    d.add_argument("--teacher", required=True, help="a classifier fine-tuned on --task (folder or bundled name)")
    d.add_argument("--task", required=True, help="GLUE task whose train split the student learns from")
    d.add_argument("--recipe", required=True, help="recipe YAML with a pkd stage (and optionally more)")
    d.add_argument("--output", required=True, help="folder to save the student into")
    d.add_argument(
        "--augment",
        type=int,
        default=0,
        metavar="COPIES",
        help="also train on COPIES unlabelled copies of each example with words swapped for their neighbours "
        "in the teacher's embeddings (teacher-labelled augmentation; default 0: off)",
    )
    d.add_argument("--augment-prob", type=float, default=0.3, help="word replacement probability of --augment")
    d.add_argument(
        "--checkpoint-dir",
        default=None,
        help="save training checkpoints here (every checkpoint_steps of the pkd stage); rerun to resume",
    )
    _add_data_args(d)


def _parse_models(specs: list[str]) -> dict[str, str]:
    models: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec.replace("{task}", "")).name.strip("-_") or spec, spec
        if name in models:
            raise HfCompressError(f"--model name {name!r} given twice; name each model: --model NAME=PATH")
        models[name] = path
    return models


_FINETUNE_RECORD = "hfcompress_finetune.json"  # written last: a folder without it is not reused


def _finetune_settings(args: argparse.Namespace, path: str, task: str) -> dict:
    """What decides a fine-tuned model: the model it started from and the training settings."""
    keys = ("epochs", "learning_rate", "batch_size", "max_length", "seed", "limit", "bf16", "data_dir")
    return {"model": str(path), "task": task, **{k: getattr(args, k) for k in keys}}


def _finished(folder: Path, settings: dict) -> bool:
    record = folder / _FINETUNE_RECORD
    try:
        return (folder / "config.json").is_file() and json.loads(record.read_text()) == settings
    except (OSError, ValueError):
        return False


def run_eval_glue(args: argparse.Namespace) -> int:
    from hfcompress.api import save_pretrained
    from hfcompress.glue.harness import evaluate_glue, finetune_glue, load_glue_model, markdown_table, write_results
    from hfcompress.glue.tasks import get_task

    tasks = [get_task(t) for t in args.tasks.split(",") if t.strip()]
    models = _parse_models(args.model)
    if args.finetune and args.output_dir is None:
        logger.warning("--finetune without --output-dir: the fine-tuned models are not kept")
    results: dict[str, list] = {}
    for name, spec in models.items():
        rows = results.setdefault(name, [])
        for task in tasks:
            path = spec.replace("{task}", task.name)
            saved = Path(args.output_dir) / f"{name}-{task.name}" if args.finetune and args.output_dir else None
            settings = _finetune_settings(args, path, task.name) if saved else None
            reuse = saved is not None and _finished(saved, settings)
            if reuse:  # a rerun after a kill: tasks fine-tuned with these settings are scored, not trained again
                logger.info("%s on %s: reusing %s, fine-tuned with the same settings", name, task.name, saved)
            model, tokenizer = load_glue_model(saved if reuse else path, task, strict=True, verify=True)
            if args.finetune and not reuse:
                scratch = Path(args.output_dir or ".") / ".trainer" / name / task.name
                start = time.perf_counter()
                finetune_glue(
                    model,
                    tokenizer,
                    task,
                    output_dir=scratch,
                    source=args.data_dir,
                    epochs=args.epochs,
                    learning_rate=args.learning_rate,
                    batch_size=args.batch_size,
                    max_length=args.max_length,
                    seed=args.seed,
                    limit=args.limit,
                    progress=not args.quiet,
                    bf16=args.bf16,
                )
                logger.info("fine-tuned %s on %s in %.0f s", name, task.name, time.perf_counter() - start)
                if saved is not None:
                    save_pretrained(model, saved, tokenizer=tokenizer)
                    (saved / _FINETUNE_RECORD).write_text(json.dumps(settings, sort_keys=True, indent=1))
            rows += evaluate_glue(
                model,
                tokenizer,
                task,
                source=args.data_dir,
                batch_size=args.eval_batch_size,
                max_length=args.max_length,
                limit=args.limit,
            )
    table = markdown_table(results)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table)
    if args.json:
        write_results(results, args.json)
    return 0


def run_distill(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    import hfcompress
    from hfcompress.glue.data import load_glue
    from hfcompress.glue.harness import (
        evaluate_glue,
        labels_in_model_order,
        load_glue_model,
        markdown_table,
        tokenize_glue,
    )
    from hfcompress.saving import check_output

    recipe = hfcompress.Recipe.from_yaml(args.recipe)  # a bad recipe fails before any loading
    output = check_output(args.output, overwrite=False)  # before hours of training, not after
    if args.checkpoint_dir is not None:
        from hfcompress.saving import check_folder

        check_folder(args.checkpoint_dir, flag="--checkpoint-dir")
    import torch

    # cpu=True on a machine without CUDA makes `accelerate launch` processes join one gloo group
    # (the Trainer's arguments ask for the same state, so this is the state it trains in).
    state = PartialState(cpu=not torch.cuda.is_available())
    teacher, tokenizer = load_glue_model(args.teacher, args.task, strict=True, verify=True)
    texts = load_glue(args.task, "train", args.data_dir, limit=args.limit)
    if args.augment:
        from hfcompress.glue.augment import augment_glue

        labelled = len(texts)
        try:
            texts = augment_glue(texts, teacher, tokenizer, copies=args.augment, replace_prob=args.augment_prob)
        except ValueError as exc:  # a bad --augment/--augment-prob: nothing is written yet
            raise HfCompressError(f"--augment {args.augment} --augment-prob {args.augment_prob}: {exc}") from exc
        logger.info("training on %d labelled rows and %d augmented rows", labelled, len(texts) - labelled)
    train = labels_in_model_order(tokenize_glue(texts, tokenizer, max_length=args.max_length), teacher, args.task)
    before = (
        evaluate_glue(teacher, tokenizer, args.task, source=args.data_dir, limit=args.limit)
        if state.is_main_process
        else []
    )
    logger.info("distilling on %d process(es), backend %s", state.num_processes, state.backend)
    hfcompress.compress(
        teacher,
        recipe,
        train_dataset=train,
        tokenizer=tokenizer,
        progress=not args.quiet,
        checkpoint_dir=args.checkpoint_dir,
    )
    student = teacher  # compress() shortened and trained the model in place
    state.wait_for_everyone()
    if state.is_main_process:
        hfcompress.save_pretrained(student, output, tokenizer=tokenizer)
        after = evaluate_glue(student, tokenizer, args.task, source=args.data_dir, limit=args.limit)
        print(markdown_table({"teacher": before, "student": after}))
        logger.info("saved the student (%d layers) to %s", student.config.num_hidden_layers, output)
    return 0
