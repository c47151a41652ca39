"""Block-sparse attention on SmolLM2-135M: WikiText-2 test perplexity at 2048 (and 8192)
tokens per window for each layout and density, against dense attention, in one run.

Layouts: ``local`` (a window of blocks plus one sink block), ``pooled`` (mean-pooled block
scores), ``calibrated`` (per-head mass by block distance, from WikiText-2 valid windows),
``dynamic`` (sampled query rows per block), and ``oracle`` (the true attention mass: a
reference line, as costly as dense). The perplexity path is the torch twin (SDPA over the
expanded mask) in float32 on CPU; the kernel computes the same numbers (tests hold them to
1e-4). The density column is the measured share of the causal tiles kept over every layer and
window, diagonal and sinks included.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

LAYOUTS = ("local", "pooled", "calibrated", "dynamic", "oracle")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=3, help="evaluation windows of --seq-len tokens")
    parser.add_argument("--densities", type=float, nargs="*", default=[0.5, 0.25, 0.125])
    parser.add_argument("--layouts", nargs="*", default=list(LAYOUTS), choices=LAYOUTS)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--scope", choices=("row", "head"), default="head")
    parser.add_argument("--samples", type=int, default=8, help="dynamic: query rows sampled per block")
    parser.add_argument("--calib", type=int, default=8, help="calibrated: WikiText-2 valid windows of --seq-len")
    parser.add_argument("--jsonl", type=Path, default=None, help="append each row as a JSON line")
    args = parser.parse_args()

    import torch
    from tqdm import tqdm

    from hfcompress.data import calibration_batches, load_text
    from hfcompress.eval import perplexity
    from hfcompress.models import load_model, load_tokenizer
    from hfcompress.techniques.block_sparse.attention import (
        calibrate_tables,
        disable_block_sparse,
        enable_block_sparse,
        kept_density,
    )
    from hfcompress.techniques.block_sparse.config import BlockSparseConfig

    torch.manual_seed(0)
    model = load_model("smollm2-135m")
    tokenizer = load_tokenizer("smollm2-135m")
    tokens = tokenizer(load_text("wikitext2:test"), return_tensors="pt", add_special_tokens=False).input_ids[0]

    def ppl() -> float:
        return perplexity(model, tokens, seq_len=args.seq_len, max_windows=args.windows, progress=False).perplexity

    rows = []

    def emit(row: dict) -> None:
        row = {"seq_len": args.seq_len, "windows": args.windows, "block": args.block, **row}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        if args.jsonl is not None:
            with args.jsonl.open("a") as f:
                f.write(json.dumps(row) + "\n")

    start = time.perf_counter()
    dense = ppl()
    emit({"layout": "dense", "target": 1.0, "density": 1.0, "ppl": dense, "wall_s": time.perf_counter() - start})
    tables = None
    if "calibrated" in args.layouts:
        config = BlockSparseConfig(layout="calibrated", block_size=args.block)
        batches = calibration_batches(
            "wikitext2:valid", tokenizer, num_samples=args.calib, seq_len=args.seq_len, seed=0, batch_size=1
        )
        start = time.perf_counter()
        tables = calibrate_tables(model, config, batches)
        print(f"calibrated {len(tables)} tables in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    for layout in args.layouts:
        for target in tqdm(args.densities, desc=layout):
            config = BlockSparseConfig(
                layout=layout, density=target, block_size=args.block, scope=args.scope, samples=args.samples
            )
            enable_block_sparse(model, config, tables if layout == "calibrated" else None)
            start = time.perf_counter()
            value = ppl()
            wall = time.perf_counter() - start
            kept = kept_density(model)
            disable_block_sparse(model)
            emit({
                "layout": layout, "scope": args.scope, "target": target,
                "density": kept, "ppl": value, "wall_s": wall,
            })  # fmt: skip
    print("| layout | target density | kept density | perplexity | vs dense |")
    print("|---|---|---|---|---|")
    for r in rows:
        rel = 100 * (r["ppl"] / dense - 1)
        print(f"| {r['layout']} | {r['target']:.3f} | {r['density']:.3f} | {r['ppl']:.3f} | {rel:+.1f}% |")


if __name__ == "__main__":
    main()
