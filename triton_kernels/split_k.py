"""Splitting a GEMV's K loop over several programs, for the W4A16 GEMVs (:mod:`.w4a16`,
:mod:`.w4a16_mma`): how many parts (:func:`plan_split`), the float32 workspace and int32
counters the parts add up in (kept per device and stream, zero between launches), and the
``@jit`` store that adds a part and lets the last one write the output (:func:`split_k_store`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from hfcompress_triton.device import multiprocessors

__all__ = ["SPLIT_PROGRAMS_PER_SM", "WORKSPACES", "plan_split", "split_k_store"]

# SPLIT_K 0 (either GEMV): split K until the launch has this many programs per multiprocessor.
SPLIT_PROGRAMS_PER_SM = 4


@triton.jit
def split_k_store(y_ptrs, ws_ptrs, cnt_ptrs, part, mask, SPLIT_K: tl.constexpr):
    """Store ``part`` at ``y_ptrs``, or with ``SPLIT_K > 1`` add each value into its float32
    workspace slot and then count it in its int32 counter (both zero on entry). The thread
    that brings a counter to ``SPLIT_K`` holds the last part of that output: it reads the
    sum, stores it and sets the slot and the counter back to zero, ready for the next launch
    without a memset. Each value's add and count come from the same thread in program order
    and the count is acquire-release, so the last thread's read sees every add."""
    if SPLIT_K == 1:
        tl.store(y_ptrs, part.to(y_ptrs.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(ws_ptrs, part, mask=mask)
        last = mask & (tl.atomic_add(cnt_ptrs, 1, mask=mask) == SPLIT_K - 1)
        total = tl.where(last, tl.atomic_add(ws_ptrs, tl.zeros_like(part), mask=last), 0.0)  # masked: undefined
        tl.store(y_ptrs, total.to(y_ptrs.dtype.element_ty), mask=last)
        tl.store(ws_ptrs, tl.zeros_like(part), mask=last)
        tl.store(cnt_ptrs, tl.zeros_like(part).to(tl.int32), mask=last)


# Float32 sums and int32 counters (one each per output) of the split-K GEMVs, per
# (device, stream): zero between launches (see ``split_k_store``), so one buffer serves every
# layer that runs on the stream. A buffer first made during CUDA-graph capture belongs to that
# graph's memory pool and stays referenced here.
WORKSPACES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(device: torch.device, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    ws, cnt = WORKSPACES.get((device, stream), (None, None))
    if ws is None or ws.numel() < size:
        size = max(1 << 16, triton.next_power_of_2(size))  # room for most layers: few regrowths
        ws = torch.zeros(size, dtype=torch.float32, device=device)
        cnt = torch.zeros(size, dtype=torch.int32, device=device)
        WORKSPACES[(device, stream)] = (ws, cnt)
    return ws, cnt


def plan_split(
    requested: int, k_tiles: int, programs: int, y: torch.Tensor
) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """``(split, tiles_per_split, workspace, counters)`` of a GEMV into ``y: [M, N]`` over
    ``k_tiles`` K tiles with ``programs`` programs per part: ``requested`` parts (0: enough for
    ``SPLIT_PROGRAMS_PER_SM`` programs per multiprocessor), no more than there are tiles and
    none left without one. Unsplit, the workspace arguments are ``y`` itself (unused)."""
    split = requested or triton.cdiv(SPLIT_PROGRAMS_PER_SM * multiprocessors(y.device), programs)
    tiles_per_split = triton.cdiv(k_tiles, max(1, min(split, k_tiles)))
    split = triton.cdiv(k_tiles, tiles_per_split)  # no program without a tile
    ws, cnt = _workspace(y.device, y.numel()) if split > 1 else (y, y)
    return split, tiles_per_split, ws, cnt
