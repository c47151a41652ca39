"""W8A8 Triton kernels on a CUDA GPU: the int8 GEMM (with and without the per-token
quantize) against bfloat16 cuBLAS and torch._int_mm, in one run.

    python benchmarks/bench_w8a8.py [--out DIR] [--sweep]

For each shape ``[N, K]`` (Llama-7B's 4096x4096 and 11008x4096, SmolLM2's 1536x576) and
each M (1, 16, 256, 2048), the median time (``triton.testing.do_bench``) of

* ``bf16``: ``x @ W^T`` in bfloat16 (cuBLAS), the baseline every ratio is taken against;
* ``int_mm``: ``torch._int_mm`` on the int8 codes (cuBLASLt int8, no epilogue);
* ``gemm``: our ``int8_gemm`` alone (int8 codes in, bfloat16 out, scales and bias fused);
* ``layer``: ``per_token_quant`` + ``int8_gemm`` from bfloat16 activations (what a W8A8
  ``QuantLinear`` runs on CUDA);
* with ``--sweep``: ``int8_gemm`` at every configuration of ``GEMM_CONFIGS`` (M >= 16),
  each checked against the torch twin first.

Random data; only times mean anything. Prints a markdown table; writes results.json to --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from bench_w4a16 import best_of, matching

SHAPES = {"7B q/o 4096x4096": (4096, 4096), "7B gate/up 11008x4096": (11008, 4096), "smollm2 1536x576": (1536, 576)}
MS = (1, 16, 256, 2048)
DEVICE = "cuda"  # a module constant so that a CPU smoke run (interpreter, tiny shapes) can swap it
GEMM_CONFIGS = [
    {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w, "num_stages": st}
    for bm, bn, bk, w, st in [
        (64, 64, 64, 4, 3),
        (128, 128, 64, 8, 3),
        (128, 128, 128, 8, 3),
        (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3),
        (64, 128, 128, 4, 4),
        (16, 64, 128, 4, 4),
        (16, 128, 256, 4, 3),
        (128, 128, 128, 8, 4),
        (128, 256, 128, 8, 3),
        (256, 128, 128, 8, 3),
        (128, 128, 256, 8, 3),
    ]
]


def _layer(w8a8, x, w_q, w_scale, bias):
    x_q, x_scale = w8a8.per_token_quant(x)
    return w8a8.int8_gemm(x_q, w_q, x_scale, w_scale, bias, torch.bfloat16)


def _measure(w8a8, w8a8_ref, bench, n: int, k: int, m: int, sweep: bool) -> tuple[dict, dict]:
    """Times (ms) of each variant at one shape and M, and of each sweep configuration that
    computes correctly (``{configuration as JSON: ms}``)."""
    w = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16)
    w_scale = (w.float().abs().amax(1) / 127).contiguous()
    w_q = torch.round(w.float() / w_scale[:, None]).clamp(-128, 127).to(torch.int8).contiguous()
    bias = torch.randn(n, device=DEVICE, dtype=torch.bfloat16)
    x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
    x_q, x_scale = w8a8.per_token_quant(x)
    t = {"bf16": bench(lambda: x @ w.t())}
    if m > 16:  # cuBLASLt's int8 GEMM needs M > 16
        t["int_mm"] = bench(lambda: torch._int_mm(x_q, w_q.t()))
    t["gemm"] = bench(lambda: w8a8.int8_gemm(x_q, w_q, x_scale, w_scale, bias, torch.bfloat16))
    t["layer"] = bench(lambda: _layer(w8a8, x, w_q, w_scale, bias))
    sweep_times = {}
    if sweep and m >= 16:
        ref = w8a8_ref.int8_gemm_ref(x_q, w_q, x_scale, w_scale, bias, torch.bfloat16).float()
        for cfg in GEMM_CONFIGS:
            try:
                y = w8a8.int8_gemm(x_q, w_q, x_scale, w_scale, bias, torch.bfloat16, blocks=cfg).float()
                if not torch.allclose(y, ref, rtol=1e-2, atol=1e-2):
                    continue
                ms = bench(lambda cfg=cfg: w8a8.int8_gemm(x_q, w_q, x_scale, w_scale, bias, torch.bfloat16, blocks=cfg))
            except Exception as exc:  # a configuration this GPU cannot run (shared memory): say so, go on
                print(f"  {cfg} fails at M={m}, {n}x{k}: {str(exc).splitlines()[0][:120]}")
                continue
            sweep_times[json.dumps(cfg)] = ms
    return t, sweep_times


def main() -> None:
    import triton
    from hfcompress_triton import w8a8, w8a8_ref

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/w8a8"))
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument(
        "--shapes", default="", help="only the shapes whose label contains one of these (comma-separated)"
    )
    parser.add_argument("--ms", type=int, nargs="*", default=list(MS), help="the M values to time")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    def bench(fn) -> float:
        return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))

    rows = []
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print("\n| shape | M | bf16 ms | int_mm | gemm | layer (quantize + gemm) | best sweep |")
    print("|---|---|---|---|---|---|---|")
    for label, (n, k) in matching(SHAPES, args.shapes).items():
        for m in args.ms:
            t, sweep_times = _measure(w8a8, w8a8_ref, bench, n, k, m, args.sweep)
            best = best_of(sweep_times)
            rows.append({"shape": label, "m": m, **t, "sweep": sweep_times, "best_sweep": best})
            ratio = {key: f"{t['bf16'] / v:.2f}x" for key, v in t.items()}
            sweep = f"{t['bf16'] / best[0]:.2f}x {best[1]}" if best else ""
            print(
                f"| {label} | {m} | {t['bf16']:.4f} | {ratio.get('int_mm', '')} | {ratio['gemm']} | "
                f"{ratio['layer']} | {sweep} |"
            )
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
