"""Block-sparse attention on all-MiniLM-L6-v2 fine-tuned on GLUE (SST-2, MRPC): dev scores
of the dense model, of the block-sparse model before and after distillation from it.

    python benchmarks/bench_block_sparse_glue.py
    python benchmarks/bench_block_sparse_glue.py --tasks mrpc --layout local

Protocol: per task, the teacher is all-MiniLM-L6-v2 fine-tuned on the task (``hfcompress eval
glue --finetune`` settings of bench_act.py: lr 1e-4, batch 32, bf16 autocast; MRPC 3 epochs
on the full split, SST-2 1 epoch on its first ``--sst2-limit`` examples). The student is the
teacher with block-sparse attention (``--layout``, ``--density``, block ``--block``, one
global CLS block: the first block sees and is seen by every block), then trained on the same
split with the distillation loss (``alpha``: CE and KL at temperature ``--temperature``; with
``--beta``, PKD's patient loss on every layer's CLS state too), all weights learning. The
kept density is measured over the dev forward passes: a sequence of one block runs dense
and counts as fully kept, so short sentences keep far more than the target. Prints JSON
lines and a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["sst2", "mrpc"])
    parser.add_argument("--layout", default="dynamic")
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--block", type=int, default=16)
    parser.add_argument("--epochs", type=float, default=1.0, help="distillation epochs")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument(
        "--beta", type=float, default=0.0,
        help="weight of PKD's patient loss on every layer's CLS state (0: none)",
    )  # fmt: skip
    parser.add_argument("--sst2-limit", type=int, default=8000)
    parser.add_argument(
        "--models", type=Path, default=Path("benchmarks/out/block_sparse_glue"), help="fine-tuned teachers"
    )
    parser.add_argument("--glue-data", default=None)
    args = parser.parse_args()

    import torch

    import hfcompress
    from hfcompress.glue import evaluate_glue, finetune_glue
    from hfcompress.glue.data import load_glue
    from hfcompress.glue.harness import load_glue_model, tokenize_glue
    from hfcompress.integrations.trainer import make_trainer
    from hfcompress.techniques.block_sparse import BlockSparseConfig, enable_block_sparse
    from hfcompress.techniques.block_sparse.attention import kept_density, states

    rows = []

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)

    for task in args.tasks:
        limit = args.sst2_limit if task == "sst2" else None
        epochs = 1.0 if task == "sst2" else 3.0
        path = args.models / f"teacher-{task}"
        start = time.perf_counter()
        if (path / "config.json").exists():
            teacher, tokenizer = load_glue_model(path, task, dtype=torch.float32)
        else:
            teacher, tokenizer = load_glue_model("minilm-l6", task, dtype=torch.float32)
            with tempfile.TemporaryDirectory() as scratch:
                teacher = finetune_glue(
                    teacher, tokenizer, task, output_dir=scratch, source=args.glue_data, epochs=epochs,
                    learning_rate=1e-4, batch_size=32, limit=limit, progress=False, bf16=True,
                )  # fmt: skip
            hfcompress.save_pretrained(teacher, path, tokenizer=tokenizer)
        teacher.eval()
        score = evaluate_glue(teacher, tokenizer, task, source=args.glue_data)[0].main
        emit({"task": task, "model": "dense", "score": score, "seconds": time.perf_counter() - start})

        student = copy.deepcopy(teacher)
        config = BlockSparseConfig(layout=args.layout, density=args.density, block_size=args.block)
        enable_block_sparse(student, config)
        score = evaluate_glue(student, tokenizer, task, source=args.glue_data)[0].main
        emit(
            {"task": task, "model": "sparse", "score": score, "kept_density": kept_density(student), **config.to_dict()}
        )

        train = tokenize_glue(load_glue(task, "train", args.glue_data, limit=limit), tokenizer)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as scratch:
            trainer = make_trainer(
                student, train, tokenizer, output_dir=scratch, teacher=teacher, alpha=args.alpha,
                temperature=args.temperature, epochs=args.epochs, learning_rate=args.lr, batch_size=32,
                bf16=True, progress=False, beta=args.beta,
                layer_pairs=[(i, i) for i in range(student.config.num_hidden_layers)] if args.beta else (),
            )  # fmt: skip
            trainer.train()
        student.eval()
        for state in states(student).values():
            state.kept_tiles = state.total_tiles = 0
        score = evaluate_glue(student, tokenizer, task, source=args.glue_data)[0].main
        emit({"task": task, "model": "sparse + distilled", "score": score, "kept_density": kept_density(student),
              "train_s": time.perf_counter() - start, "epochs": args.epochs, "alpha": args.alpha,
              "temperature": args.temperature, "lr": args.lr, "beta": args.beta})  # fmt: skip

    print("\n| task | dense | block-sparse | after distillation | kept density (dev) |\n|---|---|---|---|---|")
    for task in args.tasks:
        got = {r["model"]: r for r in rows if r["task"] == task}
        d, s, r = (100 * got[k]["score"] for k in ("dense", "sparse", "sparse + distilled"))
        kept = got["sparse"]["kept_density"]
        print(f"| {task} | {d:.1f} | {s:.1f} ({s - d:+.1f}) | {r:.1f} ({r - d:+.1f}) | {kept:.2f} |")


if __name__ == "__main__":
    main()
