"""Unlabelled training text for distillation: perturbed copies of a GLUE split.

A distilled student learns the teacher's function, and the teacher can label any input, so
the student need not stop at the task's few thousand labelled examples. ``augment_glue``
writes ``copies`` perturbed versions of every example in which each word is replaced, with
probability ``replace_prob``, by one of its nearest neighbours in the teacher's own input
word-embedding table (cosine similarity; "movie" -> "film", "terrible" -> "dreadful"). This is
TinyBERT's data augmentation (Jiao et al., 2020) without its extra models: no GloVe vectors
and no masked-LM head are needed, only the embedding matrix every encoder has.

The copies carry no label (``UNLABELLED``: -100 for classes, NaN for STS-B scores); the
:class:`~hfcompress.integrations.trainer.DistillationTrainer` computes the task loss on
labelled rows only, and the KD and patient terms on every row. Fine-tuning alone cannot use
them, which is why this is a distillation technique.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hfcompress.techniques.pkd.loss import UNLABELLED

__all__ = ["UNLABELLED", "augment_glue", "embedding_neighbours"]

logger = logging.getLogger(__name__)

_WORD = re.compile(r"[A-Za-z]+|[^A-Za-z]+")


def _replaceable(token: str) -> bool:
    # Whole words only (no "##" pieces, no punctuation or digits), two letters or more.
    return len(token) > 1 and token.isascii() and token.isalpha()


def embedding_neighbours(
    embeddings: torch.Tensor, vocab: dict[str, int], words: set[str], *, k: int = 15
) -> dict[str, list[str]]:
    """The ``k`` nearest whole-word vocabulary entries of each of ``words`` (those that are
    single vocabulary entries themselves) by cosine similarity of their embedding rows."""
    candidates = sorted(t for t in vocab if _replaceable(t))
    if not candidates or k < 1:
        return {}
    embeddings = embeddings.detach().float().cpu()
    position = {t: i for i, t in enumerate(candidates)}
    table = F.normalize(embeddings[torch.tensor([vocab[t] for t in candidates])], dim=-1)
    queries = sorted(w for w in words if w in vocab and _replaceable(w))
    out: dict[str, list[str]] = {}
    for start in range(0, len(queries), 1024):
        chunk = queries[start : start + 1024]
        q = F.normalize(embeddings[torch.tensor([vocab[w] for w in chunk])], dim=-1)
        sims = q @ table.T
        # Leave the word itself out of its neighbours.
        own = torch.tensor([position.get(w, -1) for w in chunk])
        rows = torch.nonzero(own >= 0).flatten()
        sims[rows, own[rows]] = -math.inf
        top = sims.topk(min(k, len(candidates) - 1), dim=-1).indices
        for w, idx in zip(chunk, top.tolist(), strict=True):
            out[w] = [candidates[i] for i in idx]
    return out


def _match_case(new: str, old: str) -> str:
    if old.isupper() and len(old) > 1:
        return new.upper()
    if old[:1].isupper():
        return new[:1].upper() + new[1:]
    return new


def _perturb(text: str, neighbours: dict[str, list[str]], prob: float, rng: np.random.Generator) -> str:
    pieces = _WORD.findall(text)
    for i, piece in enumerate(pieces):
        options = neighbours.get(piece.lower())
        if options and rng.random() < prob:
            pieces[i] = _match_case(options[int(rng.integers(len(options)))], piece)
    return "".join(pieces)


def augment_glue(
    dataset,
    model_or_embeddings: nn.Module | torch.Tensor,
    tokenizer: Any,
    *,
    copies: int = 8,
    replace_prob: float = 0.3,
    neighbours: int = 15,
    seed: int = 0,
    include_original: bool = True,
):
    """The rows of a :func:`~hfcompress.glue.load_glue` dataset followed by ``copies``
    unlabelled, perturbed copies of each (copies equal to their original are left out).

    Args:
        dataset: A ``datasets.Dataset`` with ``text_a``, optional ``text_b`` and ``label``.
        model_or_embeddings: The teacher (its input embeddings are used) or an embedding
            matrix ``[vocab, hidden]`` indexed like ``tokenizer``'s vocabulary.
        tokenizer: The teacher's tokenizer; its vocabulary names the embedding rows.
        copies: Perturbed copies per example (>= 1).
        replace_prob: Probability that a word with neighbours is replaced, in (0, 1].
        neighbours: Neighbours each word is drawn from, uniformly.
        seed: Seed of the draws; the same seed gives the same copies.
        include_original: Keep the labelled rows first (False: the copies only).

    Returns:
        A ``datasets.Dataset`` with the input's columns; copies are labelled
        ``UNLABELLED`` (-100; NaN for a float label).
    """
    from datasets import Dataset

    if copies < 1:
        raise ValueError(f"copies={copies}: need an integer >= 1 (perturbed copies per example)")
    if not 0 < replace_prob <= 1:
        raise ValueError(f"replace_prob={replace_prob}: need a probability in (0, 1]")
    missing = {"text_a", "label"} - set(dataset.column_names)
    if missing:
        raise ValueError(f"dataset lacks the column(s) {sorted(missing)}; pass a split from hfcompress.glue.load_glue")
    if isinstance(model_or_embeddings, nn.Module):
        embeddings = model_or_embeddings.get_input_embeddings().weight
    else:
        embeddings = model_or_embeddings
    vocab = tokenizer.get_vocab()
    if embeddings.shape[0] < max(vocab.values()) + 1:
        raise ValueError(
            f"the embedding matrix has {embeddings.shape[0]} rows but the tokenizer's vocabulary needs "
            f"{max(vocab.values()) + 1}; pass the teacher that goes with this tokenizer"
        )
    text_columns = [c for c in ("text_a", "text_b") if c in dataset.column_names]
    columns = {c: list(dataset[c]) for c in dataset.column_names}
    words = {w.lower() for c in text_columns for text in columns[c] for w in _WORD.findall(text or "")}
    table = embedding_neighbours(embeddings, vocab, words, k=neighbours)
    if not table:
        logger.warning(
            "augment_glue: no word of the split is a whole-word entry of the tokenizer's vocabulary (a character- "
            "or byte-level tokenizer?), so no copy can be made; returning the labelled rows only"
        )

    float_labels = dataset.features["label"].dtype.startswith("float")
    blank = float("nan") if float_labels else UNLABELLED
    rng = np.random.default_rng(seed)
    out: dict[str, list] = {c: (list(v) if include_original else []) for c, v in columns.items()}
    for _ in range(copies):
        for i in range(len(dataset)):
            new = {
                c: _perturb(columns[c][i], table, replace_prob, rng) if columns[c][i] else columns[c][i]
                for c in text_columns
            }
            if all(new[c] == columns[c][i] for c in text_columns):
                continue
            for c in columns:
                out[c].append(new[c] if c in new else (blank if c == "label" else columns[c][i]))
    return Dataset.from_dict(out, features=dataset.features)
