"""CPU decode speed and perplexity of SmolLM2-135M: fp32 vs W8 vs W4 vs W3, measured in one run.

    python benchmarks/bench_decode.py [--windows 40] [--rounds 3] [--new-tokens 64] [--decode-kernel-off]
        [--batch 8] [--compile]

Every variant is built from the same fp32 model in this process; decode speed is measured
round-robin (one measurement of each variant per round, median over rounds) so that machine
drift hits all variants alike. Perplexity: WikiText-2 test, first --windows windows of 512
tokens (the README's protocol). Prints a markdown table for benchmarks/RESULTS.md.

``--decode-kernel-off`` adds rows for the 3-, 4- and 8-bit variants decoding without
``decode_cpu.c``'s decode kernel (on CPUs with AVX-512 BF16), timed in the same rounds: 8 and 4
bits on torch's int8 and int4 ops, 3 bits on the reference kernel (which dequantizes the weight
every call).

``--compile`` adds each variant again with ``model.forward = torch.compile(model.forward)``,
timed in the same rounds (the first, untimed, call compiles). Every ``QuantLinear`` is then one
``hfcompress::quant_linear`` op in the graph (:mod:`hfcompress.quant.compiled`); the Python
between the layers runs as compiled code.

``--batch B`` (B > 1) adds a second table: every variant decoding B sequences side by side
(each step runs B rows through each layer), and, on CPUs with AMX, each quantized variant again
with the AMX bfloat16 kernel serving only from ``AMX_MIN_ROWS`` rows (the routing before it took
weight-only calls from ``AMX_BF16_MIN_ROWS``; fewer rows then go to the decode kernel or torch's
ops), in the same rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import statistics
from collections.abc import Callable, Iterator
from unittest import mock

import torch
import torch._dynamo
from tqdm.auto import tqdm

import hfcompress
from hfcompress.data import load_text
from hfcompress.eval import decode_speed, perplexity, size_report
from hfcompress.eval.speed import cpu_name
from hfcompress.models import load_model, load_tokenizer
from hfcompress.quant import cpu_decode, cpu_w8a8

KERNEL_OFF = {"W8": ", torch's int8 op", "W4": ", torch's int4 op", "W3": ", reference kernel"}
BATCH_OFF = ", AMX from 16 rows"
COMPILED = ", torch.compile"

VARIANTS = {
    "fp32": None,
    "W8 per-channel (sym)": "recipes/llama_w8a16_rtn.yaml",
    "W4 g128 (asym)": "recipes/smollm2_w4a16_rtn_g128.yaml",
    "W4 g128 + lm_head W8": "recipes/smollm2_w4a16_rtn_g128_head_w8.yaml",
    "W4 g128 + embeddings W8 (shared with lm_head)": "recipes/smollm2_w4a16_rtn_g128_emb8.yaml",
    "W4 g128 + embeddings W4 g64 (shared with lm_head)": hfcompress.Recipe(
        [
            hfcompress.RTNConfig(bits=4, group_size=128),
            hfcompress.EmbeddingQuantConfig(bits=4, group_size=64, symmetric=False),
        ]
    ),
    "W3 g128 (asym)": hfcompress.Recipe([hfcompress.RTNConfig(bits=3, group_size=128)]),
}


@contextlib.contextmanager
def _compiled(model, forward) -> Iterator[None]:
    """``model`` running ``forward`` (its compiled forward) inside the context."""
    model.forward = forward
    try:
        yield
    finally:
        del model.forward  # the instance attribute: the class's forward again


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--decode-kernel-off", action="store_true", help="also time W4 on torch's int4 op")
    parser.add_argument("--batch", type=int, default=1, help="also time decoding this many sequences at once")
    parser.add_argument("--compile", action="store_true", help="also time each variant under torch.compile")
    args = parser.parse_args()
    if args.batch < 1:
        parser.error(f"--batch {args.batch}: give 1 (no batched table) or more sequences")

    base = load_model("smollm2-135m")
    tokenizer = load_tokenizer("smollm2-135m")
    models = {}
    for label, recipe in VARIANTS.items():
        model = copy.deepcopy(base)
        if recipe is not None:
            hfcompress.compress(model, recipe, progress=False)
        models[label] = model

    tokens = tokenizer(load_text("wikitext2:test"), return_tensors="pt", add_special_tokens=False).input_ids[0]
    ppl = {
        label: perplexity(m, tokens, seq_len=512, max_windows=args.windows, progress=False).perplexity
        for label, m in tqdm(models.items(), desc="perplexity")
    }
    timed = {label: (label, contextlib.nullcontext) for label in models}
    if args.decode_kernel_off:
        for label in [label for label in models if label[:2] in KERNEL_OFF]:
            if int(label[1]) not in cpu_decode.decode_bits():
                continue  # no kernel for this width here: the row would time the same path twice
            off = label + (", torch's int4 and int8 ops" if "lm_head W8" in label else KERNEL_OFF[label[:2]])
            timed[off] = (label, lambda: mock.patch.object(cpu_decode, "decode_forward", lambda *a: None))
            ppl[off] = ppl[label]  # 512-token windows: the prefill paths, unchanged
    if args.compile:
        # Each model is its own set of guards on the same code objects (prefill, decode, growing
        # caches): past Dynamo's default of 8 the later variants would run uncompiled.
        torch._dynamo.config.recompile_limit = torch._dynamo.config.accumulated_recompile_limit = 256
        for label in list(models):
            timed[label + COMPILED] = (
                label,
                functools.partial(_compiled, models[label], torch.compile(models[label].forward)),
            )
            ppl[label + COMPILED] = ppl[label]  # perplexity: the eager model's
    batched: dict[str, tuple[str, Callable]] = {}
    if args.batch > 1:
        batched = {label: (label, contextlib.nullcontext) for label in models}
        if cpu_w8a8.amx_available():
            for label in [label for label in models if label != "fp32"]:
                batched[label + BATCH_OFF] = (
                    label,
                    lambda: mock.patch.object(cpu_w8a8, "AMX_BF16_MIN_ROWS", cpu_w8a8.AMX_MIN_ROWS),
                )
    rates: dict[str, list[float]] = {label: [] for label in timed}
    batch_rates: dict[str, list[float]] = {label: [] for label in batched}
    for _ in tqdm(range(args.rounds), desc="decode rounds"):
        for label, (model_label, context) in timed.items():
            with context():
                result = decode_speed(models[model_label], tokenizer, new_tokens=args.new_tokens, repeats=1)
            rates[label].append(result.tokens_per_second)
        for label, (model_label, context) in batched.items():
            with context():
                result = decode_speed(
                    models[model_label], tokenizer, new_tokens=args.new_tokens, repeats=1, batch=args.batch
                )
            batch_rates[label].append(result.tokens_per_second)

    # Measure every variant on the layers W4 quantized (all Linear layers but lm_head).
    w4_layers = [n for n, m in models["W4 g128 (asym)"].named_modules() if isinstance(m, hfcompress.QuantLinear)]
    print(f"\nCPU: {cpu_name()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(f"Decode: greedy, batch 1, {args.new_tokens} new tokens, median of {args.rounds} round-robin rounds")
    print(f"Perplexity: WikiText-2 test, first {args.windows} windows of 512 tokens\n")
    print("| variant | model bytes | bits/weight (decoder Linear) | perplexity | decode tok/s | vs fp32 |")
    print("|---|---|---|---|---|---|")
    fp32_rate = statistics.median(rates["fp32"])
    for label, (model_label, _) in timed.items():
        size = size_report(models[model_label], w4_layers)
        rate = statistics.median(rates[label])
        print(
            f"| {label} | {size.total_bytes / 1e6:.1f} MB | {size.bits_per_weight:.2f} | {ppl[label]:.3f} "
            f"| {rate:.1f} | {rate / fp32_rate:.2f}x |"
        )
    if batched:
        print(f"\nBatched decode: {args.batch} sequences side by side, tokens/s over all of them\n")
        print("| variant | decode tok/s | vs fp32 |")
        print("|---|---|---|")
        fp32_rate = statistics.median(batch_rates["fp32"])
        for label, values in batch_rates.items():
            rate = statistics.median(values)
            print(f"| {label} | {rate:.1f} | {rate / fp32_rate:.2f}x |")


if __name__ == "__main__":
    main()
