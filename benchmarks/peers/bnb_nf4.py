"""bitsandbytes NF4 (QLoRA's 4-bit NormalFloat) on SmolLM2-135M under bench_gptq.py's
evaluation protocol: the 4-bit baseline most users already have.

    pip install 'hfcompress[compare]'        # bitsandbytes (its CPU backend suffices)
    python benchmarks/bench_gptq.py --schemes w4g128 --peer bnb=.venv/bin/python

bitsandbytes has one 4-bit layout: NF4 codes in blocks of 64 weights of the flattened matrix,
one float32 absmax per block (4.5 bits per weight; 4.13 with double quantization), so both
4-bit schemes (w4g128, w4pc) run that; 3-bit does not exist there (exit 1, a "failed" row).
Every Linear but lm_head is quantized at load (transformers' BitsAndBytesConfig), computing in
float32. Wall time covers the quantizing load; one JSON line out.
"""

from __future__ import annotations

import json
import resource
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from hfcompress.data import load_text
from hfcompress.eval import perplexity
from hfcompress.models import resolve_model_path


def main(scheme: str) -> None:
    if scheme not in ("w4g128", "w4pc"):
        sys.exit(f"bitsandbytes has no {scheme} format (4-bit NF4 or FP4 in blocks of 64 only)")
    path = resolve_model_path("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.float32,
        llm_int8_skip_modules=["lm_head"],
    )
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu")
    wall = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tokens = tokenizer(load_text("wikitext2:test"), return_tensors="pt", add_special_tokens=False).input_ids[0]
    with torch.no_grad():
        ppl = perplexity(model, tokens, seq_len=512, max_windows=40, progress=False).perplexity
    print(json.dumps({"method": "bnb-nf4", "scheme": scheme, "ppl": ppl, "wall_s": wall, "peak_rss_mb": peak_mb}))


if __name__ == "__main__":
    main(sys.argv[1])
