"""Decode attention over a KV4 cache on a GPU: our Triton kernel (packed keys and values read
and dequantized in registers, split-K) against SDPA over a float16 cache, in one run.

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
        "| shape | SDPA fp16 cache (ms) | ours KV4 (ms) | speed-up | KV4 max abs error vs fp16 | append a group (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for name, (hq, hkv, d) in SHAPES.items():
        k = torch.randn(b, hkv, t, d, device=dev, dtype=torch.float16)
        v = torch.randn(b, hkv, t, d, device=dev, dtype=torch.float16)
        q = torch.randn(b, hq, 1, d, device=dev, dtype=torch.float16)
        parts = (*kv.kv_quantize(k, 4, g, "channel"), *kv.kv_quantize(v, 4, g, "token"))
        scale = d**-0.5
        sdpa = cuda_ms(functools.partial(F.scaled_dot_product_attention, q, k, v, enable_gqa=True))
        ours = cuda_ms(functools.partial(kv.kv_decode_attention, q, *parts, None, 4, g, scale))
        out, _ = kv.kv_decode_attention(q, *parts, None, 4, g, scale)
        ref, _ = kv_ref.kv_decode_attention_ref(q.float(), *parts, None, 4, g, d**-0.5)
        want = F.scaled_dot_product_attention(q, k, v, enable_gqa=True).float()
        assert (out - ref).abs().max() < 1e-3, "kernel differs from its torch twin"
        k_new, v_new = k[:, :, :g].contiguous(), v[:, :, :g].contiguous()
        append_k = cuda_ms(functools.partial(kv.kv_quantize, k_new, 4, g, "channel"))
        append_v = cuda_ms(functools.partial(kv.kv_quantize, v_new, 4, g, "token"))
        error = (out - want).abs().max().item()
        lines.append(
            f"| {name} | {sdpa:.3f} | {ours:.3f} | {sdpa / ours:.2f}x | {error:.4f} | {append_k + append_v:.3f} |"
        )
        del k, v, parts, k_new, v_new
        torch.cuda.empty_cache()
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "kv_gpu.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
