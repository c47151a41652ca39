"""Peak memory of ``compress()`` on SmolLM2-135M, with the layers a stage replaces freed as they
are replaced (what compress() does) and held until it returns (what it did before stop 60: its
checks' view of the model and the saved train/eval modes kept every original module alive).

    python benchmarks/bench_compress_memory.py [--recipe llama_w4a16_gptq_g128]

Each case runs in a fresh process, in one run on one machine; its resident memory is sampled
every 5 ms while ``compress()`` runs (after loading, whose own peak would hide it) and its peak
reported beside the resident memory when compress() starts:

* *offloaded*: every block on disk (``device_map``, ``offload_folder``), the embeddings, final
  norm and head in memory: the layerwise runner loads one block at a time, quantizes it, and
  keeps it in memory quantized;
* *float16*: the float16 model in memory, which ``compress()`` casts to float32 for its passes
  on a CPU without a float16 matrix multiply (``hfcompress.upcast``).

Calibration: 16 windows of 256 tokens of WikiText-2 validation (seed 0).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


class PeakRSS:
    """The peak resident memory of this process while the ``with`` block runs (sampled)."""

    def __enter__(self) -> PeakRSS:
        import psutil

        self._process = psutil.Process()
        self.start = self.peak = self._process.memory_info().rss
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(0.005):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def child(case: str, hold: bool, recipe: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    import hfcompress
    from hfcompress.models import load_tokenizer, resolve_model_path

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_half_models import SMOKE_CALIBRATION

    path = resolve_model_path("smollm2-135m")
    tokenizer = load_tokenizer("smollm2-135m")
    with tempfile.TemporaryDirectory() as offload:
        if case == "offloaded":
            device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
            device_map |= {f"model.layers.{i}": "disk" for i in range(30)}
            model = AutoModelForCausalLM.from_pretrained(path, device_map=device_map, offload_folder=offload)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16)
        held = list(model.modules()) if hold else []  # as compress() held them before stop 60
        start = time.perf_counter()
        with PeakRSS() as rss:
            hfcompress.compress(model, recipe, tokenizer=tokenizer, progress=False, **SMOKE_CALIBRATION)
        seconds = time.perf_counter() - start
        del held
    return {"start_mb": rss.start / 2**20, "peak_mb": rss.peak / 2**20, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="llama_w4a16_gptq_g128", help="a shipped recipe, by name")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "HOLD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        case, hold = args.child
        print(json.dumps(child(case, hold == "hold", args.recipe)))
        return

    rows = []
    for case in ("offloaded", "float16"):
        for hold in ("hold", "free"):
            out = subprocess.run(
                [sys.executable, __file__, "--recipe", args.recipe, "--child", case, hold],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            row = json.loads(out.strip().splitlines()[-1])
            rows.append((case, hold, row))
            print(case, hold, row, flush=True)

    import torch

    from hfcompress.eval.speed import cpu_name

    machine = f"{cpu_name()}, torch {torch.__version__}"
    print(f"\n### Peak memory of compress(), `{args.recipe}` on SmolLM2-135M ({machine})\n")
    print("| model | replaced layers | resident at the start (MiB) | peak in compress() (MiB) | compress (s) |")
    print("|---|---|---:|---:|---:|")
    for case, hold, row in rows:
        label = "held until compress() returns" if hold == "hold" else "freed as replaced"
        print(f"| {case} | {label} | {row['start_mb']:.0f} | {row['peak_mb']:.0f} | {row['seconds']:.0f} |")


if __name__ == "__main__":
    main()
