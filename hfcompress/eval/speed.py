"""Decode speed: tokens per second of greedy generation after a prompt."""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass

import torch

from hfcompress.errors import EvaluationError
from hfcompress.modes import evaluating

__all__ = ["DEFAULT_PROMPT", "DecodeSpeed", "cpu_name", "decode_speed"]

DEFAULT_PROMPT = "The history of the printing press begins"


def cpu_name() -> str:
    """The CPU's model name (what a reported speed names as its machine)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # not Linux: fall back to what the platform module knows
        pass
    return platform.processor() or "unknown CPU"


@dataclass(frozen=True)
class DecodeSpeed:
    """Attributes:
    tokens_per_second: Decode throughput, prefill excluded (median of the repeats), over all
        sequences of the batch.
    new_tokens: Tokens decoded per sequence and repeat.
    prompt_tokens: Prompt length.
    repeats: Timed repeats.
    batch: Sequences decoded side by side (each decoding step runs ``batch`` rows).
    """

    tokens_per_second: float
    new_tokens: int
    prompt_tokens: int
    repeats: int
    batch: int = 1


def _generate_seconds(model, input_ids: torch.Tensor, new_tokens: int) -> float:
    start = time.perf_counter()
    model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        # the text config's (a vision-language model's own config has none)
        pad_token_id=model.generation_config.eos_token_id or model.config.get_text_config().eos_token_id,
    )
    return time.perf_counter() - start


@torch.no_grad()
def decode_speed(
    model, tokenizer, *, prompt: str = DEFAULT_PROMPT, new_tokens: int = 64, repeats: int = 3, batch: int = 1
) -> DecodeSpeed:
    """Greedy-decode ``new_tokens`` after ``prompt`` (KV cache on), ``batch`` copies of the
    prompt side by side (batched generation: every step runs ``batch`` rows through each layer).

    Prefill is removed by timing a 1-token generation too: decode rate =
    ``batch * (new_tokens - 1) / (t(new_tokens) - t(1))``; one warm-up run precedes the timed
    ones.
    """
    if new_tokens < 2:
        raise ValueError(f"new_tokens={new_tokens} must be >= 2")
    if batch < 1:
        raise ValueError(f"batch={batch} must be >= 1")
    if not callable(getattr(model, "can_generate", None)) or not model.can_generate():
        raise EvaluationError(f"decode speed needs a model that generates; {type(model).__name__} does not")
    device = next(model.parameters()).device
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device).expand(batch, -1)
    rates = []
    with evaluating(model):  # no dropout's cost in the timing, whatever mode the model was left in
        _generate_seconds(model, input_ids, new_tokens)  # warm-up: caches, kernel packing
        for _ in range(repeats):
            full = _generate_seconds(model, input_ids, new_tokens)
            prefill = _generate_seconds(model, input_ids, 1)
            rates.append(batch * (new_tokens - 1) / max(full - prefill, 1e-9))
    return DecodeSpeed(statistics.median(rates), new_tokens, input_ids.shape[1], repeats, batch)
