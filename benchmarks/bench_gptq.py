"""GPTQ vs RTN vs fp32 on SmolLM2-135M: perplexity, quantization wall time, peak RSS.

    python benchmarks/bench_gptq.py                       # every scheme and method, a table
    python benchmarks/bench_gptq.py --one gptq w4g128     # one measurement, a JSON line
    python benchmarks/bench_gptq.py --schemes w4pc \
        --peer llmcompressor=.venv-llmc/bin/python --peer hqq=.venv-hqq/bin/python   # peers in the same run
    python benchmarks/bench_gptq.py --schemes w4g128 --peer bnb=.venv/bin/python     # bitsandbytes NF4
    python benchmarks/bench_gptq.py --methods gptq lr-light lr --extra '{"compute_dtype": "bfloat16"}'

Protocol (issue 3): calibration 128 windows x 512 tokens of WikiText-2 *validation*
(seed 0); evaluation the first 40 windows of 512 tokens of WikiText-2 *test*. Each
measurement runs in its own process, so peak RSS (ru_maxrss) is that method's alone; wall
time covers calibration-data preparation and quantization, not model loading or evaluation.
Peers (llm-compressor, HQQ, AutoRound) need their own environments (see benchmarks/RESULTS.md
for how to make them); ``--peer NAME=PYTHON`` runs ``benchmarks/peers/<script>`` with that
interpreter for every scheme, one after the other with ours on the same machine, and adds
their rows to the table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

SCHEMES = {"w4g128": (4, 128), "w3g128": (3, 128), "w4pc": (4, -1)}
METHODS = ["fp32", "rtn", "gptq"]
# Learned rounding (technique `learned_rounding`, started from GPTQ with --extra's options):
# the light setting (50 steps of 4 windows) and the full one (AutoRound's default: 200 steps of 8).
LEARNED_ROUNDING = {"lr-light": {"steps": 50, "batch_size": 4}, "lr": {"steps": 200}}
PEER_SCRIPTS = {
    "llmcompressor": "llmcompressor_gptq.py",
    "hqq": "hqq_rtn.py",
    "autoround": "autoround.py",
    "bnb": "bnb_nf4.py",
}


# Our best GPTQ settings (the --extra of RESULTS.md's GPTQ table).
BEST_GPTQ = {"act_order": True, "clip_search": True, "compute_dtype": "bfloat16"}


def quantize(model, tokenizer, method: str, bits: int, group_size: int, extra: dict) -> None:
    """Compress ``model`` in place by ``method`` ("rtn", "gptq", "lr-light", "lr"; "fp32"
    leaves it), with the protocol's calibration data for the calibrated ones."""
    import hfcompress

    if method == "rtn":
        hfcompress.compress(model, [hfcompress.RTNConfig(bits=bits, group_size=group_size)], progress=False)
    elif method in ("gptq", *LEARNED_ROUNDING):
        if method == "gptq":
            config = hfcompress.GPTQConfig(bits=bits, group_size=group_size, **extra)
        else:
            fields = {**extra, **LEARNED_ROUNDING[method]}
            config = hfcompress.LearnedRoundingConfig(bits=bits, group_size=group_size, **fields)
        hfcompress.compress(
            model,
            [config],
            tokenizer=tokenizer,
            calibration_data="wikitext2:valid",
            progress=False,
            num_calibration_samples=128,
            calibration_seq_len=512,
            seed=0,
        )


def measure(method: str, scheme: str, extra: dict) -> dict:
    import torch

    from hfcompress.data import load_text
    from hfcompress.eval import perplexity
    from hfcompress.models import load_model, load_tokenizer

    torch.manual_seed(0)
    model = load_model("smollm2-135m")
    tokenizer = load_tokenizer("smollm2-135m")
    bits, group_size = SCHEMES[scheme]
    start = time.perf_counter()
    quantize(model, tokenizer, method, bits, group_size, extra)
    wall = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tokens = tokenizer(load_text("wikitext2:test"), return_tensors="pt", add_special_tokens=False).input_ids[0]
    ppl = perplexity(model, tokens, seq_len=512, max_windows=40, progress=False).perplexity
    return {"method": method, "scheme": scheme, "extra": extra, "ppl": ppl, "wall_s": wall, "peak_rss_mb": peak_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "SCHEME"))
    parser.add_argument("--extra", default="{}", help="JSON of extra GPTQConfig (and LearnedRoundingConfig) fields")
    parser.add_argument("--methods", nargs="*", default=METHODS, choices=[*METHODS, *LEARNED_ROUNDING])
    parser.add_argument("--schemes", nargs="*", default=list(SCHEMES))
    parser.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="NAME=PYTHON",
        help=f"also run a peer with its environment's interpreter; NAME in {sorted(PEER_SCRIPTS)}",
    )
    args = parser.parse_args()
    peers = []
    for spec in args.peer:
        name, _, python = spec.partition("=")
        if name not in PEER_SCRIPTS or not python:
            parser.error(f"--peer {spec!r}: expected NAME=PYTHON with NAME in {sorted(PEER_SCRIPTS)}")
        peers.append((name, python))
    if args.one:
        print(json.dumps(measure(args.one[0], args.one[1], json.loads(args.extra))))
        return
    rows = []
    for scheme in args.schemes:
        for method in args.methods:
            if method == "fp32" and scheme != args.schemes[0]:
                continue
            cmd = [sys.executable, __file__, "--one", method, scheme, "--extra", args.extra]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1], file=sys.stderr)
        for name, python in peers:
            script = Path(__file__).parent / "peers" / PEER_SCRIPTS[name]
            done = subprocess.run([python, str(script), scheme], capture_output=True, text=True)
            if done.returncode != 0:  # a peer that cannot run a scheme is a result, not a crash
                error = (done.stderr.strip().splitlines() or ["failed"])[-1][:100]
                rows.append({"method": name, "scheme": scheme, "error": error})
            else:
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(rows[-1], file=sys.stderr)
    fp32 = next((r["ppl"] for r in rows if r["method"] == "fp32"), None)
    if fp32 is None:
        return
    print(f"\nfp32 perplexity {fp32:.3f}\n")
    print("| scheme | method | perplexity | increase over fp32 | quantization wall (s) | peak RSS (MB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['scheme']} | {r['method']} | failed: {r['error']} | | | |")
        elif r["method"] != "fp32":
            print(
                f"| {r['scheme']} | {r['method']} | {r['ppl']:.3f} | {r['ppl'] - fp32:+.3f} | {r['wall_s']:.1f} "
                f"| {r['peak_rss_mb']:.0f} |"
            )


if __name__ == "__main__":
    main()
