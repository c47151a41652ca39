"""W4A16 Triton kernels on a CUDA GPU: per-layer matmuls and end-to-end decoding, in one run.

    python benchmarks/bench_w4a16.py [--out DIR] [--sweep gemv,gemm] [--sustained JSON] [--e2e] [--dtype bfloat16]

Layers (``QuantLinear`` at 4 bits, group 128, asymmetric; random weights, so only the time
means anything): for each shape ``[N, K]`` and each M, the median time of

* ``dense``: ``F.linear`` on the same weights dequantized to the activation dtype (cuBLAS),
  the baseline every ratio is taken against;
* ``layer``: the ``QuantLinear``'s default CUDA path (see ``hfcompress.quant.triton_bridge``);
* each kernel alone at its default blocks: the fused GEMV (M <= 16), the fused tiled GEMM, the
  dequantize kernel, and dequantize + cuBLAS;
* ``reference``: the layer's pure-torch fallback (dequantize every call, then ``F.linear``);
* with ``--sweep``, every block configuration in ``GEMV_CONFIGS`` (M <= 4) / ``GEMM_CONFIGS``
  (M > 4), each checked against the reference first (all timings go to results.json).

``--sustained``: the GEMV as decoding runs it, eight different layers of each shape back to back
in one CUDA graph, per-layer time and bytes read per second, beside bf16 cuBLAS the same way.

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
    "tinyllama q/o 2048x2048": (2048, 2048),
    "tinyllama gate/up 5632x2048": (5632, 2048),
    "tinyllama down 2048x5632": (2048, 5632),
}
MS = (1, 4, 16, 128, 2048)
# A swept configuration whose output is further than this from the reference (relative to its
# largest value) is reported as wrong and not timed.
MAX_REL_ERR = 3e-2
DEVICE = "cuda"  # a module constant so that a CPU smoke run (interpreter, tiny shapes) can swap it

# The tile kernel at the tiles that led the H200 sweeps of 2026-12-04, unsplit and split over K
# (SPLIT_K 0: automatic, four programs per multiprocessor), then the tensor-core kernel
# ("MMA": 1) over its tiles, its split over K, its unpack (ASM 0: Triton ops) and its column
# order (PERMUTE 2: a tile's low nibbles, then its high ones).
GEMV_CONFIGS = (
    [
        {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w}
        for bn, bk, w in [(16, 512, 4), (16, 1024, 4), (8, 1024, 4), (8, 512, 4), (32, 512, 4), (4, 2048, 4)]
    ]
    + [
        {"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "num_warps": w}
        for bn, bk, split, w in [(16, 512, 0, 4), (8, 1024, 0, 4), (8, 512, 0, 4), (16, 256, 0, 4), (16, 512, 4, 4)]
    ]
    + [{"MMA": 1, "BLOCK_N": 128, "BLOCK_K": 128, "PERMUTE": 2, "num_warps": w} for w in (4, 8)]
    + [
        {"MMA": 1, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "ASM": asm, "num_warps": w, "num_stages": st}
        for bn, bk, split, asm, w, st in [
            (64, 128, 0, 1, 4, 3),
            (64, 64, 0, 1, 4, 4),
            (128, 128, 0, 1, 4, 3),
            (128, 64, 0, 1, 4, 4),
            (128, 128, 0, 1, 8, 3),
            (256, 128, 0, 1, 8, 3),
            (128, 128, 2, 1, 4, 3),
            (128, 128, 4, 1, 4, 3),
            (128, 128, 8, 1, 4, 3),
        ]
    ]
)
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
    from hfcompress.quant.scheme import QuantScheme

    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)).to(DEVICE) * 0.02
    qw = quantize_rtn(w, bits=4, group_size=128, symmetric=False)
    scheme = QuantScheme.weight_only(num_bits=4, group_size=128, in_features=k, symmetric=False)
    return QuantLinear.from_quantized(qw, scheme)  # float16 scales, uint8 zeros


def _rel_err(out: torch.Tensor, expected: torch.Tensor) -> float:
    return ((out.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


def _sweep(op, configs, x, layer, expected) -> dict:
    """Median ms of ``op`` at each block configuration that launches and computes correctly."""
    times = {}
    for cfg in configs:
        args = (x, layer.qweight, layer.scales, layer.zeros, layer.group_size)
        try:
            out = op(*args, blocks=cfg)
        except Exception as exc:  # a config the GPU cannot launch is skipped
            print(f"  skip {cfg}: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        if _rel_err(out, expected) > MAX_REL_ERR:
            print(f"  wrong {cfg}: rel err {_rel_err(out, expected):.3g}")
            continue
        times[json.dumps(cfg)] = bench_ms(lambda: op(*args, blocks=cfg))  # noqa: B023
    return times


def layer_rows(dtype: torch.dtype, sweep: tuple[str, ...], shapes: dict | None = None, ms=MS) -> list[dict]:
    from hfcompress_triton import w4a16

    rows = []
    for label, (n, k) in (shapes or LAYER_SHAPES).items():
        layer = make_layer(n, k, dtype)
        dense_w = layer.dequantize(dtype)
        args = (layer.qweight, layer.scales, layer.zeros, layer.group_size)
        weight_bytes = layer.storage_bytes()
        for m in ms:
            x = torch.randn(m, k, device=DEVICE, dtype=dtype)
            with force_reference(True):
                expected = layer(x)
                ref_ms = bench_ms(lambda: layer(x))  # noqa: B023
            row = {
                "shape": label,
                "N": n,
                "K": k,
                "M": m,
                "weight_bytes": weight_bytes,
                "dense_ms": bench_ms(lambda: F.linear(x, dense_w)),  # noqa: B023
                "layer_ms": bench_ms(lambda: layer(x)),  # noqa: B023
                "layer_rel_err": _rel_err(layer(x), expected),
                "gemm_ms": bench_ms(lambda: w4a16.w4a16_gemm(x, *args)),  # noqa: B023
                "dequant_ms": bench_ms(lambda: w4a16.w4_dequantize(*args, k, dtype)),  # noqa: B023
                "dequant_cublas_ms": bench_ms(lambda: F.linear(x, w4a16.w4_dequantize(*args, k, dtype))),  # noqa: B023
                "reference_ms": ref_ms,
            }
            if m <= 16:
                row["gemv_ms"] = bench_ms(lambda: w4a16.w4a16_gemv(x, *args))  # noqa: B023
                row["gemv_rel_err"] = _rel_err(w4a16.w4a16_gemv(x, *args), expected)
            if "gemv" in sweep and m <= 4:
                row["gemv_sweep"] = _sweep(w4a16.w4a16_gemv, GEMV_CONFIGS, x, layer, expected)
            if "gemm" in sweep and m > 4:
                row["gemm_sweep"] = _sweep(w4a16.w4a16_gemm, GEMM_CONFIGS, x, layer, expected)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def matching(table: dict, spec: str) -> dict:
    """The entries of ``table`` whose label contains one of the comma-separated words of
    ``spec`` (all of them when ``spec`` is empty): the scripts' --shapes and --e2e-models."""
    words = [w for w in spec.split(",") if w]
    return {k: v for k, v in table.items() if not words or any(w in k for w in words)}


def best_of(times: dict | None) -> tuple[float, dict] | None:
    """The fastest ``(ms, configuration)`` of a sweep's ``{configuration as JSON: ms}``, or None."""
    if not times:
        return None
    cfg, ms = min(times.items(), key=lambda kv: kv[1])
    return ms, json.loads(cfg)


def _best(times: dict | None, weight_bytes: int | None = None) -> str:
    best = best_of(times)
    if best is None:
        return "-"
    rate = f", {weight_bytes / best[0] / 1e9:.2f} TB/s" if weight_bytes else ""
    return f"{best[0]:.4f}{rate} ({' '.join(f'{k}={v}' for k, v in best[1].items())})"


def layer_table(rows: list[dict]) -> str:
    lines = [
        "| layer [N, K] | M | dense (cuBLAS) ms | W4 layer ms | vs dense | GEMV ms | tiled GEMM ms "
        "| dequantize + cuBLAS ms | dequantize alone ms | torch reference ms | best swept ms, weights read/s (config) "
        "|",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        gemv = f"{r['gemv_ms']:.4f}" if "gemv_ms" in r else "-"
        best = _best(r.get("gemv_sweep") or r.get("gemm_sweep"), r["weight_bytes"])
        lines.append(
            f"| {r['shape']} | {r['M']} | {r['dense_ms']:.4f} | {r['layer_ms']:.4f} | "
            f"{r['dense_ms'] / r['layer_ms']:.2f}x | {gemv} | {r['gemm_ms']:.4f} | {r['dequant_cublas_ms']:.4f} | "
            f"{r['dequant_ms']:.4f} | {r['reference_ms']:.4f} | {best} |"
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


def _graph_ms(fn) -> float:
    """Median ms of one replay of ``fn`` captured in a CUDA graph (warmed up on a side stream
    first, as capture requires): the GPU's time without Python's launch gaps."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench_ms(graph.replay)


def _graph_step_ms(model, ids: torch.Tensor) -> float | str:
    """One-token forward without a cache, captured in a CUDA graph and replayed: the GPU time of
    a decoding step's weights without Python's launch overhead; the error's text if capture fails."""
    try:
        with torch.no_grad():
            return _graph_ms(lambda: model(ids, use_cache=False))
    except Exception as exc:  # capture can fail on model code that syncs; report it
        return f"{type(exc).__name__}: {str(exc)[:200]}"


def _prefill_ms(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return bench_ms(lambda: model(ids, use_cache=False, logits_to_keep=1))


def e2e_rows(dtype: torch.dtype, models: dict | None = None, reference: bool = True) -> list[dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    import hfcompress
    from hfcompress import RTNConfig

    rows = []
    for label, shape in (models or E2E_MODELS).items():
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
        variants = {"dense": (dense, False), "W4 Triton": (w4, False)}
        if reference:
            variants["W4 reference"] = (w4, True)
        for name, (model, ref) in variants.items():
            with force_reference(ref):
                row = {
                    "model": label,
                    "variant": name,
                    "decode_tok_s": _decode_tps(model, prompt, 128),
                    "prefill_2048_ms": _prefill_ms(model, long_ids),
                    "graph_step_ms": _graph_step_ms(model, prompt[:, :1]) if DEVICE == "cuda" else None,
                    "weights_gb": sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 1e9,
                    "quantize_s": quant_s if name != "dense" else None,
                }
            rows.append(row)
            print(json.dumps(row), flush=True)
        del dense, w4
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return rows


def _ms_and_ratio(ms, dense_ms) -> str:
    if not isinstance(ms, float):
        return f"{ms} | -"
    return f"{ms:.4f} | {dense_ms / ms:.2f}x" if isinstance(dense_ms, float) else f"{ms:.4f} | -"


def e2e_table(rows: list[dict]) -> str:
    lines = [
        "| model (random weights) | variant | weights GB | decode tok/s | vs dense | prefill 2048 ms | vs dense "
        "| 1-token step, CUDA graph ms | vs dense |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    dense = {r["model"]: r for r in rows if r["variant"] == "dense"}
    for r in rows:
        d = dense[r["model"]]
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['weights_gb']:.3f} | {r['decode_tok_s']:.1f} | "
            f"{r['decode_tok_s'] / d['decode_tok_s']:.2f}x | {r['prefill_2048_ms']:.2f} | "
            f"{d['prefill_2048_ms'] / r['prefill_2048_ms']:.2f}x | "
            f"{_ms_and_ratio(r['graph_step_ms'], d['graph_step_ms'])} |"
        )
    return "\n".join(lines)


def sustained_gemv_rows(dtype: torch.dtype, shapes: dict, configs: list[dict], copies: int = 8) -> list[dict]:
    """The GEMV as decoding runs it: ``copies`` different layers of each shape at M = 1, back to
    back in one CUDA graph (no launch gaps between kernels; together larger than the L2 cache,
    so every layer is read from memory), the replay's time divided by ``copies``; beside the
    same for bf16 cuBLAS on the dequantized weights. ``configs``: the GEMV blocks to time
    (each checked against the reference first)."""
    from hfcompress_triton import w4a16

    rows = []
    for label, (n, k) in shapes.items():
        layers = [make_layer(n, k, dtype, seed=i) for i in range(copies)]
        dense = [layer.dequantize(dtype) for layer in layers]
        x = torch.randn(1, k, device=DEVICE, dtype=dtype)
        with force_reference(True):
            expected = layers[0](x)
        row = {"shape": label, "N": n, "K": k, "copies": copies, "weight_bytes": layers[0].storage_bytes()}
        row["dense_ms"] = _graph_ms(lambda: [F.linear(x, w) for w in dense]) / copies  # noqa: B023
        row["gemv_ms"] = {}
        for cfg in configs:
            args = [(layer.qweight, layer.scales, layer.zeros, layer.group_size) for layer in layers]
            if _rel_err(w4a16.w4a16_gemv(x, *args[0], blocks=cfg), expected) > MAX_REL_ERR:
                print(f"  wrong {cfg}")
                continue
            timed = _graph_ms(lambda: [w4a16.w4a16_gemv(x, *a, blocks=cfg) for a in args])  # noqa: B023
            row["gemv_ms"][json.dumps(cfg)] = timed / copies
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def sustained_table(rows: list[dict]) -> str:
    lines = [
        "| layer [N, K] | bf16 cuBLAS ms per layer | GEMV blocks | W4 GEMV ms per layer | weights read/s | vs cuBLAS |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        for cfg, ms in r["gemv_ms"].items():
            lines.append(
                f"| {r['shape']} | {r['dense_ms']:.4f} | {cfg} | {ms:.4f} | {r['weight_bytes'] / ms / 1e9:.2f} TB/s "
                f"| {r['dense_ms'] / ms:.2f}x |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/w4a16"))
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    parser.add_argument(
        "--sweep",
        default="",
        help="comma-separated kernels whose block configurations are all timed: gemv, gemm",
    )
    parser.add_argument("--e2e", action="store_true", help="also decode with Llama-shaped models")
    parser.add_argument(
        "--sustained",
        default="",
        help="JSON list of GEMV blocks to time back to back in a CUDA graph over 8 copies of each --shapes "
        "layer at M = 1 (sustained bandwidth), e.g. '[{}, {\"MMA\": 1}]'",
    )
    parser.add_argument("--no-layers", action="store_true", help="skip the per-layer table")
    parser.add_argument("--e2e-models", default="", help="only the --e2e models whose label contains one of these")
    parser.add_argument("--no-reference", action="store_true", help="--e2e without the pure-torch fallback's rows")
    parser.add_argument(
        "--gemv-blocks",
        default="",
        help="JSON tiles to run the GEMV at instead of its defaults, e.g. '{\"BLOCK_N\": 8}'",
    )
    parser.add_argument(
        "--shapes", default="", help="only the layers whose label contains one of these (comma-separated)"
    )
    parser.add_argument("--ms", type=int, nargs="*", default=list(MS), help="the M values of the per-layer table")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_w4a16.py needs a CUDA GPU (the Triton kernels' CPU interpreter is for tests only)")
    import triton

    dtype = getattr(torch, args.dtype)
    args.out.mkdir(parents=True, exist_ok=True)
    from hfcompress_triton import w4a16

    if args.gemv_blocks:
        w4a16.GEMV_BLOCKS.update(json.loads(args.gemv_blocks))

    header = (
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
        f"activations {args.dtype}, GEMV tiles {w4a16.GEMV_BLOCKS}"
    )
    print(header, flush=True)
    report = [header]
    results: dict = {"device": header}
    if not args.no_layers:
        results["layers"] = layer_rows(
            dtype, tuple(filter(None, args.sweep.split(","))), matching(LAYER_SHAPES, args.shapes), args.ms
        )
        report += ["", layer_table(results["layers"])]
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
    if args.sustained:
        configs = json.loads(args.sustained)
        results["sustained"] = sustained_gemv_rows(dtype, matching(LAYER_SHAPES, args.shapes), configs)
        report += ["", sustained_table(results["sustained"])]
    if args.e2e:
        results["e2e"] = e2e_rows(dtype, matching(E2E_MODELS, args.e2e_models), not args.no_reference)
        report += ["", e2e_table(results["e2e"])]
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "report.md").write_text("\n".join(report) + "\n")
    print("\n".join(report))


if __name__ == "__main__":
    main()
