"""Shipped recipes on SmolLM2-135M loaded in float32 and in float16 (or bfloat16), side by side
in one run: compression time and perplexity, and whether each came back in its own dtype.

    python benchmarks/bench_half_models.py [--dtype float16] [--recipes a b ...] [--native]

On a CPU without a float16 matrix multiply (most: oneDNN needs AVX-512-FP16 or AMX-FP16) a
float16 model's calibration passes and training steps run in float32 and the model is cast back
(``hfcompress.upcast``). ``--native`` also runs each recipe with the passes in the model's own
dtype, as before that existed (by telling hfcompress the dtype is fast here), to show what the
cast saves.

Protocol: 16 calibration windows of 256 tokens of WikiText-2 validation
(seed 0); perplexity on the first 6 windows of 512 tokens of WikiText-2 test, in the model's dtype.
"""

from __future__ import annotations

import argparse
import time

DEFAULT = ["llama_w8a8_dynamic_smoothquant", "llama_mixed_3.5bpw_gptq", "llama_w4a16_gptq_g128"]
# The smoke runs' calibration (bench_compress_memory.py uses it too).
SMOKE_CALIBRATION = {"calibration_data": "wikitext2:valid", "num_calibration_samples": 16, "calibration_seq_len": 256}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--recipes", nargs="+", default=DEFAULT, help="shipped recipes, by name")
    parser.add_argument("--native", action="store_true", help="also run the passes in the model's dtype")
    args = parser.parse_args()

    import torch

    import hfcompress
    import hfcompress.layerwise as layerwise
    from hfcompress.data import load_text
    from hfcompress.eval import perplexity
    from hfcompress.eval.speed import cpu_name
    from hfcompress.models import load_model, load_tokenizer

    half = getattr(torch, args.dtype)
    tokenizer = load_tokenizer("smollm2-135m")
    tokens = tokenizer(load_text("wikitext2:test"), return_tensors="pt", add_special_tokens=False).input_ids[0]
    base = load_model("smollm2-135m")

    def ppl(model) -> float:
        return perplexity(model, tokens, seq_len=512, max_windows=6, progress=False).perplexity

    probe = f"native_{args.dtype}"  # layerwise.native_float16 / native_bfloat16
    fast = getattr(layerwise, probe)
    print(f"{args.dtype} matmul native here: {fast('cpu')}", flush=True)
    print(f"float32 model: {ppl(base):.3f}; {args.dtype} model: {ppl(base.to(half)):.3f}", flush=True)
    base.float()

    rows = []
    runs = [("float32", torch.float32, False), (args.dtype, half, False)]
    if args.native:
        runs.append((f"{args.dtype}, passes in {args.dtype}", half, True))
    for name in args.recipes:
        for label, dtype, native in runs:
            model = load_model("smollm2-135m").to(dtype)
            if native:
                setattr(layerwise, probe, lambda device_type: True)
            try:
                start = time.perf_counter()
                hfcompress.compress(model, name, tokenizer=tokenizer, progress=False, **SMOKE_CALIBRATION)
                seconds = time.perf_counter() - start
            finally:
                setattr(layerwise, probe, fast)
            dtypes = sorted(str(d).removeprefix("torch.") for d in {p.dtype for p in model.parameters()})
            rows.append((name, label, ppl(model), seconds, "/".join(dtypes)))
            print(rows[-1], flush=True)
            del model

    print(f"\n### Recipes on a {args.dtype} SmolLM2 ({cpu_name()}, torch {torch.__version__})\n")
    print("| recipe | model | perplexity | compress (s) | parameters after |")
    print("|---|---|---:|---:|---|")
    for name, label, value, seconds, dtypes in rows:
        print(f"| `{name}` | {label} | {value:.3f} | {seconds:.0f} | {dtypes} |")


if __name__ == "__main__":
    main()
