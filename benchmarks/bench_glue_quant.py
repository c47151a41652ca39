"""Weight-only quantization of MiniLM GLUE classifiers: dev scores of fp32 vs W4 g128 by method.

    hfcompress eval glue --model minilm-l6 --tasks sst2,mrpc,stsb --finetune --bf16 \\
        --learning-rate 1e-4 --output-dir outputs/glue                 # the fp32 classifiers
    python benchmarks/bench_glue_quant.py --glue-models 'outputs/glue/minilm-l6-{task}'

Every Linear layer but the classifier becomes W4 g128 (asymmetric, fp16 scales, uint8 zeros;
MiniLM's 384 and 1536 inputs split into 3 and 12 groups). The calibrated methods see
``--samples`` windows of 64 tokens drawn from the task's first 256 training examples (the
dev set is never seen). GPTQ runs with act-order and the clip search (our best settings, as in
bench_gptq.py); ``lr-light`` is learned rounding started from that GPTQ (50 steps of 4 windows).
One JSON line per row, then a markdown table of dev scores x100 with the change from fp32.
"""

from __future__ import annotations

import argparse
import json
import time

import hfcompress
from hfcompress.glue import evaluate_glue
from hfcompress.glue.data import load_glue
from hfcompress.glue.harness import load_glue_model

GRID = {"bits": 4, "group_size": 128, "ignore": ["classifier"]}
BEST_GPTQ = {"act_order": True, "clip_search": True}
METHODS = {
    "rtn": lambda: hfcompress.RTNConfig.from_dict(GRID),
    "gptq": lambda: hfcompress.GPTQConfig.from_dict({**GRID, **BEST_GPTQ}),
    "lr-light": lambda: hfcompress.LearnedRoundingConfig.from_dict({**GRID, "steps": 50, "batch_size": 4}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--glue-models", default="outputs/glue/minilm-l6-{task}")
    parser.add_argument("--tasks", nargs="+", default=["sst2", "mrpc", "stsb"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--samples", type=int, default=128, help="calibration windows of 64 tokens")
    parser.add_argument("--data-dir", default=None, help="GLUE folder or nyu-mll/glue (default: the harness's)")
    args = parser.parse_args()
    rows = []
    for task in args.tasks:
        path = args.glue_models.format(task=task)
        train = load_glue(task, "train", args.data_dir, limit=256)
        texts = [" ".join(str(row[c]) for c in ("text_a", "text_b") if c in row) for row in train]
        for method in ["fp32", *args.methods]:
            model, tokenizer = load_glue_model(path, task)
            start = time.perf_counter()
            if method != "fp32":
                hfcompress.compress(
                    model,
                    [METHODS[method]()],
                    tokenizer=tokenizer,
                    calibration_data=texts,
                    num_calibration_samples=args.samples,
                    calibration_seq_len=64,
                    progress=False,
                )
            wall = time.perf_counter() - start
            result = evaluate_glue(model, tokenizer, task, source=args.data_dir)[0]
            rows.append(
                {"task": task, "method": method, "score": result.main, "metrics": result.metrics, "wall_s": wall}
            )
            print(json.dumps(rows[-1]), flush=True)
    print("\n| task | fp32 | " + " | ".join(args.methods) + " |\n|---|---|" + "---|" * len(args.methods))
    for task in args.tasks:
        scores = {r["method"]: 100 * r["score"] for r in rows if r["task"] == task}
        cells = " | ".join(f"{scores[m]:.1f} ({scores[m] - scores['fp32']:+.1f})" for m in args.methods)
        print(f"| {task} | {scores['fp32']:.1f} | {cells} |")


if __name__ == "__main__":
    main()
