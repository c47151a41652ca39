"""Low rank on SmolLM2-135M: perplexity against weight bytes for quantization, low-rank FFN,
and low-rank compensation of quantization error, in one run.

    python benchmarks/bench_lowrank.py                      # every row, a table and a PNG
    python benchmarks/bench_lowrank.py --rows gptq-w3 gptq-w3+ec32x8 --calib 16 --windows 10

Protocol (the README's, as bench_gptq.py): calibration 128 windows x 512 tokens of
WikiText-2 *validation* (seed 0); evaluation the first 40 windows of 512 tokens of WikiText-2
*test*; the float32 model. "Bytes" are those of the 210 Linear layers of the 30 blocks (the
embeddings and lm_head are the same in every row): float weights counted as float16 (2 bytes
each, as a deployed model stores them), quantized ones as stored (codes, scales, zero
points), low-rank layers as their factors (and base). Each row loads the model afresh; GPTQ
uses our best settings (act-order, clip search, bf16 passes), as bench_gptq.py.

The plot (``--png``) needs matplotlib (``pip install matplotlib``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

BEST_GPTQ = {"act_order": True, "clip_search": True, "compute_dtype": "bfloat16"}


def _gptq(bits: int, group: int):
    import hfcompress

    return hfcompress.GPTQConfig(bits=bits, group_size=group, **BEST_GPTQ)


def _rtn(bits: int, group: int):
    import hfcompress

    return hfcompress.RTNConfig(bits=bits, group_size=group)


def _mixed(bits_per_weight: float):
    """GPTQ with bits and group size chosen per layer under a size budget (issue 14's
    knapsack): the other way we have of spending the compensation's bytes."""
    import hfcompress

    budget = hfcompress.BitsBudget(bits_per_weight=bits_per_weight, bits=(3, 4, 8), group_sizes=(64, 128))
    return hfcompress.GPTQConfig(bits=4, group_size=128, budget=budget, **BEST_GPTQ)


def _ec(rank: int, factor_bits: int | None, allocation: str = "uniform"):
    import hfcompress

    return hfcompress.ErrorCompensationConfig(
        rank=rank, factor_bits=factor_bits, allocation=allocation, compute_dtype="bfloat16"
    )


def _lr(ratio: float, method: str = "whitened", allocation: str = "uniform"):
    import hfcompress

    return hfcompress.LowRankConfig(method=method, ratio=ratio, allocation=allocation, compute_dtype="bfloat16")


# name -> (family for the plot, stages)
ROWS = {
    "dense": ("dense", lambda: []),
    "rtn-w4": ("RTN", lambda: [_rtn(4, 128)]),
    "rtn-w3": ("RTN", lambda: [_rtn(3, 128)]),
    "rtn-w4+ec32x8": ("RTN + compensation", lambda: [_rtn(4, 128), _ec(32, 8)]),
    "rtn-w3+ec32x8": ("RTN + compensation", lambda: [_rtn(3, 128), _ec(32, 8)]),
    "gptq-w4": ("GPTQ g128", lambda: [_gptq(4, 128)]),
    "gptq-w3": ("GPTQ g128", lambda: [_gptq(3, 128)]),
    "gptq-w4-g64": ("GPTQ g64", lambda: [_gptq(4, 64)]),
    "gptq-w3-g64": ("GPTQ g64", lambda: [_gptq(3, 64)]),
    "gptq-w3-g32": ("GPTQ g32", lambda: [_gptq(3, 32)]),
    # Rank 8 in 8 bits and rank 16 in 4 bits each add about 0.19 bits per weight: the bytes of
    # going from group 128 to group 64 (4.20 -> 4.38 bits per weight).
    "gptq-w4+ec8x8": ("GPTQ g128 + compensation", lambda: [_gptq(4, 128), _ec(8, 8)]),
    "gptq-w4+ec16x4": ("GPTQ g128 + compensation", lambda: [_gptq(4, 128), _ec(16, 4)]),
    "gptq-w4+ec16x8": ("GPTQ g128 + compensation", lambda: [_gptq(4, 128), _ec(16, 8)]),
    "gptq-w4+ec32x8": ("GPTQ g128 + compensation", lambda: [_gptq(4, 128), _ec(32, 8)]),
    "gptq-w3+ec32x8": ("GPTQ g128 + compensation", lambda: [_gptq(3, 128), _ec(32, 8)]),
    "gptq-w3+ec64x8": ("GPTQ g128 + compensation", lambda: [_gptq(3, 128), _ec(64, 8)]),
    # Mixed precision (3/4/8 bits, groups 64/128) at the sizes of the compensated W4 rows:
    # ec8x8 / ec16x4 (4.41 bits per weight) and ec32x8 (4.97).
    "gptq-mixed-4.41": ("GPTQ mixed precision", lambda: [_mixed(4.41)]),
    "gptq-mixed-4.97": ("GPTQ mixed precision", lambda: [_mixed(4.97)]),
    # The bytes of gptq-w4+ec16x4-global (4.449 bits per weight: its ranks hold the uniform
    # allocation's weights, but their factor scales cost a little more).
    "gptq-mixed-4.45": ("GPTQ mixed precision", lambda: [_mixed(4.45)]),
    # The same bytes (4.41 bits per weight) spent by both: a mixed plan under 4.2 bits, then
    # rank 8 in 8 bits on it; and rank 16 in 4 bits spread by the errors' spectra.
    "gptq-mixed-4.2+ec8x8": ("GPTQ mixed precision + compensation", lambda: [_mixed(4.2), _ec(8, 8)]),
    "gptq-w4+ec16x4-global": ("GPTQ g128 + compensation, global ranks", lambda: [_gptq(4, 128), _ec(16, 4, "global")]),
    "gptq-w4+ec32x8-global": ("GPTQ g128 + compensation, global ranks", lambda: [_gptq(4, 128), _ec(32, 8, "global")]),
    "gptq-w3+ec32x8-global": ("GPTQ g128 + compensation, global ranks", lambda: [_gptq(3, 128), _ec(32, 8, "global")]),
    "gptq-w4-g32": ("GPTQ g32", lambda: [_gptq(4, 32)]),
    "gptq-w3+ec32x16": ("GPTQ g128 + compensation", lambda: [_gptq(3, 128), _ec(32, None)]),
    "lr10": ("low-rank FFN (whitened)", lambda: [_lr(0.1)]),
    "lr20": ("low-rank FFN (whitened)", lambda: [_lr(0.2)]),
    "lr30": ("low-rank FFN (whitened)", lambda: [_lr(0.3)]),
    "lr40": ("low-rank FFN (whitened)", lambda: [_lr(0.4)]),
    "lr10-global": ("low-rank FFN (whitened, global ranks)", lambda: [_lr(0.1, allocation="global")]),
    "lr20-global": ("low-rank FFN (whitened, global ranks)", lambda: [_lr(0.2, allocation="global")]),
    "lr30-global": ("low-rank FFN (whitened, global ranks)", lambda: [_lr(0.3, allocation="global")]),
    "lr20-asvd": ("low-rank FFN (ASVD)", lambda: [_lr(0.2, "asvd")]),
    "lr20-svd": ("low-rank FFN (plain SVD)", lambda: [_lr(0.2, "svd")]),
    "lr10+gptq-w4": ("low-rank FFN + GPTQ W4", lambda: [_lr(0.1), _gptq(4, 128)]),
    "lr20+gptq-w4": ("low-rank FFN + GPTQ W4", lambda: [_lr(0.2), _gptq(4, 128)]),
}


def weight_bytes(model, names: list[str]) -> tuple[int, int]:
    """(bytes, weights) of the layers ``names`` (see the module docstring for how)."""
    from torch import nn

    from hfcompress.kinds import CompressedModule

    def nbytes(module) -> int:
        if isinstance(module, CompressedModule) and not hasattr(module, "factor_in"):
            return module.storage_bytes()
        if isinstance(module, nn.Linear):
            return 2 * module.weight.numel()
        return sum(nbytes(getattr(module, c)) for c in ("base", "factor_in", "factor_out") if getattr(module, c, None))

    total = weights = 0
    for name in names:
        module = model.get_submodule(name)
        total += nbytes(module)
        weights += module.in_features * module.out_features
    return total, weights


def measure(name: str, calib: int, windows: int) -> dict:
    import torch

    import hfcompress
    from hfcompress.data import load_text
    from hfcompress.eval import perplexity
    from hfcompress.models import load_model, load_tokenizer

    torch.manual_seed(0)
    model = load_model("smollm2-135m")
    tokenizer = load_tokenizer("smollm2-135m")
    prefix = "model.layers."
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(prefix)]
    stages = ROWS[name][1]()
    start = time.perf_counter()
    if stages:
        hfcompress.compress(
            model,
            stages,
            tokenizer=tokenizer,
            calibration_data="wikitext2:valid",
            progress=False,
            num_calibration_samples=calib,
            calibration_seq_len=512,
            seed=0,
        )
    wall = time.perf_counter() - start
    tokens = tokenizer(load_text("wikitext2:test"), return_tensors="pt", add_special_tokens=False).input_ids[0]

    def row(label: str, family: str) -> dict:
        nbytes, weights = weight_bytes(model, names)
        ppl = perplexity(model, tokens, seq_len=512, max_windows=windows, progress=False).perplexity
        return {"row": label, "family": family, "ppl": ppl, "bytes": nbytes, "bits_per_weight": 8 * nbytes / weights}

    out = [{**row(name, ROWS[name][0]), "wall_s": wall}]
    # A compensated row also measures its quantized model without the factors (each
    # LowRankLinear swapped back for its base): the same quantization run, so the two rows
    # differ by the compensation alone.
    compensated = [
        (n, m) for n, m in model.named_modules() if isinstance(m, hfcompress.LowRankLinear) and m.base is not None
    ]
    if compensated:
        for n, m in compensated:
            model.set_submodule(n, m.base)
        base = name.split("+ec")[0]
        out.append(row(f"{base} (factors removed)", ROWS.get(base, ("quantized only",))[0]))
    return out


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    families: dict[str, list[dict]] = {}
    for r in rows:
        families.setdefault(r["family"], []).append(r)
    for family, points in families.items():
        points.sort(key=lambda r: r["bytes"])
        ax.plot([p["bytes"] / 1e6 for p in points], [p["ppl"] for p in points], "o-", label=family)
        for p in points:
            ax.annotate(p["row"], (p["bytes"] / 1e6, p["ppl"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    dense = next((r["ppl"] for r in rows if r["row"] == "dense"), None)
    if dense is not None:
        ax.axhline(dense, color="grey", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xlabel("bytes of the blocks' Linear layers (MB; float counted as float16)")
    ax.set_ylabel("WikiText-2 test perplexity (log scale)")
    ax.set_title("SmolLM2-135M: perplexity against weight bytes")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--calib", type=int, default=128, help="calibration windows of 512 tokens")
    parser.add_argument("--windows", type=int, default=40, help="evaluation windows of 512 tokens")
    parser.add_argument("--png", type=Path, default=Path("benchmarks/lowrank_curve.png"))
    parser.add_argument("--jsonl", type=Path, default=None, help="append each row as a JSON line")
    parser.add_argument("--from-jsonl", type=Path, default=None, help="table and plot of rows measured earlier")
    args = parser.parse_args()
    rows = []
    if args.from_jsonl is not None:
        rows = [json.loads(line) for line in args.from_jsonl.read_text().splitlines() if line.strip()]
        args.rows = []
    for name in args.rows:
        for result in measure(name, args.calib, args.windows):
            rows.append(result)
            print(json.dumps(result), file=sys.stderr, flush=True)
            if args.jsonl is not None:
                with args.jsonl.open("a") as f:
                    f.write(json.dumps(result) + "\n")
    dense = next((r["ppl"] for r in rows if r["row"] == "dense"), None)
    print("| row | perplexity | vs dense | bits per weight | block Linear MB | wall (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        rel = f"{100 * (r['ppl'] / dense - 1):+.1f}%" if dense else ""
        print(
            f"| {r['row']} | {r['ppl']:.3f} | {rel} | {r['bits_per_weight']:.2f} | {r['bytes'] / 1e6:.2f} "
            f"| {r['wall_s']:.0f} |"
            if "wall_s" in r
            else f"| {r['row']} | {r['ppl']:.3f} | {rel} | "
            f"{r['bits_per_weight']:.2f} | {r['bytes'] / 1e6:.2f} | (same run as above) |"
        )
    plot(rows, args.png)


if __name__ == "__main__":
    main()
