"""Perplexity over non-overlapping windows of a token stream.

Protocol: tokenize the whole text once (no special tokens added), cut it into
``floor(tokens / seq_len)`` non-overlapping windows of ``seq_len`` tokens (the remainder is
dropped), keep the first ``max_windows`` (all when None), and score every window
independently: the model sees the window alone and predicts tokens 2..seq_len of it.
``perplexity = exp(total NLL / predicted tokens)``. This is the GPTQ / llm-compressor
evaluation with a configurable window length.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from hfcompress.architectures import text_config
from hfcompress.errors import EvaluationError
from hfcompress.modes import evaluating

__all__ = ["PerplexityResult", "perplexity", "text_perplexity"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PerplexityResult:
    """Attributes:
    perplexity: ``exp(nll)``.
    nll: Mean negative log-likelihood per predicted token, in nats.
    tokens: Predicted tokens scored.
    windows: Windows scored.
    seq_len: Tokens per window.
    """

    perplexity: float
    nll: float
    tokens: int
    windows: int
    seq_len: int


def _token_stream(input_ids, model: torch.nn.Module, seq_len: int) -> torch.Tensor:
    """``input_ids`` as ``[T]`` (a tokenizer's ``[1, T]`` too), checked against the model:
    an :class:`EvaluationError` for text, other shapes, ids outside the vocabulary, windows
    longer than ``max_position_embeddings`` or a transformers model that does not generate."""
    if not isinstance(input_ids, torch.Tensor):
        raise EvaluationError(
            f"input_ids must be a tensor of token ids, got {type(input_ids).__name__}; for text use "
            "text_perplexity(model, tokenizer, text)"
        )
    if input_ids.dim() == 2 and input_ids.shape[0] == 1:
        input_ids = input_ids[0]
    if input_ids.dim() != 1 or input_ids.is_floating_point():
        raise EvaluationError(f"input_ids must be 1-D [T] token ids, got {input_ids.dtype} {tuple(input_ids.shape)}")
    config = text_config(model)
    vocab = getattr(config, "vocab_size", None)
    lo, hi = (int(input_ids.min()), int(input_ids.max())) if input_ids.numel() else (0, 0)
    if vocab and (hi >= vocab or lo < 0):
        bad = hi if hi >= vocab else lo
        raise EvaluationError(f"token id {bad} is outside the model's vocabulary (0..{vocab - 1}); wrong tokenizer?")
    positions = getattr(config, "max_position_embeddings", None)
    if positions and seq_len > positions:
        raise EvaluationError(
            f"seq_len={seq_len} exceeds the model's max_position_embeddings={positions}; pass a seq_len of at "
            f"most {positions}"
        )
    if callable(getattr(model, "can_generate", None)) and not model.can_generate():  # a transformers encoder
        raise EvaluationError(
            f"perplexity needs a causal language model; {type(model).__name__} is not one (score a classifier with "
            "`hfcompress eval glue`)"
        )
    return input_ids


def _windows(input_ids: torch.Tensor, seq_len: int, max_windows: int | None) -> torch.Tensor:
    count = input_ids.numel() // seq_len
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise EvaluationError(
            f"the text has {input_ids.numel()} tokens, fewer than one window of seq_len={seq_len}; give a longer "
            "text or a smaller seq_len"
        )
    return input_ids[: count * seq_len].reshape(count, seq_len)


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    seq_len: int = 512,
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of a causal LM on ``input_ids: [T]`` (see the module docstring).

    Args:
        model: A causal LM returning ``.logits`` of shape ``[B, T, V]``.
        input_ids: ``[T]`` (or ``[1, T]``) int64 token stream.
        seq_len: Tokens per window.
        max_windows: Score only the first windows; None scores all.
        batch_size: Windows per forward pass (does not change the result beyond float rounding).
        progress: Show a progress bar.
    """
    if seq_len < 2 or batch_size < 1 or (max_windows is not None and max_windows < 1):
        raise EvaluationError(
            f"seq_len={seq_len}, batch_size={batch_size}, max_windows={max_windows}: a window needs at least 2 "
            "tokens (one to predict from), a batch at least 1 window, and max_windows is None or at least 1"
        )
    input_ids = _token_stream(input_ids, model, seq_len)
    windows = _windows(input_ids, seq_len, max_windows)
    if max_windows is not None and windows.shape[0] < max_windows:
        logger.warning(
            "the text has %d tokens: %d window(s) of %d tokens, fewer than max_windows=%d; scoring those",
            input_ids.numel(),
            windows.shape[0],
            seq_len,
            max_windows,
        )
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    batches = windows.split(batch_size)
    with evaluating(model):  # no dropout, whatever mode the model was left in
        for index, batch in enumerate(tqdm(batches, desc="perplexity", disable=not progress)):
            batch = batch.to(device)
            logits = model(batch, use_cache=False).logits  # [B, T, V]
            nll = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1), reduction="none"
            ).view(batch.shape[0], -1)  # [B, T-1]
            finite = nll.isfinite().all(dim=1)
            if not finite.all():
                first = index * batch_size + int((~finite).nonzero()[0])
                raise EvaluationError(
                    f"the model's loss is NaN or Inf on window {first} (tokens {first * seq_len}-"
                    f"{(first + 1) * seq_len - 1}); its weights or compute dtype overflow there, so no perplexity is "
                    "reported (check the model with a float32 load, or compress it again)"
                )
            total_nll += nll.sum().item()
            total_tokens += batch[:, 1:].numel()
    mean = total_nll / total_tokens
    return PerplexityResult(math.exp(mean), mean, total_tokens, windows.shape[0], seq_len)


def text_perplexity(model, tokenizer, text: str, **kwargs) -> PerplexityResult:
    """Tokenize ``text`` (no special tokens) and run :func:`perplexity` on it."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    return perplexity(model, ids, **kwargs)
