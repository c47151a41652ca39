"""Applies :class:`AWQConfig` block by block on SmoothQuant's machinery (mapping discovery,
exactness test, folding): only the factors and how they are chosen differ."""

from __future__ import annotations

import logging

import torch
from torch import nn

from hfcompress.kinds import linear_weight
from hfcompress.layerwise import Block
from hfcompress.quant.affine import group_view, quantize_rtn, resolve_group_size
from hfcompress.techniques.awq.config import AWQConfig
from hfcompress.techniques.smoothquant.modifier import (
    Mapping,
    SmoothQuantModifier,
    output_size,
    smooth,
    to_source,
)

__all__ = ["AWQModifier", "awq_scales", "relative_weight_mean"]

logger = logging.getLogger(__name__)


def relative_weight_mean(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """``mean_i |W_ij| / max|group of W_ij|``: each input column's weight size relative to the
    range of the groups it sits in, averaged over the rows (``[K]`` float32)."""
    k = w.shape[1]
    g = group_view(w.detach().float().abs(), resolve_group_size(group_size, k))
    g = g / g.amax(dim=-1, keepdim=True).clamp(min=1e-12)
    return g.reshape(w.shape[0], -1)[:, :k].mean(dim=0)


def awq_scales(x_mean: torch.Tensor, w_mean: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """AWQ's factors ``mean|x|^alpha / mean|w|^(1 - alpha)`` (``w_mean`` None: the numerator
    alone), normalized so that ``sqrt(max * min) = 1``; a channel no calibration token used
    keeps the factor 1."""
    s = x_mean.float().clamp(min=1e-4).pow(alpha)
    if w_mean is not None:
        s = s / w_mean.float().clamp(min=1e-4).pow(1 - alpha)
    used = x_mean > 0
    s = s.clamp(min=1e-4)
    if used.any():
        s = s / (s[used].max() * s[used].min()).sqrt()
    return torch.where(used, s, torch.ones_like(s))


class AWQModifier(SmoothQuantModifier):
    config: AWQConfig
    description = "AWQ"
    prepares = "weight quantization"
    example = "an rtn or gptq stage with the same bits and group_size, as recipes/llama_w4a16_awq_gptq_g128.yaml has"

    def _followers(self) -> tuple[type, ...]:
        from hfcompress.techniques.weight_quant import WeightQuantModifier

        return (WeightQuantModifier,)

    def _smooth_block(self, block: Block, mappings: list[Mapping]) -> None:
        stats = self._input_stats(block, mappings)
        alphas: dict[str, float | None] = {}
        for mapping in mappings:
            x_mean, sample = stats[mapping.source]
            s, alphas[mapping.source] = self._search(block.module, mapping, x_mean, sample)
            if s is not None:
                smooth(block.module, mapping, s)
        self.alphas[block.prefix] = alphas

    def _input_stats(self, block: Block, mappings: list[Mapping]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per mapping: ``mean|x|`` per reader channel over all calibration tokens, and the
        first ``search_tokens`` tokens' inputs ``[T, K]`` for the search."""
        limit = self.config.search_tokens
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        samples: dict[str, list[torch.Tensor]] = {}

        def record(source: str, x: torch.Tensor) -> torch.Tensor:
            total = x.abs().sum(dim=0, dtype=torch.float64)  # a NaN or an infinity in x stays in it
            sums[source] = sums[source] + total if source in sums else total
            counts[source] = counts.get(source, 0) + x.shape[0]
            kept = samples.setdefault(source, [])
            room = limit - sum(t.shape[0] for t in kept)
            if room > 0:
                kept.append(x[:room].to(torch.float32, copy=True))
            return total

        self._watch_inputs(block, mappings, record)
        return {s: ((sums[s] / counts[s]).float(), torch.cat(samples[s])) for s in sums}

    def _search(
        self, module: nn.Module, mapping: Mapping, x_mean: torch.Tensor, x: torch.Tensor
    ) -> tuple[torch.Tensor | None, float | None]:
        """The factors (on the source's channels) and exponent whose round-to-nearest readers
        come closest to their float outputs on ``x``; ``(None, None)`` when no scaling does."""
        cfg = self.config
        weights = [linear_weight(module.get_submodule(r)).detach().float() for r in mapping.readers]
        size = output_size(module.get_submodule(mapping.source))
        index = mapping.reader_index(x.shape[1], x.device)
        x_src = to_source(mapping, x_mean.to(x.device), size, "mean")
        w_src = None
        if cfg.duo_scaling:
            rows = sum(w.shape[0] for w in weights)
            w_mean = sum(relative_weight_mean(w, cfg.group_size) * (w.shape[0] / rows) for w in weights)
            w_src = to_source(mapping, w_mean, size, "mean")
        # A reader's output error on x is ||x d^T||^2 = sum((d @ h) * d) with d = w_hat - w and
        # h = x^T x: one product over the tokens per mapping instead of one per candidate and
        # reader, and no difference of two large outputs.
        h = x.t() @ x

        def error(s_src: torch.Tensor | None) -> float:
            s = None if s_src is None else (s_src if index is None else s_src[index])
            total = 0.0
            for w in weights:
                scaled = w if s is None else w * s
                q = quantize_rtn(scaled, bits=cfg.bits, group_size=cfg.group_size, symmetric=cfg.symmetric)
                d = (q.dequantize() if s is None else q.dequantize() / s) - w
                total += float(((d @ h) * d).sum())
            return total

        best, best_alpha, best_error = None, None, error(None)
        errors = {"none": best_error}
        for i in range(cfg.grid):
            alpha = i / cfg.grid
            s = awq_scales(x_src, w_src, alpha)
            errors[f"{alpha:g}"] = e = error(s)
            if e < best_error:
                best, best_alpha, best_error = s, alpha, e
        logger.debug("%s: output error by exponent %s", mapping.source, errors)
        return best, best_alpha
