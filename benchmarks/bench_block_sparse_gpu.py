"""The Triton block-sparse attention on a CUDA GPU against dense SDPA (FlashAttention) in one
run: forward and forward + backward, causal, grouped-query heads, bfloat16, at several
densities; plus the dynamic layout's estimator cost.

    python benchmarks/bench_block_sparse_gpu.py --out benchmarks/out/gpu/block_sparse

Shapes: batch 1, 32 query heads sharing 8 key heads, head dim 128 (a Llama-3-8B layer), T =
8192 and 16384 tokens, blocks of 64 and 128. The layouts keep, per head, random tiles under the
density (diagonal and the first block always), so the time depends on the density only. The
dense baseline is ``F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)``, which
dispatches to FlashAttention on this input. Ratios > 1: ours is faster.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F


def _bench(fn, reps: int = 20) -> float:
    """Median milliseconds of ``fn()`` (triton.testing.do_bench: warm-up, cache flushing); on
    CPU (``--device cpu``, a smoke run under TRITON_INTERPRET=1) one timed call."""
    if not torch.cuda.is_available():
        import time

        start = time.perf_counter()
        fn()
        return 1000 * (time.perf_counter() - start)
    import triton

    return triton.testing.do_bench(fn, rep=reps * 10, return_mode="median")


def _dense(q, k, v, grad=None, backend=None):
    """SDPA with PyTorch's choice of backend, or with ``backend`` (an ``SDPBackend``) forced."""
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    if grad is not None:
        out.backward(grad)
    return out


def _ours(q, k, v, layout, block, scale, grad=None):
    from hfcompress_triton.block_sparse import block_sparse_attention

    out = block_sparse_attention(q, k, v, layout, block, True, scale)
    if grad is not None:
        out.backward(grad)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="*", default=[8192, 16384])
    parser.add_argument("--blocks", type=int, nargs="*", default=[64, 128])
    parser.add_argument("--densities", type=float, nargs="*", default=[1.0, 0.5, 0.25, 0.125])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run of the script (TRITON_INTERPRET=1, float32)")
    args = parser.parse_args()

    from hfcompress.techniques.block_sparse import layout as L

    torch.manual_seed(0)
    dev = args.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    b, h, hk, d = (1, 32, 8, 128) if dev == "cuda" else (1, 4, 2, 16)
    scale = 1 / math.sqrt(d)
    rows = []
    gpu = torch.cuda.get_device_name() if dev == "cuda" else "cpu (smoke run)"
    print(f"GPU: {gpu}")
    columns = ["T", "block", "density", "kept", "dense fwd ms", "ours fwd ms", "fwd ratio", "dense f+b ms",
               "ours f+b ms", "f+b ratio"]  # fmt: skip
    print("| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|")
    for t in args.lengths:
        q = torch.randn(b, h, t, d, device=dev, dtype=dtype, requires_grad=True)
        k = torch.randn(b, hk, t, d, device=dev, dtype=dtype, requires_grad=True)
        v = torch.randn(b, hk, t, d, device=dev, dtype=dtype, requires_grad=True)
        do = torch.randn(b, h, t, d, device=dev, dtype=dtype)

        # The baseline is the fastest of SDPA's own choice and FlashAttention forced (the issue's
        # "flash"); each is printed.
        dense_f, dense_b = _bench(partial(_dense, q, k, v)), _bench(partial(_dense, q, k, v, do))
        if dev == "cuda":
            from torch.nn.attention import SDPBackend

            flash = SDPBackend.FLASH_ATTENTION
            flash_f, flash_b = (
                _bench(partial(_dense, q, k, v, backend=flash)),
                _bench(partial(_dense, q, k, v, do, backend=flash)),
            )
            print(
                f"T={t}: SDPA default fwd {dense_f:.3f} ms, f+b {dense_b:.3f} ms; "
                f"flash fwd {flash_f:.3f}, f+b {flash_b:.3f}"
            )
            dense_f, dense_b = min(dense_f, flash_f), min(dense_b, flash_b)
        for block in args.blocks:
            n = L.num_blocks(t, block)
            est = _bench(partial(L.attention_mass, q[0].detach(), k[0].detach(), block, causal=True, samples=8))
            for density in args.densities:
                scores = torch.rand(h, n, n, device=dev)
                keep = L.sink_layout(n, n, 1, causal=True).to(dev)
                layout = L.topk_layout(scores, density, causal=True, keep=keep, scope="head")[None]
                kept = L.density(layout[0], causal=True)
                ours = partial(_ours, q, k, v, layout, block, scale)
                if density == 1.0:  # every causal tile kept: must equal dense attention
                    with torch.no_grad():
                        err = (ours() - _dense(q, k, v)).abs().max().item()
                    print(f"T={t} block {block}, all tiles kept: max |ours - SDPA| = {err:.3g}")
                f, fb = _bench(ours), _bench(partial(ours, do))
                row = {"gpu": gpu, "T": t, "block": block, "density": density, "kept": kept,
                       "dense_fwd_ms": dense_f, "ours_fwd_ms": f, "dense_fb_ms": dense_b, "ours_fb_ms": fb,
                       "estimator_ms": est}  # fmt: skip
                rows.append(row)
                print(
                    f"| {t} | {block} | {density} | {kept:.3f} | {dense_f:.2f} | {f:.2f} | {dense_f / f:.2f}x "
                    f"| {dense_b:.2f} | {fb:.2f} | {dense_b / fb:.2f}x |",
                    flush=True,
                )
            print(f"dynamic estimator (8 sampled rows per block, all heads): {est:.2f} ms at T={t}, block {block}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
