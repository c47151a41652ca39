"""The ``hfcompress`` command line.

    hfcompress compress --model smollm2-135m --recipe recipes/smollm2_w4a16_rtn_g128.yaml \\
        --output outputs/smollm2-w4 --report
    hfcompress eval ppl --model outputs/smollm2-w4 --max-windows 40
    hfcompress eval glue --model minilm-l6 --finetune --tasks rte,mrpc --output-dir outputs/glue
    hfcompress verify outputs/smollm2-w4
    hfcompress export --model outputs/smollm2-w4 --format compressed-tensors --output outputs/smollm2-w4-ct --check
    hfcompress distill --teacher outputs/glue/minilm-l6-rte --task rte \\
        --recipe recipes/minilm_pkd_skip3.yaml --output outputs/minilm-pkd3-rte
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path

from hfcompress.cli_args import int_at_least
from hfcompress.errors import HfCompressError
from hfcompress.glue.commands import add_distill_parser, add_eval_glue_parser, run_distill, run_eval_glue
from hfcompress.models import TASKS, names_a_classifier

__all__ = ["build_parser", "main"]

logger = logging.getLogger("hfcompress")

# The README's documented evaluation subset: the first 40 windows of 512 tokens of the
# WikiText-2 test split (the same protocol as benchmarks/bench_gptq.py).
DEFAULT_EVAL_DATA = "wikitext2:test"
DEFAULT_SEQ_LEN = 512
DEFAULT_EVAL_WINDOWS = 40
DEFAULT_DECODE_TOKENS = 64


DTYPES = ("float32", "bfloat16", "float16", "auto")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="bundled name (smollm2-135m, minilm-l6), folder or Hub id")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="float dtype to load the model's weights in (auto: the checkpoint's own); half the memory in "
        "bfloat16/float16 (default: %(default)s)",
    )
    p.add_argument(
        "--task",
        choices=list(TASKS),
        default=None,
        help="default: from the config (feature-extraction: the base model without a head, e.g. a "
        "sentence-embedding encoder)",
    )


def _add_eval_args(p: argparse.ArgumentParser, windows_default: int | None) -> None:
    p.add_argument(
        "--eval-data",
        default=DEFAULT_EVAL_DATA,
        help="wikitext2:test, wikitext2:valid (or the Hub's names, wikitext:test, ...) or a text file",
    )
    p.add_argument(
        "--seq-len",
        type=int_at_least(2),
        default=DEFAULT_SEQ_LEN,
        help="tokens per perplexity window (default: %(default)s)",
    )
    p.add_argument(
        "--max-windows",
        type=int_at_least(1),
        default=windows_default,
        help="score the first N windows (default: "
        + ("all of them" if windows_default is None else "%(default)s")
        + ")",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hfcompress", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="compress a model with a recipe and save it")
    _add_model_args(c)
    c.add_argument("--recipe", required=True, help="recipe YAML file, or a shipped recipe by name (llama_w8a8_dynamic)")
    c.add_argument("--output", required=True, help="folder to save the compressed model into")
    c.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --output")
    c.add_argument(
        "--calibration",
        default=None,
        help="calibration text: wikitext2:valid (or the Hub's name, wikitext:validation), a text file, or a "
        ".jsonl/.json/.csv/.tsv/.parquet table with a 'text' column (or chat 'messages', laid out by the "
        "tokenizer's chat template); needed by calibrating stages (gptq, awq, smoothquant, static "
        "int8_activations, ...)",
    )
    c.add_argument(
        "--num-calibration-samples",
        type=int_at_least(1),
        default=128,
        help="calibration windows drawn from the text (default: %(default)s)",
    )
    c.add_argument(
        "--calibration-seq-len",
        type=int_at_least(2),
        default=512,
        help="tokens per calibration window (default: %(default)s)",
    )
    c.add_argument(
        "--seed", type=int, default=0, help="seed for drawing the windows and for stages (default: %(default)s)"
    )
    c.add_argument(
        "--checkpoint-dir", default=None, help="persist finished blocks of layerwise stages here; rerun to resume"
    )
    c.add_argument("--device", default=None, help="compute device for layerwise stages (default: keep)")
    c.add_argument("--push-to-hub", default=None, metavar="REPO", help="also upload the saved model to this repo")
    c.add_argument("--report", action="store_true", help="measure before and after, print a table")
    c.add_argument(
        "--decode-tokens",
        type=int_at_least(0),
        default=DEFAULT_DECODE_TOKENS,
        help="for --report: tokens to decode for the speed row; 0 skips (default: %(default)s)",
    )
    _add_eval_args(c, DEFAULT_EVAL_WINDOWS)

    e = sub.add_parser("eval", help="measure a model")
    esub = e.add_subparsers(dest="metric", required=True)
    ppl = esub.add_parser("ppl", help="perplexity over non-overlapping windows of a text")
    _add_model_args(ppl)
    _add_eval_args(ppl, None)
    ppl.add_argument(
        "--batch-size", type=int_at_least(1), default=1, help="windows scored per forward (default: %(default)s)"
    )
    ppl.add_argument("--json", action="store_true", help="print the result as JSON")
    add_eval_glue_parser(esub)
    add_distill_parser(sub)

    x = sub.add_parser("export", help="write a compressed model in another tool's format (compressed-tensors)")
    x.add_argument("--model", required=True, help="a folder saved by hfcompress")
    x.add_argument("--format", choices=["compressed-tensors"], default="compressed-tensors")
    x.add_argument("--output", required=True, help="folder to write the export into")
    x.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --output")
    x.add_argument(
        "--requantize-group-size",
        type=int_at_least(1),
        default=None,
        metavar="G",
        help="re-quantize layers with a partial last group at group size G (the format has no partial groups; "
        "the perplexity change is printed) instead of refusing them",
    )
    x.add_argument(
        "--check", action="store_true", help="load the export with plain transformers and compare logits with ours"
    )
    _add_eval_args(x, 8)

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
    from hfcompress.card import layer_errors, write_card
    from hfcompress.data import load_text, read_calibration_source
    from hfcompress.eval.fidelity import encoder_outputs, output_fidelity, report_lines
    from hfcompress.eval.size import compressed_layer_names, linear_layer_stats, size_report, total_bytes
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
    # Read now, to fail before the model loads; passed on as rows (text, chats or ids), not as a source name.
    calibration = read_calibration_source(args.calibration) if calibrating else None
    eval_text = load_text(args.eval_data) if args.report else None
    torch.manual_seed(args.seed)

    logger.info("loading %s", args.model)
    model = load_model(args.model, task=args.task, dtype=_dtype(args.dtype), strict=True, verify=True)
    _warn_if_the_head_is_new(model, args.model)
    is_lm = _generates_text(model)
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
        # An encoder has no perplexity: its outputs on lines of the evaluation text are kept, to
        # compare the compressed model's with.
        lines = report_lines(eval_text) if not is_lm and tokenizer is not None else []
        reference = encoder_outputs(model, tokenizer, lines) if lines else None

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
    card = _card_info(args, recipe)
    hfcompress.save_pretrained(model, output, tokenizer=tokenizer, card=card)
    wall = time.perf_counter() - start
    logger.info("saved %s in %.1f s", output, wall)
    if not args.report:
        if args.push_to_hub:
            _push(output, args.push_to_hub)
        return 0

    card.layer_errors = layer_errors(model)
    del model
    # Measure what was saved, not what is in memory.
    reloaded = load_model(str(output), task=args.task, dtype=_dtype(args.dtype), strict=True, verify=True)
    after_size = size_report(reloaded)
    names = compressed_layer_names(reloaded)
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
    protocol = _protocol(args, before, torch.get_num_threads())
    if reference is not None:
        outputs, classifier = reference
        fidelity = output_fidelity(outputs, encoder_outputs(reloaded, tokenizer, lines)[0], classifier=classifier)
        what = "logits" if classifier else "mean-pooled embeddings"
        line = (
            f"Outputs ({what}) of the reloaded model against the original's on {fidelity.texts} lines of "
            f"{args.eval_data}: {fidelity.describe()}"
        )
        print(f"\n{line}")
        protocol += f" {line}."
    # The card now carries what this run measured; the upload (if any) comes after it.
    card.measurements, card.protocol = [before, after], protocol
    write_card(output, reloaded, card)
    if args.push_to_hub:
        _push(output, args.push_to_hub)
    return 0


def _dtype(name: str):
    """``--dtype`` as ``from_pretrained`` takes it."""
    import torch

    return name if name == "auto" else getattr(torch, name)


def _card_info(args: argparse.Namespace, recipe):
    from hfcompress.card import CardInfo
    from hfcompress.models import BUNDLED_MODELS

    bundled = BUNDLED_MODELS.get(args.model)
    return CardInfo(
        base_model=bundled.hub_id if bundled else args.model,
        license=bundled.license if bundled else None,
        recipe=recipe.to_dict(),
    )


def _protocol(args: argparse.Namespace, before, threads: int) -> str:
    parts = []
    if before.perplexity is not None:
        parts.append(
            f"Perplexity: {args.eval_data}, first {before.perplexity.windows} non-overlapping windows of "
            f"{args.seq_len} tokens."
        )
    if before.speed is not None:
        parts.append(f"Decode: greedy, batch 1, {args.decode_tokens} new tokens, {threads} torch threads.")
    parts.append("Wall: compression + save. The compressed row is the saved model, reloaded.")
    return " ".join(parts)


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
    from hfcompress.models import default_task, load_model, load_tokenizer

    text = load_text(args.eval_data)
    # A causal LM's perplexity; a vision-language model's is its language model's, on text.
    task = args.task or ("image-text-to-text" if default_task(args.model) == "image-text-to-text" else "causal-lm")
    model = load_model(args.model, task=task, dtype=_dtype(args.dtype), strict=True, verify=True)
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


def _warn_if_the_head_is_new(model, name: str) -> None:
    """A base encoder (all-MiniLM-L6-v2's ``BertModel``) loaded as a classifier gets a random
    head, which the compressed model then saves as if it were trained."""
    architectures = getattr(model.config, "architectures", None) or []
    head = type(model).__name__
    if head.endswith("ForSequenceClassification") and not names_a_classifier(model.config):
        logger.warning(
            "%s is a base model (%s) without a classification head: the saved %s's classifier is random. "
            "Fine-tune it first (hfcompress eval glue --finetune, then compress the fine-tuned folder), or pass "
            "--task feature-extraction to compress the encoder alone",
            name,
            ", ".join(architectures) or "no architectures in its config",
            head,
        )


def _generates_text(model) -> bool:
    """A causal LM or a vision-language model (measured by perplexity and decoding on text),
    not a classifier."""
    can_generate = getattr(model, "can_generate", None)
    return bool(callable(can_generate) and can_generate())


def _export(args: argparse.Namespace) -> int:
    import torch

    from hfcompress.data import load_text
    from hfcompress.eval.perplexity import text_perplexity
    from hfcompress.export import check_with_transformers, export_compressed_tensors, plan_compressed_tensors
    from hfcompress.models import load_model, load_tokenizer
    from hfcompress.quant.dispatch import reference_path
    from hfcompress.saving import check_output

    output = check_output(args.output, overwrite=args.overwrite)
    model = load_model(args.model, strict=True, verify=True)
    requantize = args.requantize_group_size
    # Refuse what the format cannot express before anything is measured or written.
    plan_compressed_tensors(model, partial_groups=requantize is not None)
    ppl_before = None
    is_lm = _generates_text(model)
    measure = requantize is not None and is_lm
    tokenizer = load_tokenizer(args.model) if measure else _optional_tokenizer(args.model)
    if measure:
        text = load_text(args.eval_data)

        def ppl() -> float:
            return text_perplexity(
                model, tokenizer, text, seq_len=args.seq_len, max_windows=args.max_windows, progress=not args.quiet
            ).perplexity

        ppl_before = ppl()
    summary = export_compressed_tensors(model, output, tokenizer=tokenizer, requantize_group_size=requantize)
    print(f"exported {args.model} to {output} (compressed-tensors)")
    for name, group in summary.groups.items():
        print(f"  {name}: {group['layers']} layer(s), {group['num_bits']}-bit weights, format {group['format']}")
    if summary.requantized:
        print(f"  re-quantized at group size {requantize}: {len(summary.requantized)} layer(s) with a partial group")
        if ppl_before is not None:
            after = ppl()
            print(
                f"  perplexity ({args.eval_data}, first {args.max_windows} windows of {args.seq_len}): "
                f"{ppl_before:.3f} before, {after:.3f} after re-quantizing ({100 * (after / ppl_before - 1):+.2f}%)"
            )
    if args.check:
        vocab = model.config.vocab_size
        ids = torch.randint(0, vocab, (1, 32), generator=torch.Generator().manual_seed(0))
        with reference_path(), torch.no_grad():  # the float32 reference path: what the export computes
            ours = model(input_ids=ids).logits.float()
        theirs, info = check_with_transformers(output, ids)
        diff = (ours - theirs).abs().max().item()
        print(
            f"  plain transformers loaded it as {info['class']} (no hfcompress import); max |logit difference| "
            f"against our float32 reference path: {diff:.3g} (largest logit {ours.abs().max().item():.3g})"
        )
    return 0


@contextlib.contextmanager
def _library_progress_bars(show: bool) -> Iterator[None]:
    """transformers' and huggingface_hub's own bars (loading and writing weights, downloads)
    off while the command runs when ``show`` is False (``--quiet``); restored afterwards."""
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as transformers_logging

    was_on = transformers_logging.is_progress_bar_enabled(), not hub_utils.are_progress_bars_disabled()
    if not show:
        transformers_logging.disable_progress_bar()
        hub_utils.disable_progress_bars()
    try:
        yield
    finally:
        if not show and was_on[0]:
            transformers_logging.enable_progress_bar()
        if not show and was_on[1]:
            hub_utils.enable_progress_bars()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s")
    with _library_progress_bars(not args.quiet):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        if args.command == "compress":
            return _compress(args)
        if args.command == "distill":
            return run_distill(args)
        if args.command == "verify":
            return _verify(args)
        if args.command == "export":
            return _export(args)
        if args.metric == "glue":
            return run_eval_glue(args)
        return _eval_ppl(args)
    except HfCompressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
