"""INT8 activations on SmolLM2-135M and MiniLM: perplexity per scheme and observer, CPU prefill
and decode speed, GLUE, and llm-compressor's SmoothQuant + W8A8 beside ours, in one run.

    python benchmarks/bench_act.py                                  # every section
    python benchmarks/bench_act.py --sections ppl --peer llmcompressor=/tmp/peers/llmc/bin/python
    python benchmarks/bench_act.py --sections ppl --samples 32 --rows fp32 static_smoothquant \
        --peer llmcompressor=/tmp/peers/llmc/bin/python --peer-runs "static 0.7"
    python benchmarks/bench_act.py --sections speed --rounds 5 [--amx-off] [--dense-off] [--vnni-off]
    python benchmarks/bench_act.py --sections layers
    python benchmarks/bench_act.py --sections glue --glue-models 'outputs/glue/minilm-l6-{task}'

Protocol (the README's): calibration windows of 512 tokens of WikiText-2 *validation*
(``--samples``, seed 0; the same token windows for ours and the peer); perplexity on the first
40 windows of 512 tokens of WikiText-2 *test*; ``lm_head`` stays in float everywhere.

* ``ppl``: each row compresses a copy of the fp32 model, then measures perplexity. Rows that
  share their first stages (smoothing and W8 weights; the GPTQ W4 weights) start from one
  copy compressed once; their wall time counts those stages plus their own. The rows that
  name a recipe file run exactly that file's stages.
  ``--peer llmcompressor=PYTHON`` runs ``benchmarks/peers/llmcompressor_w8a8.py`` with that
  interpreter (llm-compressor pins another transformers) right after our rows.
* ``speed``: prefill of one 512-token sequence (logits of the last position, as ``generate``
  computes them) and greedy decode (64 new tokens after a short prompt), tokens/s, for fp32,
  bf16, W8A16, W4A16 g128 (both also in a bfloat16 model, beside bf16 dense), W8A8 and W4A8
  (per channel, the int8 kernel's case; g128, the W4 kernel's), round-robin over ``--rounds``
  rounds, median. ``--amx-off`` adds each compressed row again with the AMX prefill kernels
  switched off (torch's ops and oneDNN, as on CPUs without AMX), on a CPU that has them.
  ``--dense-off`` adds the rows whose many-row calls can dequantize and multiply (no AMX,
  AVX-512 BF16; in bfloat16 or float32, whichever ``cpu_decode.dense_dtype`` found faster)
  again with that switched off: torch's int4 and int8 ops, as before it. ``--vnni-off`` adds the
  grouped W4A8 row again without the VNNI int8 kernel (CPUs with AVX-512 VNNI and no AMX): its
  inputs put on the int8 grid in float and run through the weight-only kernels, as before it.
* ``layers``: one layer per scheme (W8A8, W4A8 g128, W8A16, W4A16 g128) and SmolLM2 shape on 512
  bfloat16 rows, AMX kernels off and on, beside a dense bfloat16 matmul (microseconds).
* ``glue``: MiniLM classifiers fine-tuned on SST-2 and MRPC (``--glue-models``, ``{task}`` in the
  path), fp32 vs W8A8 dynamic (with and without SmoothQuant), dev-set scores.

Writes a JSON file per section to ``--out`` and prints markdown tables for RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

import hfcompress
from hfcompress.data import load_text
from hfcompress.eval import perplexity
from hfcompress.eval.size import total_bytes
from hfcompress.eval.speed import cpu_name
from hfcompress.models import load_model, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
W8 = "{name: weights, technique: rtn, bits: 8, group_size: -1, symmetric: true}"
SQ = "{name: smooth, technique: smoothquant, alpha: 0.5}"
SQ07 = "{name: smooth, technique: smoothquant, alpha: 0.7}"
ROT = "{name: rotate, technique: rotate}"
W4G128 = "{name: weights, technique: rtn, bits: 4, group_size: 128, symmetric: false}"


def _acts(**fields) -> str:
    body = ", ".join(f"{k}: {json.dumps(v)}" for k, v in fields.items())
    return "{name: acts, technique: int8_activations" + (", " + body if body else "") + "}"


def _stages(*stages: str) -> str:
    return "stages:\n" + "".join(f"  - {s}\n" for s in stages)


def _static(observer: str, **extra) -> str:
    return _acts(strategy="tensor", dynamic=False, observer=observer, **extra)


# Models several rows start from: compressed once, copied for each row.
GPTQ_W4 = "recipes/llama_w4a16_gptq_g128.yaml"
PREFIXES = {
    "w8": _stages(W8),
    "sq+w8": _stages(SQ, W8),
    "sq0.7+w8": _stages(SQ07, W8),
    "rot+w8": _stages(ROT, W8),
    "gptq-w4g128": GPTQ_W4,
    # The rotation, then exactly the stages of the GPTQ W4 recipe.
    "rot+gptq-w4g128": _stages(ROT) + (ROOT / GPTQ_W4).read_text().split("stages:\n", 1)[1],
}
# label -> recipe: a path under recipes/, YAML text, None (the float model), or
# (prefix, YAML of the stages added to that prefix's model).
PPL_ROWS = {
    "fp32": None,
    "W8A16 (RTN W8 per channel)": ("w8", None),
    "W8A8 dynamic, no smoothing": ("w8", _stages(_acts())),
    "W8A8 dynamic, SmoothQuant 0.5": ("sq+w8", _stages(_acts())),
    "W8A8 dynamic, SmoothQuant alpha search (llama_w8a8_dynamic_smoothquant.yaml)": (
        "recipes/llama_w8a8_dynamic_smoothquant.yaml"
    ),
    "W8A8 dynamic, rotated (llama_w8a8_dynamic.yaml)": "recipes/llama_w8a8_dynamic.yaml",
    "W8A8 static per-tensor minmax, no smoothing": ("w8", _stages(_static("minmax"))),
    "W8A8 static per-tensor minmax, SmoothQuant 0.5": ("sq+w8", _stages(_static("minmax"))),
    "W8A8 static per-tensor minmax EMA 0.9, SmoothQuant 0.5": ("sq+w8", _stages(_static("minmax", ema=0.9))),
    "W8A8 static per-tensor percentile 99.99, SmoothQuant 0.5": ("sq+w8", _stages(_static("percentile"))),
    "W8A8 static per-tensor MSE, SmoothQuant 0.5": ("sq+w8", _stages(_static("mse"))),
    "W8A8 static per-tensor MSE, SmoothQuant 0.7, observers only": ("sq0.7+w8", _stages(_static("mse"))),
    "W8A8 static per-tensor MSE, SmoothQuant 0.7, scales trained end to end "
    "(llama_w8a8_static_smoothquant.yaml)": "recipes/llama_w8a8_static_smoothquant.yaml",
    "W8A8 static per-tensor MSE, SmoothQuant 0.7, scales trained end to end, 64 steps": (
        "sq0.7+w8",
        _stages(_static("mse", e2e_steps=64, e2e_lr=0.005)),
    ),
    "W8A8 static per-tensor MSE, SmoothQuant 0.7, token_outlier_ratio 20": (
        "sq0.7+w8",
        _stages(_static("mse", token_outlier_ratio=20)),
    ),
    "W8A8 static per-tensor KL, SmoothQuant 0.5": ("sq+w8", _stages(_static("kl"))),
    "W4A16 GPTQ g128 (llama_w4a16_gptq_g128.yaml)": ("gptq-w4g128", None),
    "W8A8 static per-tensor MSE, rotated": ("rot+w8", _stages(_static("mse"))),
    "W4A8: the same GPTQ weights + dynamic A8, not rotated": ("gptq-w4g128", _stages(_acts())),
    "W4A16 GPTQ g128, rotated": ("rot+gptq-w4g128", None),
    "W4A8: the rotated GPTQ weights + dynamic A8 (llama_w4a8_gptq_g128.yaml)": ("rot+gptq-w4g128", _stages(_acts())),
}
PEER_RUNS = [("static", 0.5), ("static", 0.7), ("static", 0.8), ("dynamic", 0.8)]


def _recipe(spec: str | hfcompress.Recipe) -> hfcompress.Recipe:
    if isinstance(spec, hfcompress.Recipe):
        return spec
    if spec.endswith(".yaml"):
        return hfcompress.Recipe.from_yaml(ROOT / spec)
    return hfcompress.Recipe.from_yaml_str(spec)


def _ppl(model, tokens) -> float:
    with torch.no_grad():
        return perplexity(model, tokens, seq_len=512, max_windows=40, progress=False).perplexity


def section_ppl(args) -> list[dict]:
    base = load_model("smollm2-135m")
    tokenizer = load_tokenizer("smollm2-135m")
    tokens = tokenizer(load_text("wikitext2:test"), return_tensors="pt", add_special_tokens=False).input_ids[0]
    kwargs = {
        "tokenizer": tokenizer,
        "calibration_data": "wikitext2:valid",
        "num_calibration_samples": args.samples,
        "calibration_seq_len": 512,
        "seed": 0,
        "progress": False,
    }
    rows, prefixes = [], {}

    def compressed(spec: str) -> tuple[torch.nn.Module, float]:
        model = copy.deepcopy(base)
        start = time.perf_counter()
        hfcompress.compress(model, _recipe(spec), **kwargs)
        return model, time.perf_counter() - start

    selected = {k: v for k, v in PPL_ROWS.items() if not args.rows or any(r in k for r in args.rows)}
    for label, spec in selected.items():
        if spec is None:
            model, wall = base, 0.0
        elif isinstance(spec, tuple):
            prefix, extra = spec
            if prefix not in prefixes:
                prefixes[prefix] = compressed(PREFIXES[prefix])
            model, wall = copy.deepcopy(prefixes[prefix][0]), prefixes[prefix][1]
            if extra is not None:
                start = time.perf_counter()
                hfcompress.compress(model, _recipe(extra), **kwargs)
                wall += time.perf_counter() - start
        else:
            model, wall = compressed(spec)
        rows.append({"method": f"hfcompress {label}", "recipe": spec, "ppl": _ppl(model, tokens), "wall_s": wall})
        print(json.dumps(rows[-1]), flush=True)
    for name, python in args.peer:
        if name != "llmcompressor":
            raise SystemExit(f"unknown peer {name!r}; known: llmcompressor")
        for variant, alpha in PEER_RUNS:
            if args.peer_runs and f"{variant} {alpha}" not in args.peer_runs:
                continue
            script = ROOT / "benchmarks/peers/llmcompressor_w8a8.py"
            out = subprocess.run(
                [python, str(script), variant, str(alpha), str(args.samples)],
                capture_output=True,
                text=True,
                cwd=ROOT,
            )
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
            if out.returncode != 0 or not lines:
                rows.append({"method": f"llm-compressor {variant} {alpha}", "error": out.stderr[-2000:]})
            else:
                rows.append(json.loads(lines[-1]))
            print(json.dumps(rows[-1]), flush=True)
    fp32 = next((r["ppl"] for r in rows if r["method"] == "hfcompress fp32"), None)
    print("\n| method | perplexity | vs fp32 | compress s |\n|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['method']} | fails: {r['error'].strip().splitlines()[-1][:200]} | | |")
            continue
        delta = f"{100 * (r['ppl'] / fp32 - 1):+.2f}%" if fp32 else ""
        print(f"| {r['method']} | {r['ppl']:.3f} | {delta} | {r['wall_s']:.1f} |")
    return rows


# label -> (recipe or None, model dtype)
SPEED_ROWS = {
    "fp32": (None, torch.float32),
    "bf16 dense": (None, torch.bfloat16),
    "W8A16 (RTN W8 per channel)": (_stages(W8), torch.float32),
    "W4A16 (RTN W4 g128, the README demo's)": (_stages(W4G128), torch.float32),
    "W8A16, bf16 model": (_stages(W8), torch.bfloat16),
    "W4A16 g128, bf16 model": (_stages(W4G128), torch.bfloat16),
    "W8A8 dynamic per-token": (_stages(W8, _acts()), torch.float32),
    "W8A8 dynamic per-token, bf16 model": (_stages(W8, _acts()), torch.bfloat16),
    "W8A8 dynamic per-token, rotated (llama_w8a8_dynamic.yaml)": (_stages(ROT, W8, _acts()), torch.float32),
    "W8A8 dynamic per-token, rotated, bf16 model": (_stages(ROT, W8, _acts()), torch.bfloat16),
    "W4A8 per channel, dynamic per-token": (
        _stages("{name: weights, technique: rtn, bits: 4, group_size: -1, symmetric: true}", _acts()),
        torch.float32,
    ),
    "W4A8 g128, dynamic per-token": (_stages(W4G128, _acts()), torch.float32),
}


def _prefill_seconds(model, ids) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        # As generate() prefills: logits for the last position only (SmolLM2's 49k-token
        # lm_head over all 512 positions would otherwise take a third of the time, in float).
        model(ids, use_cache=False, logits_to_keep=1)
    return time.perf_counter() - start


@contextlib.contextmanager
def _amx(on: bool, dense: bool = True, vnni: bool = True):
    """The AMX prefill kernels as found (``on``), or switched off: torch's ops and oneDNN, as
    on a CPU without AMX; ``dense=False`` also switches off the matmul of the dequantized
    weight that serves weight-only calls of many rows without AMX, in bfloat16 or float32
    (``cpu_decode.dense_dtype``): torch's int4 and int8 ops, or the reference for 2 and 3 bits,
    as before it; ``vnni=False`` the VNNI kernel of grouped W4A8 layers without AMX (their
    inputs then put on the int8 grid in float, through the weight-only kernels, as before it)."""
    from hfcompress.quant import cpu_decode, cpu_w8a8

    with contextlib.ExitStack() as stack:
        if not on:
            stack.enter_context(mock.patch.object(cpu_w8a8, "amx_available", lambda: False))
        if not dense:
            stack.enter_context(mock.patch.object(cpu_decode, "dense_dtype", lambda: None))
        if not vnni:
            stack.enter_context(mock.patch.object(cpu_w8a8, "vnni_available", lambda: False))
        yield


# The kernels whose calls of many rows can take the matmul of the dequantized weight.
_DENSE_PATHS = ("cpu_int4", "cpu_int8", "cpu_lowbit", "cpu_int4_a8")


def section_speed(args) -> list[dict]:
    from hfcompress.eval import decode_speed
    from hfcompress.quant import cpu_decode, cpu_w8a8
    from hfcompress.quant.dispatch import select_path

    base = load_model("smollm2-135m")
    tokenizer = load_tokenizer("smollm2-135m")
    text = load_text("wikitext2:test")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[:, 1000:1512]
    models = {}
    for label, (recipe, dtype) in SPEED_ROWS.items():
        model = copy.deepcopy(base)
        if recipe is not None:
            hfcompress.compress(model, _recipe(recipe), progress=False)
        model.to(dtype)
        down = model.model.layers[0].mlp.down_proj
        x = torch.randn(512, down.in_features if hasattr(down, "in_features") else 1536, dtype=model.dtype)
        path = select_path(down, x) if isinstance(down, hfcompress.QuantLinear) else "dense"
        models[label] = (model, path, (True, True))
        if args.amx_off and recipe is not None and cpu_w8a8.amx_available():
            models[f"{label} [AMX off]"] = (model, path, (False, True))
        if args.dense_off and recipe is not None and cpu_decode.dense_available() and path in _DENSE_PATHS:
            models[f"{label} [dense matmul off]"] = (model, path, (cpu_w8a8.amx_available(), False))
        if args.vnni_off and path == "cpu_int4_a8" and cpu_w8a8.vnni_available() and not cpu_w8a8.amx_available():
            models[f"{label} [VNNI kernel off]"] = (model, path, (False, True, False))
    for model, _path, switches in models.values():
        with _amx(*switches):
            _prefill_seconds(model, ids)  # warm-up: kernel packing
    prefill = {label: [] for label in models}
    decode = {label: [] for label in models}
    for _ in range(args.rounds):
        for label, (model, _path, switches) in models.items():
            with _amx(*switches):
                prefill[label].append(ids.shape[1] / _prefill_seconds(model, ids))
                decode[label].append(decode_speed(model, tokenizer, new_tokens=64, repeats=1).tokens_per_second)
    rows = []
    fp32_p, fp32_d = statistics.median(prefill["fp32"]), statistics.median(decode["fp32"])
    print(f"\nCPU: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(
        "\n| model | linear kernel | prefill 512 tok/s | vs fp32 | decode tok/s | vs fp32 |\n|---|---|---|---|---|---|"
    )
    for label, (_model, path, _switches) in models.items():
        p, d = statistics.median(prefill[label]), statistics.median(decode[label])
        rows.append({"model": label, "kernel": path, "prefill_tok_s": p, "decode_tok_s": d, "rounds": args.rounds})
        print(f"| {label} | {path} | {p:.0f} | {p / fp32_p:.2f}x | {d:.1f} | {d / fp32_d:.2f}x |")
    return rows


LAYER_SHAPES = [(1536, 576), (576, 1536), (576, 576)]  # SmolLM2's (N, K): gate/up, down, q/o


def _best_us(fn, repeats: int = 15) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return 1e6 * best


def section_layers(args) -> list[dict]:
    """One QuantLinear per scheme and shape on 512 bfloat16 rows, with the AMX kernels switched
    off and on, beside a dense bfloat16 matmul: microseconds, best of 15 calls. The A8 rows
    include the activations' quantization (each call gets a fresh copy of x, so nothing is
    reused)."""
    from hfcompress.quant.affine import quantize_rtn
    from hfcompress.quant.scheme import QuantArgs, QuantScheme

    act = QuantArgs(num_bits=8, symmetric=True, strategy="token", dynamic=True, observer=None, zp_dtype=None)
    schemes = [
        ("W8A8", 8, -1, True, act),
        ("W4A8 g128", 4, 128, False, act),
        ("W8A16", 8, -1, True, None),
        ("W4A16 g128", 4, 128, False, None),
    ]
    times: dict[str, list[float]] = {}
    for n, k in LAYER_SHAPES:
        x = torch.randn(512, k).bfloat16()
        for name, bits, group_size, symmetric, acts in schemes:
            qw = quantize_rtn(torch.randn(n, k), bits=bits, group_size=group_size, symmetric=symmetric)
            weights = QuantScheme.weight_only(num_bits=bits, group_size=group_size, in_features=k, symmetric=symmetric)
            scheme = QuantScheme(weights=weights.weights, input_activations=acts)
            layer = hfcompress.QuantLinear.from_quantized(qw, scheme).to(torch.bfloat16)
            for amx in (False, True):
                label = f"{name}, {'AMX kernel' if amx else 'AMX off'}"
                with torch.no_grad(), _amx(amx):
                    times.setdefault(label, []).append(_best_us(lambda layer=layer, x=x: layer(x.clone())))
        dense = torch.randn(n, k).bfloat16()
        times.setdefault("dense bf16 matmul", []).append(_best_us(lambda x=x, w=dense: F.linear(x, w)))
    print(f"\nCPU: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("\n| call, 512 bf16 rows (us) | " + " | ".join(f"{n} x {k}" for n, k in LAYER_SHAPES) + " |")
    print("|---|" + "---:|" * len(LAYER_SHAPES))
    for label, values in times.items():
        print(f"| {label} | " + " | ".join(f"{v:.0f}" for v in values) + " |")
    return [{"call": label, "shapes": LAYER_SHAPES, "us": values} for label, values in times.items()]


def section_glue(args) -> list[dict]:
    from hfcompress.glue import evaluate_glue
    from hfcompress.glue.harness import load_glue_model

    w8 = "{name: weights, technique: rtn, bits: 8, group_size: -1, symmetric: true, ignore: [classifier]}"
    variants = {
        "fp32": None,
        "W8A8 dynamic": _stages(w8, _acts()),
        "W8A8 dynamic, SmoothQuant 0.5": "recipes/bert_w8a8_dynamic.yaml",
        "the same, 8-bit word embeddings": hfcompress.Recipe(
            [*_recipe("recipes/bert_w8a8_dynamic.yaml").stages, hfcompress.EmbeddingQuantConfig()]
        ),
    }
    rows = []
    for task in args.glue_tasks:
        path = args.glue_models.format(task=task)
        for label, spec in variants.items():
            model, tokenizer = load_glue_model(path, task)
            if spec is not None:
                # SmoothQuant calibrates on the task's own training sentences.
                from hfcompress.glue.data import load_glue

                train = load_glue(task, "train", args.glue_data, limit=256)
                texts = [" ".join(str(row[c]) for c in ("text_a", "text_b") if c in row) for row in train]
                hfcompress.compress(
                    model,
                    _recipe(spec),
                    tokenizer=tokenizer,
                    calibration_data=texts,
                    num_calibration_samples=64,
                    calibration_seq_len=64,
                    progress=False,
                )
            result = evaluate_glue(model, tokenizer, task, source=args.glue_data)[0]
            row = {"task": task, "model": label, "score": result.main, "metrics": result.metrics}
            rows.append({**row, "model_mb": total_bytes(model) / 1e6})
            print(json.dumps(rows[-1]), flush=True)
    print("\n| task | fp32 | " + " | ".join(list(variants)[1:]) + " |\n|---|---|" + "---|" * (len(variants) - 1))
    for task in args.glue_tasks:
        scores = {r["model"]: 100 * r["score"] for r in rows if r["task"] == task}
        cells = " | ".join(f"{scores[v]:.1f} ({scores[v] - scores['fp32']:+.1f})" for v in list(variants)[1:])
        print(f"| {task} | {scores['fp32']:.1f} | {cells} |")
    sizes = {r["model"]: r["model_mb"] for r in rows if r["task"] == args.glue_tasks[0]}
    print("\nmodel bytes: " + ", ".join(f"{label} {mb:.1f} MB" for label, mb in sizes.items()))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sections", nargs="+", default=["ppl", "speed", "glue"], choices=["ppl", "speed", "layers", "glue"]
    )
    parser.add_argument("--rows", nargs="*", default=[], help="only the ppl rows whose label contains one of these")
    parser.add_argument("--samples", type=int, default=128, help="calibration windows of 512 tokens")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--amx-off", action="store_true", help="speed: also time each compressed row with the AMX kernels switched off"
    )
    parser.add_argument(
        "--dense-off",
        action="store_true",
        help="speed: also time the rows that take the matmul of the dequantized weight without it",
    )
    parser.add_argument(
        "--vnni-off", action="store_true", help="speed: also time grouped W4A8 without the VNNI kernel (no AMX)"
    )
    runs = [f"{v} {a}" for v, a in PEER_RUNS]
    parser.add_argument("--peer-runs", nargs="*", default=[], choices=runs, help="only these peer runs (default: all)")
    parser.add_argument("--peer", action="append", default=[], type=lambda s: tuple(s.split("=", 1)))
    parser.add_argument("--glue-models", default="outputs/glue/minilm-l6-{task}")
    parser.add_argument("--glue-tasks", nargs="+", default=["sst2", "mrpc"])
    parser.add_argument("--glue-data", default=None, help="GLUE folder or nyu-mll/glue (default: the harness's)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/out/act")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    for section in args.sections:
        sections = {"ppl": section_ppl, "speed": section_speed, "layers": section_layers, "glue": section_glue}
        rows = sections[section](args)
        (args.out / f"{section}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.exit(main())
