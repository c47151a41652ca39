"""W4A16 Triton kernels on a CUDA GPU: per-layer matmuls and end-to-end decoding, in one run.

    python benchmarks/bench_w4a16.py [--out DIR] [--sweep] [--e2e] [--dtype bfloat16]

Layers (``QuantLinear`` at 4 bits, group 128, asymmetric; random weights, so only the time
means anything): for each shape ``[N, K]`` and each M, the median time of

* ``dense``: ``F.linear`` on the same weights dequantized to the activation dtype (cuBLAS),
  the baseline every ratio is taken against;
* ``triton``: the layer's default path (GEMV for M <= 4, else the tiled GEMM);
* ``reference``: the layer's pure-torch fallback (dequantize every call, then ``F.linear``);
* with ``--sweep``, every block configuration in ``GEMV_CONFIGS`` / ``GEMM_CONFIGS``, each
  checked against the reference first; the fastest is reported beside the default.

``--e2e``: a randomly initialised Llama of SmolLM2-135M's shape and one of TinyLlama-1.1B's
shape, in the activation dtype vs W4 g128 RTN (``compress``), on the Triton path and on the
reference path: greedy decoding of 128 new tokens after a 32-token prompt (batch 1), and one
2048-token prefill. Everything is measured in this process on one GPU; the tables printed go
to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

LAYER_SHAPES = {  # [N, K]
    "smollm2 q/o 576x576": (576, 576),
    "smollm2 gate/up 1536x576": (1536, 576),
    "smollm2 down 576x1536": (576, 1536),
    "llama-7b q/o 4096x4096": (4096, 4096),
    "llama-7b gate/up 11008x4096": (11008, 4096),
    "llama-7b down 4096x11008": (4096, 11008),
}
MS = (1, 4, 16, 128, 2048)
DEVICE = "cuda"  # a module constant so that a CPU smoke run (interpreter, tiny shapes) can swap it

GEMV_CONFIGS = [
    {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w}
    for bn in (4, 8, 16, 32, 64)
    for bk in (128, 256, 512)
    for w in (2, 4)
]
GEMM_CONFIGS = [
    {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w, "num_stages": s}
    for bm, bn, bk, w, s in [
        (16, 64, 64, 4, 2),
        (16, 64, 128, 4, 3),
        (16, 128, 64, 4, 3),
        (16, 128, 128, 4, 4),
        (32, 64, 64, 4, 3),
        (32, 128, 64, 4, 3),
        (32, 128, 128, 8, 3),
        (64, 64, 64, 4, 3),
        (64, 128, 64, 4, 4),
        (64, 128, 128, 8, 3),
        (128, 128, 64, 8, 3),
        (128, 256, 64, 8, 3),
    ]
]

E2E_MODELS = {
    "SmolLM2-135M shape": {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
    },
    "TinyLlama-1.1B shape": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
    },
}


@contextlib.contextmanager
def force_reference(on: bool):
    from hfcompress.quant.dispatch import FORCE_REFERENCE_ENV

    old = os.environ.get(FORCE_REFERENCE_ENV)
    os.environ[FORCE_REFERENCE_ENV] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(FORCE_REFERENCE_ENV)
        else:
            os.environ[FORCE_REFERENCE_ENV] = old


def bench_ms(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))


def make_layer(n: int, k: int, dtype: torch.dtype, seed: int = 0):
    from hfcompress.quant import QuantLinear
    from hfcompress.quant.affine import quantize_rtn

    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)).to(DEVICE) * 0.02
    qw = quantize_rtn(w, bits=4, group_size=128, symmetric=False)
    return QuantLinear.from_quantized(qw, symmetric=False)  # float16 scales, uint8 zeros


def layer_rows(dtype: torch.dtype, sweep: bool) -> list[dict]:
    from hfcompress_triton import w4a16

    rows = []
    for label, (n, k) in LAYER_SHAPES.items():
        layer = make_layer(n, k, dtype)
        dense_w = layer.dequantize(dtype)
        zeros = layer.zeros
        weight_bytes = layer.qweight.numel() + layer.scales.numel() * layer.scales.element_size() + zeros.numel()
        for m in MS:
            x = torch.randn(m, k, device=DEVICE, dtype=dtype)
            with force_reference(True):
                expected = layer(x)
                ref_ms = bench_ms(lambda: layer(x))  # noqa: B023
            y = layer(x)
            err = ((y.float() - expected.float()).abs().max() / expected.float().abs().max()).item()
            row = {
                "shape": label,
                "N": n,
                "K": k,
                "M": m,
                "dense_ms": bench_ms(lambda: F.linear(x, dense_w)),  # noqa: B023
                "triton_ms": bench_ms(lambda: layer(x)),  # noqa: B023
                "reference_ms": ref_ms,
                "triton_rel_err": err,
                "weight_bytes": weight_bytes,
            }
            if sweep:
                op, configs = (w4a16.w4a16_gemv, GEMV_CONFIGS) if m <= 4 else (w4a16.w4a16_gemm, GEMM_CONFIGS)
                best = None
                for cfg in configs:
                    try:
                        out = op(x, layer.qweight, layer.scales, zeros, layer.group_size, blocks=cfg)
                    except Exception as exc:  # a config the GPU cannot launch is skipped
                        print(f"  skip {cfg}: {type(exc).__name__}: {str(exc)[:120]}")
                        continue
                    cerr = ((out.float() - expected.float()).abs().max() / expected.float().abs().max()).item()
                    if cerr > 3e-2:
                        print(f"  wrong {cfg}: rel err {cerr:.3g}")
                        continue
                    t = bench_ms(lambda: op(x, layer.qweight, layer.scales, zeros, layer.group_size, blocks=cfg))  # noqa: B023
                    if best is None or t < best[0]:
                        best = (t, cfg)
                if best is not None:
                    row["best_ms"], row["best_config"] = best
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def layer_table(rows: list[dict]) -> str:
    lines = [
        "| layer [N, K] | M | dense (cuBLAS) ms | Triton W4 ms | vs dense | reference W4 ms | best swept ms "
        "| best config |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        best = f"{r['best_ms']:.4f}" if "best_ms" in r else "-"
        cfg = " ".join(f"{k}={v}" for k, v in r.get("best_config", {}).items()) or "-"
        lines.append(
            f"| {r['shape']} | {r['M']} | {r['dense_ms']:.4f} | {r['triton_ms']:.4f} | "
            f"{r['dense_ms'] / r['triton_ms']:.2f}x | {r['reference_ms']:.4f} | {best} | {cfg} |"
        )
    return "\n".join(lines)


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _decode_tps(model, prompt: torch.Tensor, new_tokens: int) -> float:
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 0}
    model.generate(prompt, **{**kwargs, "max_new_tokens": 8, "min_new_tokens": 8})  # warm-up, compiles
    times = []
    for _ in range(3):
        _sync()
        start = time.perf_counter()
        model.generate(prompt, **kwargs)
        _sync()
        times.append(time.perf_counter() - start)
    return new_tokens / statistics.median(times)


def _prefill_ms(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return bench_ms(lambda: model(ids, use_cache=False, logits_to_keep=1))


def e2e_rows(dtype: torch.dtype) -> list[dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    import hfcompress
    from hfcompress import RTNConfig

    rows = []
    for label, shape in E2E_MODELS.items():
        torch.manual_seed(0)
        config = LlamaConfig(**shape, max_position_embeddings=4096)
        with torch.device(DEVICE):
            dense = LlamaForCausalLM(config).to(dtype).eval()
        w4 = copy.deepcopy(dense)
        start = time.perf_counter()
        hfcompress.compress(w4, [RTNConfig(bits=4, group_size=128)], progress=False)
        _sync()
        quant_s = time.perf_counter() - start
        prompt = torch.randint(1, config.vocab_size, (1, 32), device=DEVICE)
        long_ids = torch.randint(1, config.vocab_size, (1, 2048), device=DEVICE)
        variants = {"dense": (dense, False), "W4 Triton": (w4, False), "W4 reference": (w4, True)}
        for name, (model, ref) in variants.items():
            with force_reference(ref):
                row = {
                    "model": label,
                    "variant": name,
                    "decode_tok_s": _decode_tps(model, prompt, 128),
                    "prefill_2048_ms": _prefill_ms(model, long_ids),
                    "weights_gb": sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 1e9,
                    "quantize_s": quant_s if name != "dense" else None,
                }
            rows.append(row)
            print(json.dumps(row), flush=True)
        del dense, w4
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return rows


def e2e_table(rows: list[dict]) -> str:
    lines = [
        "| model (random weights) | variant | weights GB | decode tok/s | vs dense | prefill 2048 ms | vs dense |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    dense = {r["model"]: r for r in rows if r["variant"] == "dense"}
    for r in rows:
        d = dense[r["model"]]
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['weights_gb']:.3f} | {r['decode_tok_s']:.1f} | "
            f"{r['decode_tok_s'] / d['decode_tok_s']:.2f}x | {r['prefill_2048_ms']:.2f} | "
            f"{d['prefill_2048_ms'] / r['prefill_2048_ms']:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/w4a16"))
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    parser.add_argument("--sweep", action="store_true", help="also time every block configuration")
    parser.add_argument("--e2e", action="store_true", help="also decode with Llama-shaped models")
    parser.add_argument("--no-layers", action="store_true", help="skip the per-layer table")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_w4a16.py needs a CUDA GPU (the Triton kernels' CPU interpreter is for tests only)")
    import triton

    dtype = getattr(torch, args.dtype)
    args.out.mkdir(parents=True, exist_ok=True)
    header = (
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
        f"activations {args.dtype}"
    )
    print(header, flush=True)
    report = [header]
    results: dict = {"device": header}
    if not args.no_layers:
        results["layers"] = layer_rows(dtype, args.sweep)
        report += ["", layer_table(results["layers"])]
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
    if args.e2e:
        results["e2e"] = e2e_rows(dtype)
        report += ["", e2e_table(results["e2e"])]
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "report.md").write_text("\n".join(report) + "\n")
    print("\n".join(report))


if __name__ == "__main__":
    main()
