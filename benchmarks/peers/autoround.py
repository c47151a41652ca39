"""Intel AutoRound on SmolLM2-135M under bench_gptq.py's protocol (run in its own env).

    .venv-llmc/bin/pip install auto-round==0.15.1          # beside llm-compressor (see its script)
    .venv-llmc/bin/python benchmarks/peers/autoround.py w4pc [ITERS | light]

Same calibration token windows (hfcompress.data.calibration_samples: 128 x 512 of
wiki.valid.raw), same evaluation function, one JSON line out. ITERS is AutoRound's
sign-gradient steps per block (its default, 200, unless given); ``light`` is its light
recipe (``auto-round-light``: 50 iterations at lr 5e-3, batch 8). Asymmetric integers like ours;
``lm_head`` stays in float. Wall time covers the calibration windows and ``quantize()``; peak
RSS is the process's ``ru_maxrss``. After ``quantize()`` AutoRound has written its rounded
weights back into the float Linear layers (``fake`` quantization), which is what is scored;
the script checks that every weight group holds at most 2**bits distinct values.

AutoRound's CPU default is bfloat16 autocast (``amp=True``): its CPU backend reports bf16
support unconditionally, so on a CPU without a bfloat16 matmul (AVX2 only, where it runs
about 70x slower than float32) it would not fall back as it does on devices it knows lack
bf16. The script passes ``amp=False`` there, which is exactly AutoRound's own fallback, using
the probe our ``compute_dtype: bfloat16`` uses (``hfcompress.layerwise.native_bfloat16``);
the JSON line records which (``"amp"``).
"""

from __future__ import annotations

import json
import resource
import sys
import time

import torch
from auto_round import AutoRound
from transformers import AutoModelForCausalLM, AutoTokenizer

from hfcompress.data import calibration_samples, load_text
from hfcompress.eval import perplexity
from hfcompress.layerwise import native_bfloat16
from hfcompress.models import resolve_model_path

SCHEMES = {"w4g128": (4, 128), "w3g128": (3, 128), "w4pc": (4, -1)}


def _check_rounded(model: torch.nn.Module, bits: int, group_size: int) -> None:
    """Refuse to report a model whose Linear weights were not actually rounded."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
            row = module.weight.detach()[0].float()
            group = row if group_size == -1 else row[:group_size]
            distinct = group.unique().numel()
            if distinct > 2**bits:
                raise SystemExit(f"{name}: {distinct} distinct values in a group: AutoRound did not round it")


def main(scheme: str, iters: int, lr: float | None = None) -> None:
    bits, group_size = SCHEMES[scheme]
    path = resolve_model_path("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    start = time.perf_counter()
    ids = calibration_samples(tokenizer, "wikitext2:valid", num_samples=128, seq_len=512, seed=0)
    batches = [ids[i : i + 8] for i in range(0, ids.shape[0], 8)]
    amp = native_bfloat16("cpu")  # AutoRound's fallback where bf16 is emulated (see the docstring)
    rounder = AutoRound(
        model,
        tokenizer,
        bits=bits,
        group_size=group_size,
        sym=False,
        dataset=batches,
        nsamples=ids.shape[0],
        seqlen=ids.shape[1],
        batch_size=8,
        iters=iters,
        lr=lr,
        device_map="cpu",
        amp=amp,
    )
    quantized, _ = rounder.quantize()
    wall = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    _check_rounded(quantized, bits, group_size)
    tokens = tokenizer(load_text("wikitext2:test"), return_tensors="pt", add_special_tokens=False).input_ids[0]
    with torch.no_grad():
        ppl = perplexity(quantized.float(), tokens, seq_len=512, max_windows=40, progress=False).perplexity
    method = "autoround" if iters == 200 and lr is None else f"autoround (iters={iters}, lr={lr or 1 / iters:g})"
    print(
        json.dumps({"method": method, "scheme": scheme, "ppl": ppl, "wall_s": wall, "peak_rss_mb": peak_mb, "amp": amp})
    )


if __name__ == "__main__":
    setting = sys.argv[2] if len(sys.argv) > 2 else "200"
    if setting == "light":  # AutoRound's own light recipe (auto_round/cli/main.py, RECIPES["light"])
        main(sys.argv[1], 50, 5e-3)
    else:
        main(sys.argv[1], int(setting))
