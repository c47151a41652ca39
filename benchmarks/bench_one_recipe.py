"""Every kind of technique in one recipe on SmolLM2-135M, stage by stage, in one run:
``recipes/llama_w4a8_sparse50_kv4.yaml`` (rotated GPTQ W4 g128 weights, dynamic int8 inputs,
block-sparse attention at 50% density, a 4-bit KV cache) compressed in one ``compress()``
call, saved, reloaded by ``from_pretrained``; then its attention patches switched off and on
again to score each addition, beside the float model with each patch alone.

    python benchmarks/bench_one_recipe.py [--samples 128] [--windows 3]

Columns (WikiText-2 test; float32 compute):

* *512 x 40*: the README protocol, the first 40 windows of 512 tokens, teacher-forced.
* *2048 x N*: the first ``--windows`` windows of 2048 tokens, teacher-forced (the block-sparse
  protocol): every forward is a whole sequence, so block-sparse attention is on and the KV
  cache plays no part.
* *through the cache*: the same windows fed through the model's cache, a prefill of
  ``--prefill`` tokens then chunks of 64 tokens, each attending to everything earlier (the
  quantized part of the cache included). The prefill is block-sparse where that patch is on;
  the chunks attend densely over the cache.
* *linear MB*: bytes of the decoder's Linear layers (scales and zero points included);
  *KV bytes*: the cache's bytes after a 2048-token window, against a float32 DynamicCache.

Calibration: ``--samples`` windows of 512 tokens of WikiText-2 validation (seed 0).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "llama_w4a8_sparse50_kv4.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=128, help="calibration windows of 512 tokens")
    parser.add_argument("--windows", type=int, default=3, help="test windows of 2048 tokens")
    parser.add_argument("--prefill", type=int, default=1024, help="through the cache: prefill tokens")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_kv import perplexity_through_cache

    import hfcompress
    from hfcompress.data import load_text
    from hfcompress.eval import perplexity
    from hfcompress.eval.size import size_report
    from hfcompress.eval.speed import cpu_name
    from hfcompress.integrations.kv_cache import QuantizedKVCache, disable_kv_cache, enable_kv_cache, kv_config
    from hfcompress.models import load_model, load_tokenizer
    from hfcompress.recipe import Recipe
    from hfcompress.techniques.block_sparse.attention import (
        disable_block_sparse,
        enable_block_sparse,
        kept_density,
        sparse_config,
    )

    torch.manual_seed(0)
    recipe = Recipe.from_yaml(RECIPE)
    tokenizer = load_tokenizer("smollm2-135m")
    tokens = tokenizer(load_text("wikitext2:test"), return_tensors="pt", add_special_tokens=False).input_ids[0]
    length = 2048

    def cache_bytes(cache) -> int:
        if isinstance(cache, QuantizedKVCache):
            return cache.nbytes()
        return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))

    def through_cache(model) -> tuple[float, int]:
        """bench_kv's perplexity through the cache, and the bytes of the last window's cache."""
        caches = []

        def make():
            spec = kv_config(model)
            caches.append(QuantizedKVCache(model.config, spec=spec) if spec else DynamicCache(config=model.config))
            return caches[-1]

        ppl = perplexity_through_cache(model, tokens, make, args.windows, length=length, prefill=args.prefill)
        return ppl, cache_bytes(caches[-1])

    rows: list[tuple[str, dict]] = []

    def score(label: str, model, names: list[str]) -> None:
        start = time.perf_counter()
        row = {
            "512": perplexity(model, tokens, seq_len=512, max_windows=40, progress=False).perplexity,
            "2048": perplexity(model, tokens, seq_len=length, max_windows=args.windows, progress=False).perplexity,
        }
        row["cache"], row["kv_bytes"] = through_cache(model)
        row["density"] = kept_density(model) if sparse_config(model) is not None else None
        row["linear_mb"] = size_report(model, names).layer_bytes / 1e6
        row["seconds"] = time.perf_counter() - start
        rows.append((label, row))
        print(label, {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)

    sparse = next(s.config for s in recipe if s.config.technique == "block_sparse")
    kv = next(s.config for s in recipe if s.config.technique == "kv_cache")

    base = load_model("smollm2-135m")
    names = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    score("fp32", base, names)
    enable_block_sparse(base, sparse)
    score("fp32 + block-sparse 50%", base, names)
    disable_block_sparse(base)
    enable_kv_cache(base, kv)
    score("fp32 + KV4", base, names)
    del base

    model = load_model("smollm2-135m")
    start = time.perf_counter()
    hfcompress.compress(
        model,
        recipe,
        tokenizer=tokenizer,
        calibration_data="wikitext2:valid",
        num_calibration_samples=args.samples,
        calibration_seq_len=512,
        progress=False,
    )
    compress_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as folder:
        hfcompress.save_pretrained(model, Path(folder) / "m", card=False)
        del model
        model = AutoModelForCausalLM.from_pretrained(Path(folder) / "m").eval()
    assert model.config._attn_implementation == "hfcompress_kv" and sparse_config(model) is not None
    disable_kv_cache(model)
    disable_block_sparse(model)
    score("recipe's W4A8 (rotated GPTQ W4 g128 + dynamic A8), patches off", model, names)
    enable_block_sparse(model, sparse)
    score("+ block-sparse 50%", model, names)
    enable_kv_cache(model, kv)
    score("+ KV4: the whole recipe", model, names)

    print(f"\n### Every kind of technique in one recipe ({cpu_name()}, torch {torch.__version__})\n")
    print(
        f"`python benchmarks/bench_one_recipe.py --samples {args.samples} --windows {args.windows} "
        f"--prefill {args.prefill}`; compress() of the whole recipe {compress_s:.0f} s.\n"
    )
    print(
        f"| model | 512 x 40 | 2048 x {args.windows} | through the cache | kept tiles | linear MB | "
        "KV bytes at 2048 |\n|---|---|---|---|---|---|---|"
    )
    ref = rows[0][1]
    for label, row in rows:
        cells = [
            f"{row[k]:.3f} ({100 * (row[k] / ref[k] - 1):+.1f}%)" if row is not ref else f"{row[k]:.3f}"
            for k in ("512", "2048", "cache")
        ]
        density = "-" if row["density"] is None else f"{row['density']:.3f}"
        kv_ratio = f"{row['kv_bytes'] / 1e6:.1f} MB ({row['kv_bytes'] / ref['kv_bytes']:.3f}x)"
        print(f"| {label} | {' | '.join(cells)} | {density} | {row['linear_mb']:.1f} | {kv_ratio} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
