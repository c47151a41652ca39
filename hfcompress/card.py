"""Model cards: the README.md (with its Hub metadata) and plots written beside a saved model.

:func:`hfcompress.save_pretrained` writes one for every compressed model: the recipe, the
sizes, and a per-layer quantization-error plot. ``hfcompress compress --report`` rewrites it
once the run has measured the model before and after (perplexity, decode speed), adding the
size-against-quality plot. The plots are SVG files written here (no plotting dependency);
the Hub shows them inline.

The front matter carries what the Hub reads: ``base_model`` (with ``base_model_relation:
quantized``), ``library_name``, ``license`` (only when known: the bundled models' are, or pass
``license=``), ``pipeline_tag`` and ``tags``.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from hfcompress.eval.size import size_report, total_bytes
from hfcompress.kinds import compressed_modules
from hfcompress.mixed_precision.plan import Choice, grid_table
from hfcompress.quant.linear import QuantLinear
from hfcompress.report import format_table

__all__ = ["CardInfo", "layer_errors", "render_card", "write_card"]

LAYER_ERROR_PLOT = "hfcompress_layer_error.svg"
SIZE_QUALITY_PLOT = "hfcompress_size_quality.svg"

_PIPELINES = {"ForCausalLM": "text-generation", "ForSequenceClassification": "text-classification"}


@dataclass
class CardInfo:
    """What a card says beyond what the model itself holds.

    Attributes:
        base_model: The Hub id (or path) of the model that was compressed.
        license: Its licence identifier (``apache-2.0``, ...); left out of the metadata when None.
        recipe: The recipe as a mapping (defaults to the one the model's config records).
        measurements: The run's before/after rows (:class:`hfcompress.report.ModelMeasurement`),
            the first being the original.
        protocol: One line saying how the measurements were taken.
        layer_errors: Relative weight error ``||W - Q(W)|| / ||W||`` per compressed layer
            (defaults to what the compressing stages recorded on the layers).
    """

    base_model: str | None = None
    license: str | None = None
    recipe: dict[str, Any] | None = None
    measurements: Sequence[Any] = ()
    protocol: str | None = None
    layer_errors: dict[str, float] = field(default_factory=dict)


def layer_errors(model: nn.Module) -> dict[str, float]:
    """The relative weight error each compressing stage recorded on its layers."""
    return {name: float(m.quant_error) for name, m in compressed_modules(model).items() if hasattr(m, "quant_error")}


def _recipe(model: nn.Module) -> dict[str, Any] | None:
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    recipe = getattr(qc, "recipe", None)
    return recipe if isinstance(recipe, dict) else None


def _pipeline(model: nn.Module) -> str | None:
    arch = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
    return next((tag for suffix, tag in _PIPELINES.items() if arch.endswith(suffix)), None)


def _front_matter(model: nn.Module, info: CardInfo, recipe: dict[str, Any] | None) -> str:
    techniques = sorted({s.get("technique") for s in (recipe or {}).get("stages", []) if s.get("technique")})
    bits = sorted({m.bits for m in compressed_modules(model).values() if hasattr(m, "bits")})
    meta: dict[str, Any] = {}
    if info.base_model:
        meta["base_model"] = info.base_model
        meta["base_model_relation"] = "quantized"
    meta["library_name"] = "transformers"
    if info.license:
        meta["license"] = info.license
    pipeline = _pipeline(model)
    if pipeline:
        meta["pipeline_tag"] = pipeline
    meta["tags"] = ["hfcompress", "compressed", *techniques, *(f"{b}-bit" for b in bits)]
    lines = ["---"]
    for key, value in meta.items():
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines += [f"- {json.dumps(v)}" for v in value]
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    lines.append("---")
    return "\n".join(lines)


def _svg(width: int, height: int, body: list[str], title: str) -> str:
    return "\n".join(
        [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
            f"<title>{html.escape(title)}</title>",
            f'<rect width="{width}" height="{height}" fill="white"/>',
            *body,
            "</svg>",
        ]
    )


def layer_error_svg(errors: dict[str, float]) -> str:
    """Bars of each layer's relative weight error, in model order."""
    names = list(errors)
    w, h, left, bottom, top = max(480, 6 * len(names) + 80), 260, 60, 40, 30
    plot_w, plot_h = w - left - 20, h - top - bottom
    peak = max(errors.values()) or 1.0
    bar = plot_w / max(len(names), 1)
    body = [
        f'<text x="{w / 2}" y="18" text-anchor="middle" font-size="13">Relative weight error per layer '
        "(||W - Q(W)|| / ||W||)</text>",
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="black"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="black"/>',
    ]
    for frac in (0.0, 0.5, 1.0):
        y = top + plot_h * (1 - frac)
        body.append(f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{peak * frac:.3g}</text>')
    for i, name in enumerate(names):
        bh = plot_h * errors[name] / peak
        x = left + i * bar
        body.append(
            f'<rect x="{x:.1f}" y="{top + plot_h - bh:.1f}" width="{max(bar - 1, 1):.1f}" height="{bh:.1f}" '
            f'fill="#4c72b0"><title>{html.escape(name)}: {errors[name]:.4f}</title></rect>'
        )
    body.append(f'<text x="{left + plot_w / 2}" y="{h - 10}" text-anchor="middle">layer (model order)</text>')
    return _svg(w, h, body, "per-layer quantization error")


def size_quality_svg(points: list[tuple[str, float, float]]) -> str:
    """Each model's size (MB, all weights) against its perplexity."""
    w, h, left, bottom, top, right = 640, 300, 70, 45, 30, 300
    plot_w, plot_h = w - left - right, h - top - bottom
    xs, ys = [p[1] for p in points], [p[2] for p in points]
    x0, x1 = 0.0, max(xs) * 1.1
    y0, y1 = min(ys) * 0.95, max(ys) * 1.05
    body = [
        f'<text x="{(left + plot_w / 2)}" y="18" text-anchor="middle" font-size="13">Size against quality</text>',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="black"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="black"/>',
        f'<text x="{left + plot_w / 2}" y="{h - 8}" text-anchor="middle">size of all weights (MB)</text>',
        f'<text x="14" y="{top + plot_h / 2}" transform="rotate(-90 14 {top + plot_h / 2})" '
        'text-anchor="middle">perplexity (lower is better)</text>',
    ]
    for frac in (0.0, 0.5, 1.0):
        body.append(
            f'<text x="{left + plot_w * frac:.1f}" y="{top + plot_h + 14}" text-anchor="middle">'
            f"{x0 + (x1 - x0) * frac:.0f}</text>"
        )
        body.append(
            f'<text x="{left - 4}" y="{top + plot_h * (1 - frac) + 4:.1f}" text-anchor="end">'
            f"{y0 + (y1 - y0) * frac:.3g}</text>"
        )
    colours = ("#4c72b0", "#dd8452", "#55a868", "#c44e52")
    for i, (label, x, y) in enumerate(points):
        px = left + plot_w * (x - x0) / (x1 - x0)
        py = top + plot_h * (1 - (y - y0) / (y1 - y0))
        c = colours[i % len(colours)]
        body.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="5" fill="{c}"/>')
        body.append(f'<text x="{left + plot_w + 10}" y="{top + 14 * (i + 1)}" fill="{c}">{html.escape(label)}</text>')
    return _svg(w, h, body, "size against quality")


def render_card(model: nn.Module, info: CardInfo) -> tuple[str, dict[str, str]]:
    """The README.md text and the plot files (name -> SVG text) for ``model``."""
    recipe = info.recipe if info.recipe is not None else _recipe(model)
    errors = info.layer_errors or layer_errors(model)
    layers = compressed_modules(model)
    # Sizes per weight of the compressed layers as the model computes them (a low-rank layer
    # with its factors); other tensors count in the total.
    size = size_report(model) if layers else None
    title = f"{info.base_model.rstrip('/').split('/')[-1]}, compressed" if info.base_model else "Compressed model"
    out = [_front_matter(model, info, recipe), "", f"# {title}", ""]
    base = f"[`{info.base_model}`](https://huggingface.co/{info.base_model})" if info.base_model else "a model"
    out.append(
        f"{base} compressed with [hfcompress](https://github.com/hfcompress/hfcompress): "
        f"{len(layers)} compressed layer(s). Load it with `import hfcompress` and "
        "`AutoModel*.from_pretrained(...)` (a compressed-tensors export, for vLLM, is `hfcompress export`)."
    )
    out += ["", "## Size", "", "| | |", "|---|---|"]
    out.append(f"| all weights | {total_bytes(model) / 1e6:.1f} MB |")
    if size is not None:
        out.append(
            f"| compressed layers | {size.layer_bytes / 1e6:.1f} MB, {size.bits_per_weight:.2f} bits per weight "
            f"(scales and zero points included), {size.fraction_of_fp16:.3f}x their float16 size |"
        )
    from hfcompress.integrations.kv_cache import kv_config

    kv = kv_config(model)
    if kv is not None:
        out += [
            "",
            "## KV cache",
            "",
            f"`generate()` stores keys and values in {kv.bits} bits (KIVI: keys per channel over groups of "
            f"{kv.group_size} tokens, values per token), the first {kv.sink_tokens} tokens and the "
            f"{kv.residual_length} most recent in full precision; attention reads the packed cache. "
            "`from_pretrained` switches it on (with `import hfcompress`).",
        ]
    from hfcompress.techniques.block_sparse.attention import sparse_config

    sparse = sparse_config(model)
    if sparse is not None:
        out += [
            "",
            "## Block-sparse attention",
            "",
            f"Attention computes about {100 * sparse.density:g}% of its {sparse.block_size}x{sparse.block_size} "
            f"tiles (layout `{sparse.layout}`, {sparse.sink_blocks} sink block(s) always kept) on forwards over "
            "a whole sequence longer than one block; decoding steps attend densely. `from_pretrained` switches "
            "it on (with `import hfcompress`).",
        ]
    files: dict[str, str] = {}
    out += ["", "## Measured before and after", ""]
    if info.measurements:
        if info.protocol:
            out += [info.protocol, ""]
        out += [format_table(info.measurements), ""]
        points = [
            (m.label, m.size.total_bytes / 1e6, m.perplexity.perplexity)
            for m in info.measurements
            if m.perplexity is not None
        ]
        if len(points) >= 2:
            files[SIZE_QUALITY_PLOT] = size_quality_svg(points)
            out += [f"![size against quality]({SIZE_QUALITY_PLOT})", ""]
    else:
        out += ["Nothing was measured in the run that saved this model (`hfcompress compress --report` does).", ""]
    if errors:
        files[LAYER_ERROR_PLOT] = layer_error_svg(errors)
        worst = sorted(errors.items(), key=lambda kv: -kv[1])[:3]
        out += [
            "## Quantization error per layer",
            "",
            f"![per-layer quantization error]({LAYER_ERROR_PLOT})",
            "",
            "Largest: " + ", ".join(f"`{n}` {e:.4f}" for n, e in worst) + ".",
            "",
        ]
    grids = {
        n: Choice(m.bits, -1 if m.group_size == m.in_features else m.group_size)
        for n, m in layers.items()
        if isinstance(m, QuantLinear)
    }
    if len(set(grids.values())) > 1:  # mixed precision: say which layer got which grid
        out += ["## Bits per layer", "", "Weight bits and group size (`pc`: per channel) of each layer.", ""]
        out += [grid_table(grids), ""]
    if recipe is not None:
        out += ["## Recipe", "", "```json", json.dumps(recipe, indent=2), "```", ""]
    return "\n".join(out), files


def write_card(folder: str | os.PathLike, model: nn.Module, info: CardInfo | None = None) -> Path:
    """Write (or replace) README.md and its plots in ``folder``; each file atomically."""
    folder = Path(folder)
    text, files = render_card(model, info or CardInfo())
    for name, content in {**files, "README.md": text}.items():
        tmp = folder / f".{name}.tmp-{os.getpid()}"
        tmp.write_text(content)
        os.replace(tmp, folder / name)
    return folder / "README.md"
