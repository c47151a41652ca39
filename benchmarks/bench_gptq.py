"""GPTQ vs RTN vs fp32 on SmolLM2-135M: perplexity, quantization wall time, peak RSS.

    python benchmarks/bench_gptq.py                       # every scheme and method, a table
    python benchmarks/bench_gptq.py --one gptq w4g128     # one measurement, a JSON line
    python benchmarks/bench_gptq.py --schemes w4pc \
        --peer llmcompressor=.venv-llmc/bin/python --peer hqq=.venv-hqq/bin/python   # peers in the same run
    python benchmarks/bench_gptq.py --schemes w4g128 --peer bnb=.venv/bin/python     # bitsandbytes NF4
    python benchmarks/bench_gptq.py --methods gptq lr-light lr --extra '{"compute_dtype": "bfloat16"}'
    python benchmarks/bench_gptq.py --methods fp32 gptq --schemes mp3.5 order3.5 w3g48   # mixed precision
    python benchmarks/bench_gptq.py --corpora wikitext2 glue --extra '{"asym_calibration": true}'  # GPTAQ
    python benchmarks/bench_gptq.py --methods gptq awq-gptq --corpora wikitext2 glue   # AWQ scaling first
    python benchmarks/bench_gptq.py --methods rot-gptq rot-lr-light --extra '{"asym_calibration": true}'  # rotated

Protocol (issue 3): calibration 128 windows x 512 tokens of WikiText-2 *validation*
(seed 0); evaluation the first 40 windows of 512 tokens of WikiText-2 *test* (and, with
``--corpora ... glue``, of a second corpus that is not WikiText-2: the MRPC, RTE and STS-B dev
sentences; GPTQ refinements are kept only if they help there too). Each
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

# Each scheme is the grid fields of the weight config. The mixed-precision ones give a budget
# (scales and zero points included) instead: "mp3.5" lets the sensitivity plan choose among
# the default candidates (2/3/4/8 bits, groups 64/128); "order3.5" gives W4 g128 to the first
# layers in model order and W3 g128 to the rest, as far as the budget goes; "w3g48" is uniform
# W3 at exactly 3.5 bits per weight (3 + 24/48).
SCHEMES = {
    "w4g128": {"bits": 4, "group_size": 128},
    "w3g128": {"bits": 3, "group_size": 128},
    "w4pc": {"bits": 4, "group_size": -1},
    "w4g64": {"bits": 4, "group_size": 64},
    "w3g64": {"bits": 3, "group_size": 64},
    "w3g48": {"bits": 3, "group_size": 48},
    "mp3.5": {"budget": {"bits_per_weight": 3.5}},
    "mp3.0": {"budget": {"bits_per_weight": 3.0}},
    "order3.5": {"budget": {"bits_per_weight": 3.5, "bits": [3, 4], "group_sizes": [128], "strategy": "layer_order"}},
}
METHODS = ["fp32", "rtn", "gptq"]
# GPTQ (or learned rounding) after an `awq` stage on the same grid, or after a `rotate` stage.
AWQ_FIRST = {"awq-gptq": "gptq", "awq-lr-light": "lr-light"}
ROTATED_FIRST = {"rot-gptq": "gptq", "rot-lr-light": "lr-light"}
# Learned rounding (technique `learned_rounding`, started from GPTQ with --extra's options):
# the light setting (50 steps of 4 windows) and the full one (AutoRound's default: 200 steps of 8);
# `--extra` may override their steps and batch_size.
LEARNED_ROUNDING = {"lr-light": {"steps": 50, "batch_size": 4}, "lr": {"steps": 200}}
# Peer name -> its script in benchmarks/peers and the arguments after the scheme.
PEER_SCRIPTS = {
    "llmcompressor": ("llmcompressor_gptq.py",),
    "hqq": ("hqq_rtn.py",),
    "autoround": ("autoround.py",),
    "autoround-light": ("autoround.py", "light"),
    "bnb": ("bnb_nf4.py",),
}


# Our best GPTQ settings (the --extra of RESULTS.md's GPTQ table).
BEST_GPTQ = {"act_order": True, "clip_search": True, "compute_dtype": "bfloat16"}


def quantize(model, tokenizer, method: str, grid: dict, extra: dict) -> None:
    """Compress ``model`` in place by ``method`` ("rtn", "gptq", "lr-light", "lr";
    "awq-gptq" / "awq-lr-light" with an ``awq`` stage first; "rot-gptq" / "rot-lr-light" with
    a ``rotate`` stage first; "fp32" leaves it), with the protocol's calibration data for the
    calibrated ones."""
    import hfcompress

    stages = []
    if method in ROTATED_FIRST:
        stages.append(hfcompress.RotationConfig())
        method = ROTATED_FIRST[method]
    if method in AWQ_FIRST:
        dtype = extra.get("compute_dtype", "float32")
        grid_of_awq = {"bits": grid.get("bits", 4), "group_size": grid.get("group_size", 128)}
        stages.append(hfcompress.AWQConfig(**grid_of_awq, compute_dtype=dtype))
        method = AWQ_FIRST[method]
    if method == "rtn":
        hfcompress.compress(model, [hfcompress.RTNConfig.from_dict(grid)], progress=False)
    elif method in ("gptq", *LEARNED_ROUNDING):
        if method == "gptq":
            config = hfcompress.GPTQConfig.from_dict({**grid, **extra})
        else:
            config = hfcompress.LearnedRoundingConfig.from_dict({**grid, **LEARNED_ROUNDING[method], **extra})
        hfcompress.compress(
            model,
            [*stages, config],
            tokenizer=tokenizer,
            calibration_data="wikitext2:valid",
            progress=False,
            num_calibration_samples=128,
            calibration_seq_len=512,
            seed=0,
        )


def glue_dev_text() -> str:
    """A second evaluation corpus that is not WikiText-2: the distinct sentences of the MRPC,
    RTE and STS-B dev sets (news, Wikipedia and image captions), one per line, in file order."""
    from hfcompress.glue.data import load_glue

    seen: dict[str, None] = {}
    for task in ("mrpc", "rte", "stsb"):
        for row in load_glue(task, "validation"):
            for column in ("text_a", "text_b"):
                seen.setdefault(str(row[column]).strip(), None)
    return "\n".join(seen)


def corpus_perplexities(model, tokenizer, corpora: tuple[str, ...]) -> dict[str, float]:
    """The protocol's perplexity on each of ``corpora`` ("wikitext2": WikiText-2 test;
    "glue": :func:`glue_dev_text`): the first 40 windows of 512 tokens."""
    from hfcompress.data import load_text
    from hfcompress.eval import perplexity

    texts = {"wikitext2": lambda: load_text("wikitext2:test"), "glue": glue_dev_text}
    ppl = {}
    for corpus in corpora:
        tokens = tokenizer(texts[corpus](), return_tensors="pt", add_special_tokens=False).input_ids[0]
        ppl[corpus] = perplexity(model, tokens, seq_len=512, max_windows=40, progress=False).perplexity
    return ppl


def measure(method: str, scheme: str, extra: dict, corpora: tuple[str, ...] = ("wikitext2",)) -> dict:
    import torch

    from hfcompress.eval.size import size_report
    from hfcompress.models import load_model, load_tokenizer
    from hfcompress.targets import resolve_linear_targets

    torch.manual_seed(0)
    model = load_model("smollm2-135m")
    tokenizer = load_tokenizer("smollm2-135m")
    layers = list(resolve_linear_targets(model, ("Linear",), ("lm_head",)))
    start = time.perf_counter()
    quantize(model, tokenizer, method, SCHEMES[scheme], extra)
    wall = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    bits = size_report(model, layers).bits_per_weight
    ppl = corpus_perplexities(model, tokenizer, corpora)
    extra_ppl = {f"ppl_{c}": v for c, v in ppl.items() if c != "wikitext2"}
    ppl = ppl.get("wikitext2", float("nan"))
    return {
        **extra_ppl,
        "method": method,
        "scheme": scheme,
        "extra": extra,
        "ppl": ppl,
        "bits_per_weight": bits,
        "wall_s": wall,
        "peak_rss_mb": peak_mb,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "SCHEME"))
    parser.add_argument("--extra", default="{}", help="JSON of extra GPTQConfig (and LearnedRoundingConfig) fields")
    parser.add_argument(
        "--methods", nargs="*", default=METHODS, choices=[*METHODS, *LEARNED_ROUNDING, *AWQ_FIRST, *ROTATED_FIRST]
    )
    parser.add_argument("--schemes", nargs="*", default=list(SCHEMES))
    parser.add_argument(
        "--corpora",
        nargs="+",
        default=["wikitext2"],
        choices=["wikitext2", "glue"],
        help="perplexity on WikiText-2 test and/or on GLUE dev sentences (MRPC, RTE, STS-B), 40 windows of 512",
    )
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
        print(json.dumps(measure(args.one[0], args.one[1], json.loads(args.extra), tuple(args.corpora))))
        return
    rows = []
    for scheme in args.schemes:
        for method in args.methods:
            if method == "fp32" and scheme != args.schemes[0]:
                continue
            cmd = [sys.executable, __file__, "--one", method, scheme, "--extra", args.extra, "--corpora", *args.corpora]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1], file=sys.stderr)
        for name, python in peers:
            script, *settings = PEER_SCRIPTS[name]
            script = Path(__file__).parent / "peers" / script
            done = subprocess.run([python, str(script), scheme, *settings], capture_output=True, text=True)
            if done.returncode != 0:  # a peer that cannot run a scheme is a result, not a crash
                error = (done.stderr.strip().splitlines() or ["failed"])[-1][:100]
                rows.append({"method": name, "scheme": scheme, "error": error})
            else:
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(rows[-1], file=sys.stderr)
    fp32 = next((r for r in rows if r["method"] == "fp32"), None)
    if fp32 is None:
        return
    glue = "ppl_glue" in fp32
    print(f"\nfp32 perplexity {fp32['ppl']:.3f}" + (f", GLUE dev {fp32['ppl_glue']:.3f}" if glue else "") + "\n")
    columns = ["bits per weight", "perplexity", "increase over fp32"]
    columns += ["GLUE-dev perplexity", "increase"] if glue else []
    columns += ["quantization wall (s)", "peak RSS (MB)"]
    print("| scheme | method | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for r in rows:
        if "error" in r:
            print(f"| {r['scheme']} | {r['method']} | failed: {r['error']} |" + " |" * (len(columns) - 1))
        elif r["method"] != "fp32":
            cells = [f"{r['bits_per_weight']:.3f}" if r.get("bits_per_weight") else "?"]
            cells += [f"{r['ppl']:.3f}", f"{r['ppl'] - fp32['ppl']:+.3f}"]
            if glue:
                ppl_glue = r.get("ppl_glue")
                cells += [f"{ppl_glue:.3f}", f"{ppl_glue - fp32['ppl_glue']:+.3f}"] if ppl_glue else ["?", ""]
            cells += [f"{r['wall_s']:.1f}", f"{r['peak_rss_mb']:.0f}"]
            print(f"| {r['scheme']} | {r['method']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
