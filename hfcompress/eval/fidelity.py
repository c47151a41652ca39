"""How closely a compressed encoder follows the original: the report's quality line for models
that have no perplexity (BERT-style classifiers and sentence-embedding encoders).

The outputs compared are a classifier's logits, or a base encoder's mean-pooled last hidden
states (the sentence embedding sentence-transformers computes for all-MiniLM-L6-v2), on the
same lines of text, in eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hfcompress.modes import evaluating

__all__ = ["OutputFidelity", "encoder_outputs", "output_fidelity", "report_lines"]


@dataclass(frozen=True)
class OutputFidelity:
    """The compressed model's outputs against the original's, text by text."""

    texts: int
    cosine: float | None  # mean cosine similarity of the two outputs of each text (None: one output)
    min_cosine: float | None
    agreement: float | None  # classifiers: the fraction of texts given the same class
    max_difference: float  # the largest absolute difference of any output value

    def describe(self) -> str:
        parts = []
        if self.cosine is not None:
            parts.append(f"mean cosine {self.cosine:.5f} (lowest {self.min_cosine:.5f})")
        if self.agreement is not None:
            parts.append(f"the same class for {100 * self.agreement:.1f}% of them")
        parts.append(f"largest difference {self.max_difference:.4g}")
        return ", ".join(parts)


def report_lines(text: str, count: int = 256, min_words: int = 5) -> list[str]:
    """The first ``count`` lines of ``text`` with at least ``min_words`` words (headings and
    blank lines skipped), stripped."""
    lines = [line.strip() for line in text.splitlines()]
    return [line for line in lines if len(line.split()) >= min_words and not line.startswith("=")][:count]


@torch.no_grad()
def encoder_outputs(
    model: nn.Module, tokenizer, texts: list[str], *, batch_size: int = 32, max_length: int = 128
) -> tuple[torch.Tensor, bool]:
    """The model's output for each text, ``[len(texts), D]`` in float32, and whether it is a
    classifier's logits (else mean-pooled last hidden states)."""
    device = next(model.parameters()).device
    rows, logits = [], False
    with evaluating(model):
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[start : start + batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
            ).to(device)
            out = model(**batch)
            if getattr(out, "logits", None) is not None:
                rows.append(out.logits.float().reshape(out.logits.shape[0], -1))
                logits = True
            else:
                hidden = out.last_hidden_state.float()
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                rows.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))
    return torch.cat(rows).cpu(), logits


def output_fidelity(before: torch.Tensor, after: torch.Tensor, *, classifier: bool) -> OutputFidelity:
    """Compare the outputs :func:`encoder_outputs` gave for the original and the compressed model."""
    if before.shape != after.shape:
        raise ValueError(f"outputs of different shapes: {tuple(before.shape)} and {tuple(after.shape)}")
    if before.shape[-1] == 1:  # a regressor (STS-B): one score, no direction and no class
        return OutputFidelity(len(before), None, None, None, (before - after).abs().max().item())
    cosine = F.cosine_similarity(before, after, dim=-1)
    agreement = (before.argmax(-1) == after.argmax(-1)).float().mean().item() if classifier else None
    return OutputFidelity(
        len(before), cosine.mean().item(), cosine.min().item(), agreement, (before - after).abs().max().item()
    )
