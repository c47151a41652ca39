"""What the launchers ask of the device (no Triton import)."""

from __future__ import annotations

import functools

import torch

__all__ = ["multiprocessors"]


@functools.cache
def multiprocessors(device: torch.device) -> int:
    """The GPU's streaming multiprocessors, which split-K grids fill; under the CPU interpreter
    any small number exercises the same code."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8
