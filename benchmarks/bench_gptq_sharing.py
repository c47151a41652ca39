"""What GPTQ's shared input product saves: q/k/v (and gate/up) read one input tensor, so one
``x^T x`` serves them all. Times GPTQ on SmolLM2-135M with the sharing and with it turned off,
alternating (--rounds each), and checks that both give the same tensors.

    python benchmarks/bench_gptq_sharing.py [--samples 32] [--seq-len 512] [--rounds 2]
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time

import torch

import hfcompress
from hfcompress import GPTQConfig
from hfcompress.data import calibration_samples
from hfcompress.input_stats import InputHessianHooks
from hfcompress.models import load_model, load_tokenizer

_HOOK = InputHessianHooks._hook


HOOK_SECONDS = [0.0]


def _timed(make_inner, share: bool):
    """The hook, timed; with ``share=False`` its identity check is defeated, so every layer
    computes its own product."""

    def make(self, name):
        inner = make_inner(self, name)

        def hook(module, inputs, output):
            start = time.perf_counter()
            if not share:
                self._last = None
            inner(module, inputs, output)
            HOOK_SECONDS[0] += time.perf_counter() - start

        return hook

    return make


def _run(base, ids, share: bool) -> tuple[float, float, dict, tuple[int, int]]:
    model = copy.deepcopy(base)
    HOOK_SECONDS[0] = 0.0
    counts = [0, 0]
    real_remove = InputHessianHooks.remove

    def remove(self):
        counts[0] += self.products
        counts[1] += self.reuses
        real_remove(self)

    InputHessianHooks.remove = remove
    InputHessianHooks._hook = _timed(_HOOK, share)
    try:
        start = time.perf_counter()
        hfcompress.compress(
            model, [GPTQConfig(bits=4, group_size=128, ignore=("lm_head",))], calibration_data=ids, progress=False
        )
        seconds = time.perf_counter() - start
    finally:
        InputHessianHooks._hook = _HOOK
        InputHessianHooks.remove = real_remove
    return seconds, HOOK_SECONDS[0], model.state_dict(), (counts[0], counts[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    base = load_model("smollm2-135m")
    tokenizer = load_tokenizer("smollm2-135m")
    ids = calibration_samples(tokenizer, "wikitext2:valid", num_samples=args.samples, seq_len=args.seq_len)
    times = {True: [], False: []}
    hook_times = {True: [], False: []}
    results = {}
    for _ in range(args.rounds):
        for share in (True, False):
            seconds, hook_seconds, state, counts = _run(base, ids, share)
            times[share].append(seconds)
            hook_times[share].append(hook_seconds)
            results[share] = (state, counts)
    same = all(torch.equal(results[True][0][k], results[False][0][k]) for k in results[True][0])
    print(
        f"SmolLM2-135M GPTQ W4 g128, {args.samples} x {args.seq_len} calibration tokens, "
        f"{torch.get_num_threads()} threads"
    )
    print("| x^T x | products | shared | Hessian hooks (s), median | GPTQ wall (s), median |")
    print("|---|---|---|---|---|")
    for share in (True, False):
        products, reuses = results[share][1]
        label = "shared (main)" if share else "one per layer"
        hooks, wall = statistics.median(hook_times[share]), statistics.median(times[share])
        print(f"| {label} | {products} | {reuses} | {hooks:.1f} | {wall:.1f} |")
    hook_ratio = statistics.median(hook_times[False]) / statistics.median(hook_times[True])
    ratio = statistics.median(times[False]) / statistics.median(times[True])
    print(f"\nspeed-up of sharing: hooks {hook_ratio:.2f}x, whole GPTQ {ratio:.2f}x; identical tensors: {same}")


if __name__ == "__main__":
    main()
