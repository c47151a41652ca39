"""Train/eval mode around work that must read a model's function, not a dropout sample of it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["evaluating"]


@contextmanager
def evaluating(model: nn.Module) -> Iterator[set[nn.Module]]:
    """Run the block with every module of ``model`` in eval mode (no dropout), whatever mode it
    was left in (a Trainer leaves it training); each module gets its own mode back afterwards,
    also on an error. Yields the modules the model had on entry."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield set(modes)
    finally:
        for module, training in modes.items():
            module.training = training
