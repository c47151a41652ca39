"""Train/eval mode around work that must read a model's function, not a dropout sample of it."""

from __future__ import annotations

import weakref
from collections.abc import Iterator, MutableSet
from contextlib import contextmanager

from torch import nn

__all__ = ["evaluating"]


@contextmanager
def evaluating(model: nn.Module) -> Iterator[MutableSet[nn.Module]]:
    """Run the block with every module of ``model`` in eval mode (no dropout), whatever mode it
    was left in (a Trainer leaves it training); each module gets its own mode back afterwards,
    also on an error. Yields the modules the model had on entry (those still alive).

    The modules are held by weak references: a layer the work replaces (a float Linear by its
    quantized one) is freed with its weights then, not kept until the block ends."""
    modes = weakref.WeakKeyDictionary({m: m.training for m in model.modules()})
    model.eval()
    try:
        yield weakref.WeakSet(modes.keys())
    finally:
        for module, training in list(modes.items()):
            module.training = training
