"""PKD layer-dropping distillation of all-MiniLM-L6-v2 on GLUE: teacher vs 3-layer students.

    python benchmarks/bench_pkd.py                 # run everything not yet in --out, then the table
    python benchmarks/bench_pkd.py --report        # only print the table from --out/results.json
    python benchmarks/bench_pkd.py --tasks rte --seeds 42 --limit 200   # a quick smoke run

Protocol (issue 4): per task, the teacher is all-MiniLM-L6-v2 (6 layers) fine-tuned on the
task's training split; every student has 3 layers and starts from the teacher's layers
1, 3, 5 (PKD-Skip mapping; PKD-Last starts from 3, 4, 5), and is trained on the same split:

* ``ft``: the task loss only (fine-tuned only);
* ``kd``: logit KD, ``(1 - alpha) CE + alpha T^2 KL`` (beta = 0);
* ``pkd-skip`` / ``pkd-last``: KD plus the patient loss on student layers 0, 1 (PKD mapping);
* ``pkd-skip-mild``: PKD-Skip with the grid's mildest corner (``--mild``: alpha 0.5, T 5,
  beta 10), added after the first setting's CoLA and STS-B rows came in below fine-tuning;
* ``pkd-skip-aug`` / ``kd-aug``: PKD-Skip / logit KD trained on the split plus
  ``--augment-copies`` unlabelled copies of each example with words swapped for their
  neighbours in the teacher's embedding table (:func:`hfcompress.glue.augment_glue`; the
  task loss sees the labelled rows only, the KD and patient terms every row). The copies per
  example shrink to keep the augmented split under ``--augment-budget`` rows (SST-2: 1);
* ``pkd-skip-w4rtn`` / ``pkd-skip-w4gptq`` (and ``pkd-skip-aug-w4*``): that student's Linear
  layers (not the classifier) quantized to W4 group 128; GPTQ calibrates on 128 windows of
  128 tokens drawn from the first 512 training examples.

Scores are on the dev split. MRPC and RTE vary with the seed, so they run several seeds
(teacher and students alike) and the table reports the mean. Every run's result is stored in
``--out/results.json`` as it finishes; a rerun skips what is there.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

TASKS = ("sst2", "mrpc", "rte", "stsb", "cola")
VARIANTS = (
    "teacher",
    "ft",
    "kd",
    "pkd-skip",
    "pkd-skip-aug",
    "kd-aug",
    "pkd-last",
    "pkd-skip-mild",
    "pkd-skip-w4rtn",
    "pkd-skip-w4gptq",
    "pkd-skip-aug-w4rtn",
    "pkd-skip-aug-w4gptq",
)
SEEDED_TASKS = {"mrpc", "rte"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated GLUE tasks")
    p.add_argument("--seeds", default="42,43,44", help="seeds for MRPC and RTE (others use the first)")
    p.add_argument("--epochs", type=float, default=3.0, help="epochs on every task but SST-2")
    p.add_argument("--sst2-epochs", type=float, default=1.0, help="epochs on SST-2 (67k examples)")
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--temperature", type=float, default=10.0)
    p.add_argument("--alpha", type=float, default=0.7)
    p.add_argument("--beta", type=float, default=100.0)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset to run")
    p.add_argument("--augment-copies", type=int, default=8, help="perturbed copies per example (*-aug)")
    p.add_argument("--augment-prob", type=float, default=0.3, help="word replacement probability (*-aug)")
    p.add_argument("--augment-budget", type=int, default=80000, help="at most this many augmented rows")
    p.add_argument("--seed-all-tasks", action="store_true", help="run every seed on every task, not only MRPC/RTE")
    p.add_argument("--teacher-model", default="minilm-l6", help="the pre-trained teacher (bundled name or folder)")
    p.add_argument("--mild", default="0.5,5,10", help="alpha,T,beta of the pkd-skip-mild student")
    p.add_argument("--fp32", action="store_true", help="train in float32 (default: bfloat16 autocast)")
    p.add_argument("--limit", type=int, default=None, help="first N training examples only (smoke runs)")
    p.add_argument("--data-dir", default=None, help="GLUE folder (default: shared/data/glue, else the Hub)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/pkd"))
    p.add_argument("--report", action="store_true", help="print the table from --out/results*.json and exit")
    p.add_argument("--results-name", default="results.json", help="the file under --out this run writes")
    return p.parse_args(argv)


def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def load_all_results(out: Path) -> dict:
    """Every ``results*.json`` under ``out`` (parallel runs write one each), merged per run key."""
    merged: dict = {}
    for path in sorted(out.glob("results*.json")):
        for key, variants in load_results(path).items():
            merged.setdefault(key, {}).update(variants)
    return merged


def save_results(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, path)


def run_task_seed(task: str, seed: int, args: argparse.Namespace, results: dict, path: Path) -> None:
    import torch

    import hfcompress
    from hfcompress.glue import (
        augment_glue,
        evaluate_glue,
        finetune_glue,
        load_glue,
        load_glue_model,
        tokenize_glue,
    )

    key = f"{task}/s{seed}"
    done = results.setdefault(key, {})
    wanted = [v for v in VARIANTS if v in args.variants.split(",")]
    if all(v in done for v in wanted):
        return
    epochs = args.sst2_epochs if task == "sst2" else args.epochs
    train_args = dict(
        epochs=epochs, learning_rate=args.learning_rate, batch_size=args.batch_size, seed=seed, bf16=not args.fp32
    )
    scratch = args.out / f"scratch-{os.getpid()}"

    def record(variant: str, model, seconds: float) -> None:
        (r,) = evaluate_glue(model, tokenizer, task, source=args.data_dir)
        done[variant] = {"metrics": r.metrics, "main": r.main, "train_seconds": round(seconds, 1)}
        save_results(results, path)
        logging.info("%s %s: %s (%.0f s)", key, variant, r.metrics, seconds)

    teacher_dir = args.out / "models" / f"teacher-{task}-s{seed}"
    if (teacher_dir / "config.json").is_file():
        teacher, tokenizer = load_glue_model(teacher_dir, task, dtype=torch.float32)
    else:
        torch.manual_seed(seed)
        teacher, tokenizer = load_glue_model(args.teacher_model, task, dtype=torch.float32)
        start = time.perf_counter()
        finetune_glue(
            teacher, tokenizer, task, output_dir=scratch, source=args.data_dir, limit=args.limit, **train_args
        )
        seconds = time.perf_counter() - start
        hfcompress.save_pretrained(teacher, teacher_dir, tokenizer=tokenizer)
        record("teacher", teacher, seconds)
    teacher.eval()
    texts = load_glue(task, "train", args.data_dir, limit=args.limit)
    train = tokenize_glue(texts, tokenizer)
    skip = hfcompress.layer_map(6, "skip", num_student_layers=3)

    if "ft" not in done and "ft" in wanted:
        student = hfcompress.drop_layers(teacher, skip, copy_model=True)
        start = time.perf_counter()
        finetune_glue(
            student, tokenizer, task, output_dir=scratch, source=args.data_dir, limit=args.limit, **train_args
        )
        record("ft", student, time.perf_counter() - start)

    mild_alpha, mild_t, mild_beta = (float(v) for v in args.mild.split(","))
    students = (
        ("kd", "skip", args.alpha, args.temperature, 0.0),
        ("pkd-skip", "skip", args.alpha, args.temperature, args.beta),
        ("pkd-skip-aug", "skip", args.alpha, args.temperature, args.beta),
        ("kd-aug", "skip", args.alpha, args.temperature, 0.0),
        ("pkd-last", "last", args.alpha, args.temperature, args.beta),
        ("pkd-skip-mild", "skip", mild_alpha, mild_t, mild_beta),
    )
    augmented = None
    quantized_bases = {}
    for variant, strategy, alpha, temperature, beta in students:
        student_dir = args.out / "models" / f"{variant}-{task}-s{seed}"
        base_of_w4 = any(v.startswith(f"{variant}-w4") for v in wanted)
        if variant not in wanted or (variant in done and (not base_of_w4 or (student_dir / "config.json").is_file())):
            continue
        data = train
        if variant.endswith("-aug"):
            if augmented is None:
                copies = max(1, min(args.augment_copies, args.augment_budget // len(texts)))
                augmented = tokenize_glue(
                    augment_glue(texts, teacher, tokenizer, copies=copies, replace_prob=args.augment_prob, seed=seed),
                    tokenizer,
                )
                logging.info("%s: %d rows with %d augmented copies per example", key, len(augmented), copies)
            data = augmented
        recipe = hfcompress.Recipe(
            [
                hfcompress.PKDConfig(
                    strategy=strategy,
                    num_layers=3,
                    temperature=temperature,
                    alpha=alpha,
                    beta=beta,
                    **train_args,
                )
            ]
        )
        student = copy.deepcopy(teacher)
        start = time.perf_counter()
        hfcompress.compress(student, recipe, train_dataset=data, tokenizer=tokenizer)
        record(variant, student, time.perf_counter() - start)
        if base_of_w4:
            hfcompress.save_pretrained(student, student_dir, tokenizer=tokenizer)
            quantized_bases[variant] = student

    calibration = [
        " ".join(filter(None, (row["text_a"], row.get("text_b")))) for row in texts.select(range(min(512, len(texts))))
    ]
    for base in ("pkd-skip", "pkd-skip-aug"):
        todo = [v for v in (f"{base}-w4rtn", f"{base}-w4gptq") if v in wanted and v not in done]
        if todo:
            student = quantized_bases.get(base)
            if student is None:
                from transformers import AutoModelForSequenceClassification

                student = AutoModelForSequenceClassification.from_pretrained(
                    args.out / "models" / f"{base}-{task}-s{seed}"
                )
            quantize_student(base, student, todo, calibration, tokenizer, record)


def quantize_student(base: str, student, todo: list[str], calibration: list[str], tokenizer, record) -> None:
    """The W4 rows: ``student``'s Linear layers (not the classifier) at group 128, RTN and GPTQ."""
    import hfcompress

    for suffix, config in (
        # The settings of recipes/minilm_pkd_skip3_w4a16_rtn.yaml and bert_w4a16_gptq_g128.yaml.
        ("w4rtn", hfcompress.RTNConfig(bits=4, group_size=128, ignore=("classifier",))),
        (
            "w4gptq",
            hfcompress.GPTQConfig(
                bits=4,
                group_size=128,
                act_order=True,
                clip_search=True,
                compute_dtype="bfloat16",
                ignore=("classifier",),
            ),
        ),
    ):
        variant = f"{base}-{suffix}"
        if variant not in todo:
            continue
        model = copy.deepcopy(student)
        start = time.perf_counter()
        hfcompress.compress(
            model,
            hfcompress.Recipe([config]),
            tokenizer=tokenizer,
            calibration_data=calibration if config.needs_calibration else None,
            calibration_seq_len=128,
            progress=False,
        )
        record(variant, model, time.perf_counter() - start)


def summarize(results: dict, tasks: list[str]) -> str:
    """Mean over seeds per (variant, task), the average of the headline metrics, % of teacher."""
    from hfcompress.glue import get_task

    rows = {}
    for variant in VARIANTS:
        per_task = {}
        for task in tasks:
            runs = [v[variant] for k, v in results.items() if k.split("/")[0] == task and variant in v]
            if runs:
                per_task[task] = (
                    float(np.mean([r["main"] for r in runs])),
                    float(np.std([r["main"] for r in runs])),
                    len(runs),
                    float(np.mean([r["train_seconds"] for r in runs])),
                )
        rows[variant] = per_task
    names = {t: f"{t} ({get_task(t).main_metric.replace('matthews_correlation', 'mcc')})" for t in tasks}
    header = ["student", *[names[t] for t in tasks], "avg", "% of teacher", "train s (sum)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    teacher_avg = None
    for variant, per_task in rows.items():
        if not per_task:
            continue
        cells = [variant]
        for t in tasks:
            if t in per_task:
                mean, std, n, _ = per_task[t]
                cells.append(f"{100 * mean:.1f}" + (f" ±{100 * std:.1f} (n={n})" if n > 1 else ""))
            else:
                cells.append("–")
        complete = all(t in per_task for t in tasks)
        avg = float(np.mean([per_task[t][0] for t in tasks])) if complete else None
        if variant == "teacher":
            teacher_avg = avg
        cells.append(f"{100 * avg:.2f}" if avg is not None else "–")
        cells.append(f"{100 * avg / teacher_avg:.1f}%" if avg is not None and teacher_avg else "–")
        cells.append(f"{sum(v[3] for v in per_task.values()):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    path = args.out / args.results_name
    results = load_results(path)
    if not args.report:
        import torch

        logging.info("torch threads: %d", torch.get_num_threads())
        # Seed-major: every task's first seed before any task's second, so a cut-short run
        # still has a whole table.
        for i, seed in enumerate(seeds):
            for task in tasks:
                if i == 0 or task in SEEDED_TASKS or args.seed_all_tasks:
                    run_task_seed(task, seed, args, results, path)
    print(summarize(load_all_results(args.out), tasks))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
