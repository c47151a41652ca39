"""Measure a model (size, perplexity, decode speed) and print models side by side."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from hfcompress.eval.perplexity import PerplexityResult, text_perplexity
from hfcompress.eval.size import SizeReport
from hfcompress.eval.speed import DecodeSpeed, decode_speed

__all__ = ["ModelMeasurement", "format_table", "measure"]


@dataclass(frozen=True)
class ModelMeasurement:
    """One row of a before/after table."""

    label: str
    size: SizeReport
    perplexity: PerplexityResult | None
    speed: DecodeSpeed | None
    wall_seconds: float | None  # time to produce this model (compression + save), if any


def measure(
    label: str,
    model,
    tokenizer,
    *,
    size: SizeReport,
    eval_text: str | None,
    seq_len: int,
    max_windows: int | None,
    decode_tokens: int,
    wall_seconds: float | None = None,
    progress: bool = True,
) -> ModelMeasurement:
    """Measure perplexity when ``eval_text`` is given and decode speed when ``decode_tokens``
    > 0; ``size`` comes from :func:`hfcompress.eval.size_report`."""
    ppl = None
    if eval_text is not None:
        ppl = text_perplexity(model, tokenizer, eval_text, seq_len=seq_len, max_windows=max_windows, progress=progress)
    speed = decode_speed(model, tokenizer, new_tokens=decode_tokens) if decode_tokens > 0 else None
    return ModelMeasurement(label, size, ppl, speed, wall_seconds)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def format_table(rows: Sequence[ModelMeasurement]) -> str:
    """A markdown table of the measurements; ratios are relative to the first row."""
    header = [
        "model",
        "all weights",
        "quantized layers",
        "bits/weight",
        "x fp16",
        "perplexity",
        "decode tok/s",
        "speed-up",
        "wall (s)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base = rows[0]
    for row in rows:
        ppl = f"{row.perplexity.perplexity:.3f}" if row.perplexity else "-"
        tps = f"{row.speed.tokens_per_second:.1f}" if row.speed else "-"
        speedup = (
            f"{row.speed.tokens_per_second / base.speed.tokens_per_second:.2f}x" if row.speed and base.speed else "-"
        )
        bits = row.size.bits_per_weight
        cells = [
            row.label,
            _mb(row.size.total_bytes),
            _mb(row.size.layer_bytes),
            f"{bits:.2f}" if not math.isnan(bits) else "-",
            f"{row.size.fraction_of_fp16:.3f}" if not math.isnan(bits) else "-",
            ppl,
            tps,
            speedup,
            f"{row.wall_seconds:.1f}" if row.wall_seconds is not None else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
