"""The ``hfcompress`` command line.

    hfcompress compress --model smollm2-135m --recipe recipes/smollm2_w4a16_rtn_g128.yaml \\
        --output outputs/smollm2-w4 --report
    hfcompress eval ppl --model outputs/smollm2-w4 --max-windows 40
    hfcompress eval glue --model minilm-l6 --finetune --tasks rte,mrpc --output-dir outputs/glue
    hfcompress distill --teacher outputs/glue/minilm-l6-rte --task rte \\
        --recipe recipes/minilm_pkd_skip3.yaml --output outputs/minilm-pkd3-rte
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from hfcompress.errors import HfCompressError
from hfcompress.glue.commands import add_distill_parser, add_eval_glue_parser, run_distill, run_eval_glue

__all__ = ["build_parser", "main"]

logger = logging.getLogger("hfcompress")

# The README's documented evaluation subset: the first 40 windows of 512 tokens of the
# WikiText-2 test split (the same protocol as benchmarks/bench_gptq.py).
DEFAULT_EVAL_DATA = "wikitext2:test"
DEFAULT_SEQ_LEN = 512
DEFAULT_EVAL_WINDOWS = 40
DEFAULT_DECODE_TOKENS = 64


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="bundled name (smollm2-135m, minilm-l6), folder or Hub id")
    p.add_argument(
        "--task", choices=["causal-lm", "sequence-classification"], default=None, help="default: from the config"
    )


def _add_eval_args(p: argparse.ArgumentParser, windows_default: int | None) -> None:
    p.add_argument("--eval-data", default=DEFAULT_EVAL_DATA, help="wikitext2:test, wikitext2:valid or a text file")
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help="tokens per perplexity window")
    p.add_argument(
        "--max-windows", type=int, default=windows_default, help="score the first N windows (default: %(default)s)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hfcompress", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="compress a model with a recipe and save it")
    _add_model_args(c)
    c.add_argument("--recipe", required=True, help="recipe YAML file")
    c.add_argument("--output", required=True, help="folder to save the compressed model into")
    c.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --output")
    c.add_argument("--calibration", default=None, help="calibration text: wikitext2:valid or a text file")
    c.add_argument("--num-calibration-samples", type=int, default=128)
    c.add_argument("--calibration-seq-len", type=int, default=512)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument(
        "--checkpoint-dir", default=None, help="persist finished blocks of layerwise stages here; rerun to resume"
    )
    c.add_argument("--device", default=None, help="compute device for layerwise stages (default: keep)")
    c.add_argument("--push-to-hub", default=None, metavar="REPO", help="also upload the saved model to this repo")
    c.add_argument("--report", action="store_true", help="measure before and after, print a table")
    c.add_argument("--decode-tokens", type=int, default=DEFAULT_DECODE_TOKENS, help="for --report; 0 skips")
    _add_eval_args(c, DEFAULT_EVAL_WINDOWS)

    e = sub.add_parser("eval", help="measure a model")
    esub = e.add_subparsers(dest="metric", required=True)
    ppl = esub.add_parser("ppl", help="perplexity over non-overlapping windows of a text")
    _add_model_args(ppl)
    _add_eval_args(ppl, None)
    ppl.add_argument("--batch-size", type=int, default=1)
    ppl.add_argument("--json", action="store_true", help="print the result as JSON")
    add_eval_glue_parser(esub)
    add_distill_parser(sub)
    return parser


def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        raise HfCompressError(f"--output {output} exists and is not empty; pass --overwrite to replace it")


def _compress(args: argparse.Namespace) -> int:
    import torch

    import hfcompress
    from hfcompress.data import load_text
    from hfcompress.eval.size import linear_layer_stats, size_report, total_bytes
    from hfcompress.models import load_model, load_tokenizer
    from hfcompress.report import measure

    recipe = hfcompress.Recipe.from_yaml(args.recipe)  # fail on a bad recipe before loading anything
    output = Path(args.output)
    _check_output(output, args.overwrite)
    torch.manual_seed(args.seed)

    logger.info("loading %s", args.model)
    model = load_model(args.model, task=args.task)
    tokenizer = load_tokenizer(args.model)
    is_lm = model.config.architectures[0].endswith("ForCausalLM")
    measure_kwargs = {
        "eval_text": load_text(args.eval_data) if args.report and is_lm else None,
        "seq_len": args.seq_len,
        "max_windows": args.max_windows,
        "decode_tokens": args.decode_tokens if is_lm else 0,
        "progress": not args.quiet,
    }
    if args.report:
        stats, before_bytes = linear_layer_stats(model), total_bytes(model)
        before = measure(f"{args.model} (original)", model, tokenizer, size=size_report(model), **measure_kwargs)

    start = time.perf_counter()
    hfcompress.compress(
        model,
        recipe,
        tokenizer=tokenizer,
        calibration_data=args.calibration,
        device=args.device,
        progress=not args.quiet,
        num_calibration_samples=args.num_calibration_samples,
        calibration_seq_len=args.calibration_seq_len,
        seed=args.seed,
        checkpoint_dir=args.checkpoint_dir,
    )
    hfcompress.save_pretrained(model, output, tokenizer=tokenizer)
    wall = time.perf_counter() - start
    logger.info("saved %s in %.1f s", output, wall)
    if args.push_to_hub:
        model.push_to_hub(args.push_to_hub)
        tokenizer.push_to_hub(args.push_to_hub)
        logger.info("pushed to %s", args.push_to_hub)
    if not args.report:
        return 0

    del model
    reloaded = load_model(str(output), task=args.task)  # measure what was saved, not what is in memory
    after_size = size_report(reloaded)
    names = [n for n, m in reloaded.named_modules() if isinstance(m, hfcompress.QuantLinear)]
    # The original measured on the same layers the recipe compressed, from stats taken before.
    before = replace(before, size=size_report(reloaded, names or None, stats=stats, model_bytes=before_bytes))
    after = measure(
        f"{output.name} (compressed, reloaded)",
        reloaded,
        tokenizer,
        size=after_size,
        wall_seconds=wall,
        **measure_kwargs,
    )
    _print_report(args, [before, after], torch.get_num_threads())
    return 0


def _print_report(args: argparse.Namespace, rows: list, threads: int) -> None:
    from hfcompress.report import format_table

    print(f"\nRecipe: {args.recipe}   Output: {args.output}")
    if rows[0].perplexity is not None:
        print(
            f"Perplexity: {args.eval_data}, first {rows[0].perplexity.windows} non-overlapping windows "
            f"of {args.seq_len} tokens"
        )
    if rows[0].speed is not None:
        print(f"Decode: greedy, batch 1, {args.decode_tokens} new tokens, {threads} torch threads")
    print("Quantized layers: the Linear layers the recipe compressed; wall (s): compression + save\n")
    print(format_table(rows))


def _eval_ppl(args: argparse.Namespace) -> int:
    from hfcompress.data import load_text
    from hfcompress.eval.perplexity import text_perplexity
    from hfcompress.models import load_model, load_tokenizer

    model = load_model(args.model, task=args.task or "causal-lm")
    tokenizer = load_tokenizer(args.model)
    result = text_perplexity(
        model,
        tokenizer,
        load_text(args.eval_data),
        seq_len=args.seq_len,
        max_windows=args.max_windows,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    if args.json:
        print(json.dumps({"model": args.model, "data": args.eval_data, **asdict(result)}))
    else:
        print(
            f"{args.model}: perplexity {result.perplexity:.4f} on {args.eval_data} "
            f"({result.windows} windows x {result.seq_len} tokens, {result.tokens} predicted tokens)"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.command == "compress":
            return _compress(args)
        if args.command == "distill":
            return run_distill(args)
        if args.metric == "glue":
            return run_eval_glue(args)
        return _eval_ppl(args)
    except HfCompressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
