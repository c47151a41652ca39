"""Learned rounding's end-to-end scale pass on two corpora: one learned-rounding run on
SmolLM2-135M, scored on WikiText-2 test and on the GLUE dev sentences before and after the
pass (issue 14: a refinement is kept only if it helps on text that is not WikiText-2).

    python benchmarks/bench_e2e_corpora.py --scheme w4g128 --steps 50 --e2e-steps 64   # the W4 recipe
    python benchmarks/bench_e2e_corpora.py --scheme w3g128 --steps 30 --e2e-steps 56   # the W3 recipe

Protocol: bench_gptq.py's (128 calibration windows x 512 tokens of WikiText-2 validation,
seed 0; the first 40 windows of 512 tokens of each corpus; ``glue`` is
``bench_gptq.glue_dev_text()``). The block-wise stage is ``lr-light`` from GPTAQ with the
recipes' options, but with ``e2e_steps: 0``; the pass is then applied with the functions the
stage calls (``teacher_top_k`` on the first 32 calibration windows of the float model, taken
before quantization; ``tune_scales`` at lr 3e-3), so one quantization gives both rows. With
the pass, the WikiText-2 score equals bench_gptq.py's with ``e2e_steps`` in ``--extra``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scheme", default="w4g128")
    parser.add_argument("--steps", type=int, default=50, help="block-wise learned-rounding steps")
    parser.add_argument("--e2e-steps", type=int, default=64)
    parser.add_argument("--e2e-lr", type=float, default=3e-3)
    parser.add_argument("--e2e-windows", type=int, default=32)
    args = parser.parse_args()

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    import bench_gptq

    from hfcompress.data import calibration_samples
    from hfcompress.models import load_model, load_tokenizer
    from hfcompress.quant.linear import QuantLinear
    from hfcompress.techniques.learned_rounding.scales import teacher_top_k, tune_scales

    torch.manual_seed(0)
    model = load_model("smollm2-135m")
    tokenizer = load_tokenizer("smollm2-135m")
    calibration = calibration_samples(tokenizer, "wikitext2:valid", num_samples=128, seq_len=512, seed=0)
    windows = list(calibration[: args.e2e_windows])
    teacher = teacher_top_k(copy.deepcopy(model), windows, torch.bfloat16)
    extra = {**bench_gptq.BEST_GPTQ, "asym_calibration": True, "steps": args.steps}
    start = time.perf_counter()
    bench_gptq.quantize(model, tokenizer, "lr-light", bench_gptq.SCHEMES[args.scheme], extra)
    block_s = time.perf_counter() - start

    def score(label: str, seconds: float) -> None:
        ppl = bench_gptq.corpus_perplexities(model, tokenizer, ("wikitext2", "glue"))
        row = {"scheme": args.scheme, "model": label, "seconds": round(seconds, 1)}
        print(json.dumps({**row, **{c: round(v, 3) for c, v in ppl.items()}}), flush=True)

    score(f"learned rounding {args.steps} x 4, no pass", block_s)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    start = time.perf_counter()
    tune_scales(
        model, layers, windows, teacher, steps=args.e2e_steps, lr=args.e2e_lr, compute_dtype=torch.bfloat16, seed=0
    )
    score(f"+ {args.e2e_steps} end-to-end steps", time.perf_counter() - start)


if __name__ == "__main__":
    main()
