"""The ``hfcompress`` command line.

    hfcompress compress --model smollm2-135m --recipe recipes/smollm2_w4a16_rtn_g128.yaml \\
        --output outputs/smollm2-w4 --report
    hfcompress eval ppl --model outputs/smollm2-w4 --max-windows 40
    hfcompress eval glue --model minilm-l6 --finetune --tasks rte,mrpc --output-dir outputs/glue
    hfcompress verify outputs/smollm2-w4
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

    v = sub.add_parser("verify", help="check a saved compressed model: tensor hashes, and that it loads cleanly")
    v.add_argument("folder", help="the saved model folder")
    v.add_argument("--hashes-only", action="store_true", help="only recompute the tensor hashes (no model load)")
    return parser


def _check_push_target(repo: str) -> None:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise HfCompressError(
            f"--push-to-hub {repo}: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it, or drop "
            "--push-to-hub and upload the saved folder later with `hf upload`"
        )


def _push(output: Path, repo: str) -> None:
    """Upload the saved folder as it is on disk (the files whose digests were just written)."""
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(folder_path=str(output), repo_id=repo)
    except Exception as exc:  # network, auth or Hub errors: the local result stands
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HfCompressError(
            f"the compressed model is saved, complete, in {output}; uploading it to {repo} failed ({reason}). "
            f"Upload it later with `hf upload {repo} {output}`"
        ) from None
    logger.info("pushed %s to %s", output, repo)


def _optional_tokenizer(name: str):
    """The model's tokenizer if it has one, to save beside the compressed model; else None."""
    from hfcompress.models import load_tokenizer

    try:
        return load_tokenizer(name)
    except HfCompressError:
        raise
    except Exception as exc:  # no tokenizer files: a model folder saved without one
        logger.warning("%s has no usable tokenizer (%s); the output folder will have none", name, exc)
        return None


def _compress(args: argparse.Namespace) -> int:
    import torch

    import hfcompress
    from hfcompress.data import load_text
    from hfcompress.eval.size import linear_layer_stats, size_report, total_bytes
    from hfcompress.models import load_model, load_tokenizer
    from hfcompress.report import measure
    from hfcompress.saving import check_folder, check_output

    # Everything that can be checked without the model is checked before it loads, and the
    # rest before the first stage runs: a bad path must not cost a GPTQ run of hours.
    recipe = hfcompress.Recipe.from_yaml(args.recipe)
    output = check_output(args.output, overwrite=args.overwrite)
    if args.checkpoint_dir is not None:
        check_folder(args.checkpoint_dir, flag="--checkpoint-dir")
    if args.push_to_hub:
        _check_push_target(args.push_to_hub)
    calibrating = [s.name for s in recipe if s.config.needs_calibration]
    if calibrating and args.calibration is None:
        raise HfCompressError(
            f"stage {calibrating[0]!r} needs calibration data; pass --calibration wikitext2:valid (or a text file)"
        )
    calibration = load_text(args.calibration) if calibrating else None
    eval_text = load_text(args.eval_data) if args.report else None
    torch.manual_seed(args.seed)

    logger.info("loading %s", args.model)
    model = load_model(args.model, task=args.task, strict=True, verify=True)
    is_lm = model.config.architectures[0].endswith(("ForCausalLM", "LMHeadModel"))
    # Only calibration and the report read text; a model folder without a tokenizer is
    # compressed by a recipe that needs none.
    tokenizer = (
        load_tokenizer(args.model) if calibrating or (args.report and is_lm) else _optional_tokenizer(args.model)
    )
    measure_kwargs = {
        "eval_text": eval_text if is_lm else None,
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
        calibration_data=calibration,
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
        _push(output, args.push_to_hub)
    if not args.report:
        return 0

    del model
    # Measure what was saved, not what is in memory.
    reloaded = load_model(str(output), task=args.task, strict=True, verify=True)
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

    text = load_text(args.eval_data)
    model = load_model(args.model, task=args.task or "causal-lm", strict=True, verify=True)
    tokenizer = load_tokenizer(args.model)
    result = text_perplexity(
        model,
        tokenizer,
        text,
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


def _verify(args: argparse.Namespace) -> int:
    from hfcompress.integrity import verify_checkpoint
    from hfcompress.models import load_model

    report = verify_checkpoint(args.folder)
    if report.unhashed_files:
        logger.warning(
            "%d file(s) record no digests (saved by another tool or an hfcompress before format 2): %s",
            len(report.unhashed_files),
            ", ".join(report.unhashed_files),
        )
    if not args.hashes_only:
        load_model(args.folder, strict=True, verify=False)  # the config describes what the files hold
    checked = "the hashes" if args.hashes_only else "the hashes, and the config against the files"
    print(f"{args.folder}: OK ({report.checked} compressed tensors in {report.files} file(s) match; checked {checked})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.command == "compress":
            return _compress(args)
        if args.command == "distill":
            return run_distill(args)
        if args.command == "verify":
            return _verify(args)
        if args.metric == "glue":
            return run_eval_glue(args)
        return _eval_ppl(args)
    except HfCompressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
