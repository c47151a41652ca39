"""Decode attention over a KV4 cache on a GPU: our two Triton kernels (packed keys and values
read in registers, split-K; "lanes": products reduced across threads, "dot": on tensor cores)
against SDPA over a float16 cache, in one run.

    python benchmarks/bench_kv_gpu.py [--tokens 32768] [--batch 8] [--out DIR]

Shapes: SmolLM2-135M's attention (9 query heads on 3 KV heads, head dim 64) and a
Llama-3-8B-shaped one (32 on 8, head dim 128). Times are CUDA-event medians of 50 calls after
10 warm-up calls. Also times the quantize-and-pack of one 64-token group (what an append
costs). Prints a markdown table and writes it to DIR/kv_gpu.md.
"""

from __future__ import annotations

import argparse
import functools
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from hfcompress_triton import kv, kv_ref

SHAPES = {"SmolLM2-135M (9/3 heads, D 64)": (9, 3, 64), "Llama-3-8B (32/8 heads, D 128)": (32, 8, 128)}


def cuda_ms(fn, warmup: int = 10, iters: int = 50) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(b: int, t: int, g: int, hq: int, hkv: int, d: int, dev: torch.device, timer=cuda_ms) -> dict:
    """Times (ms) of SDPA over a float16 cache and of both our kernels over its KV4 copy, the
    KV4 output's error against SDPA's, and the append of one group; each kernel first checked
    against its torch twin."""
    k = torch.randn(b, hkv, t, d, device=dev, dtype=torch.float16)
    v = torch.randn(b, hkv, t, d, device=dev, dtype=torch.float16)
    q = torch.randn(b, hq, 1, d, device=dev, dtype=torch.float16)
    parts = (*kv.kv_quantize(k, 4, g, "channel"), *kv.kv_quantize(v, 4, g, "token"))
    scale = d**-0.5
    row = {"sdpa": timer(functools.partial(F.scaled_dot_product_attention, q, k, v, enable_gqa=True))}
    ref, _ = kv_ref.kv_decode_attention_ref(q.float(), *parts, None, 4, g, scale)
    kernels = ("lanes", "dot") if kv.dot_kernel_fits(4, g, d) else ("lanes",)
    for kernel in kernels:
        out, _ = kv.kv_decode_attention(q, *parts, None, 4, g, scale, kernel=kernel)
        assert (out - ref).abs().max() < 1e-2, f"the {kernel} kernel differs from its torch twin"
        row[kernel] = timer(functools.partial(kv.kv_decode_attention, q, *parts, None, 4, g, scale, kernel=kernel))
        row[f"{kernel}_error"] = (out - F.scaled_dot_product_attention(q, k, v, enable_gqa=True).float()).abs().max()
    k_new, v_new = k[:, :, :g].contiguous(), v[:, :, :g].contiguous()
    row["append"] = timer(functools.partial(kv.kv_quantize, k_new, 4, g, "channel")) + timer(
        functools.partial(kv.kv_quantize, v_new, 4, g, "token")
    )
    return {key: float(value) for key, value in row.items()}


def _ms_ratio(row: dict, kernel: str) -> str:
    if kernel not in row:
        return "- | -"
    return f"{row[kernel]:.3f} | {row['sdpa'] / row[kernel]:.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    dev = torch.device("cuda")
    b, t, g = args.batch, args.tokens, args.group_size
    lines = [
        f"### Decode attention over {t} tokens, batch {b}, {torch.cuda.get_device_name()}\n",
        "| shape | SDPA fp16 cache (ms) | ours KV4, lanes kernel (ms) | vs SDPA | ours KV4, tensor-core kernel (ms) "
        "| vs SDPA | KV4 max abs error vs fp16 | append a group (ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, (hq, hkv, d) in SHAPES.items():
        row = measure(b, t, g, hq, hkv, d, dev)
        error = row.get("dot_error", row["lanes_error"])
        lines.append(
            f"| {name} | {row['sdpa']:.3f} | {_ms_ratio(row, 'lanes')} | {_ms_ratio(row, 'dot')} | {error:.4f} "
            f"| {row['append']:.3f} |"
        )
        torch.cuda.empty_cache()
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "kv_gpu.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
