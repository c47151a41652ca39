"""SmolLM2-135M with the quantized KV cache under ``torch.compile``: what compiling costs and
gains, measured in one run.

    python benchmarks/bench_kv_compile.py [--recipe recipes/llama_w4a16_kv4.yaml] [--tokens 300]
        [--rounds 3] [--new-tokens 200]

1. Greedy ``generate`` of --tokens tokens, eager, then with
   ``model.forward = torch.compile(model.forward)``: the first compiled call's wall time
   (tracing and compiling included), whether the tokens are the eager ones, and how many graphs
   Dynamo made and where it broke them. --tokens 300 runs well past the cache's full-precision
   window (16 sinks and 128 recent tokens in the recipe), so the packed part is stored and read.
2. Decode tokens/s eager and compiled (``hfcompress.eval.decode_speed``: --new-tokens after a
   short prompt, so that 200 tokens also reach the packed part), alternating, one measurement
   of each per round, median over --rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch._dynamo
from torch._dynamo.utils import counters

import hfcompress
from hfcompress.eval import decode_speed
from hfcompress.eval.speed import cpu_name
from hfcompress.models import load_model, load_tokenizer

PROMPT = "The history of the city begins in"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="recipes/llama_w4a16_kv4.yaml")
    parser.add_argument("--tokens", type=int, default=300, help="tokens of the compared generation")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=200, help="tokens per decode-speed measurement")
    args = parser.parse_args()
    # The prefill and the first decode steps each make a graph; before the cache's operators
    # every cache size did, and a limit of 8 would have hidden that behind eager fallbacks.
    torch._dynamo.config.recompile_limit = torch._dynamo.config.accumulated_recompile_limit = 256

    model = load_model("smollm2-135m")
    tokenizer = load_tokenizer("smollm2-135m")
    hfcompress.compress(model, args.recipe, progress=False)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    gen = dict(max_new_tokens=args.tokens, do_sample=False)
    with torch.no_grad():
        want = model.generate(ids, **gen)
        compiled = torch.compile(model.forward)
        model.forward = compiled
        counters.clear()
        start = time.perf_counter()
        got = model.generate(ids, **gen)
        first = time.perf_counter() - start
        del model.forward
    breaks = sum(counters["graph_break"].values())
    graphs = counters["stats"]["unique_graphs"]

    rates: dict[str, list[float]] = {"eager": [], "torch.compile": []}
    for _ in range(args.rounds):
        for label in rates:
            if label == "torch.compile":
                model.forward = compiled
            try:
                rates[label].append(
                    decode_speed(model, tokenizer, new_tokens=args.new_tokens, repeats=1).tokens_per_second
                )
            finally:
                if label == "torch.compile":
                    del model.forward
    eager, fast = (statistics.median(rates[k]) for k in rates)
    graphs_after = counters["stats"]["unique_graphs"]  # the speed runs' prompts add a prefill graph

    print(f"machine: {cpu_name()}, {torch.get_num_threads()} threads; torch {torch.__version__}")
    print(f"recipe {args.recipe}; {args.tokens} greedy tokens after {ids.shape[1]} prompt tokens\n")
    print("| | value |\n|---|---|")
    print(f"| first compiled generate (tracing and compiling included) | {first:.1f} s |")
    print(f"| compiled tokens equal to eager | {torch.equal(got, want)} |")
    print(f"| graphs / graph breaks | {graphs} / {breaks} (after the speed runs: {graphs_after} graphs) |")
    print(f"| decode tokens/s eager (median of {args.rounds}) | {eager:.1f} {[round(r, 1) for r in rates['eager']]} |")
    print(
        f"| decode tokens/s compiled | {fast:.1f} {[round(r, 1) for r in rates['torch.compile']]} "
        f"({fast / eager:.2f}x eager) |"
    )


if __name__ == "__main__":
    main()
