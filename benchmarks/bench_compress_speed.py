"""compress() time and peak memory of shipped recipes on SmolLM2-135M, an earlier revision of
hfcompress against the working tree, alternating in one run on one machine.

    python benchmarks/bench_compress_speed.py --base ed751d4 \\
        --recipes llama_w4a16_gptq_g128 llama_mixed_3.5bpw_gptq --rounds 2

The base revision is checked out into a temporary git worktree; each run is a fresh process
whose ``hfcompress`` is imported from one tree or the other (``PYTHONPATH``), on the float32
model, with the smoke calibration of ``bench_half_models.py`` (16 windows of 256 tokens of
WikiText-2 validation, seed 0: it needs ``HFCOMPRESS_DATA_DIR`` or the Hub). Resident memory
is sampled every 5 ms during ``compress()``. A checksum of the compressed model's tensors tells
whether both trees produced the same model. (Stop 61's table in RESULTS.md was measured with a
draft of this script.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(recipe: str) -> dict:
    import torch

    import hfcompress
    from hfcompress.models import load_model, load_tokenizer

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_compress_memory import PeakRSS
    from bench_half_models import SMOKE_CALIBRATION

    model, tokenizer = load_model("smollm2-135m"), load_tokenizer("smollm2-135m")
    start = time.perf_counter()
    with PeakRSS() as rss:
        hfcompress.compress(model, recipe, tokenizer=tokenizer, progress=False, **SMOKE_CALIBRATION)
    seconds = time.perf_counter() - start
    tensors = [t for t in model.state_dict().values() if t.is_floating_point() or t.dtype == torch.uint8]
    checksum = sum(t.double().sum().item() for t in tensors)
    return {"seconds": seconds, "peak_mb": rss.peak / 2**20, "checksum": checksum, "module": hfcompress.__file__}


def run(tree: Path, recipe: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run(
        [sys.executable, __file__, "--child", recipe], cwd=tree, env=env, check=True, capture_output=True, text=True
    ).stdout
    row = json.loads(out.strip().splitlines()[-1])
    if not Path(row["module"]).resolve().is_relative_to(tree.resolve()):
        raise RuntimeError(f"the run for {tree} imported hfcompress from {row['module']}")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="HEAD~1", help="the git revision to compare the working tree with")
    parser.add_argument("--recipes", nargs="+", default=["llama_w4a16_gptq_g128"], help="shipped recipes, by name")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each tree per recipe, alternating")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return

    results: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(base), args.base], check=True)
        try:
            for recipe in args.recipes:
                for _ in range(args.rounds):
                    for label, tree in (("base", base), ("working tree", ROOT)):
                        row = run(tree, recipe)
                        results.setdefault((recipe, label), []).append(row)
                        print(recipe, label, row, flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=True)

    import torch

    from hfcompress.eval.speed import cpu_name

    machine = f"{cpu_name()}, torch {torch.__version__}"
    print(f"\n### compress() on SmolLM2-135M, {args.base} against the working tree ({machine})\n")
    print("| recipe | base: compress (s) | ours: compress (s) | base: peak (MiB) | ours: peak (MiB) | same tensors |")
    print("|---|---:|---:|---:|---:|---|")
    for recipe in args.recipes:
        old, new = results[(recipe, "base")], results[(recipe, "working tree")]

        def cells(rows: list[dict], key: str, fmt: str) -> str:
            return ", ".join(format(r[key], fmt) for r in rows)

        same = {r["checksum"] for r in old} == {r["checksum"] for r in new} and len({r["checksum"] for r in old}) == 1
        print(
            f"| `{recipe}` | {cells(old, 'seconds', '.1f')} | {cells(new, 'seconds', '.1f')} | "
            f"{cells(old, 'peak_mb', '.0f')} | {cells(new, 'peak_mb', '.0f')} | {'yes' if same else 'no'} |"
        )


if __name__ == "__main__":
    main()
