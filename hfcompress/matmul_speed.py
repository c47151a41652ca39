"""How fast this CPU multiplies matrices in bfloat16 and float16 against float32, measured.

A CPU's instruction sets do not say whether a half-precision matmul pays. With AVX-512 BF16 on
both, oneDNN's bfloat16 matmul took 2.2-2.7x less time than float32 on an AMD EPYC VM, and
1.6-1.8x more on an Intel Xeon VM without AMX (oneDNN's bfloat16 kernel against MKL's float32
one); that Xeon's AVX-512-FP16 float16 matmul took about float32's time (RESULTS.md, stop 62).
So the choices that hinge on it (whether a bfloat16 speed setting is honoured, whether a half
model's calibration passes run in float32, the dtype of the weight-only layers' prefill matmul
without AMX) measure it once per process with :func:`matmul_speedup`, and take the half dtype
only where :func:`half_matmul_pays`: in a near tie float32 wins, as it is the more precise.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable

import torch

__all__ = ["MIN_SPEEDUP", "best_seconds", "half_matmul_pays", "matmul_speedup", "onednn_has"]

# A half dtype pays where its matmul is at least this many times as fast as float32's.
MIN_SPEEDUP = 1.25

# A small decoder's projection (SmolLM2's gate and up, a 256-row chunk): large enough for the
# kernels' steady state, a few milliseconds a call.
_SHAPE = (256, 576, 1536)


def best_seconds(fn: Callable[[], object], repeats: int = 2) -> float:
    """The least time of ``repeats`` calls of ``fn``, after one untimed call (prepacking, kernel
    generation)."""
    fn()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def matmul_speedup(dtype: torch.dtype, rounds: int = 3) -> float:
    """How many times as fast a ``dtype`` matmul is as a float32 one on this CPU at the thread
    count of the first call: for each dtype, the best of ``rounds`` timings of three calls of
    ``256 x 576 x 1536`` (tens of milliseconds in all, once per process and dtype)."""
    m, k, n = _SHAPE
    g = torch.Generator().manual_seed(0)
    # on the CPU whatever the default device (a CUDA default would time asynchronous launches)
    x, w = torch.randn(m, k, generator=g, device="cpu"), torch.randn(n, k, generator=g, device="cpu")

    def three_calls(d: torch.dtype) -> Callable[[], None]:
        a, b = x.to(d), w.to(d)
        return lambda: [torch.nn.functional.linear(a, b) for _ in range(3)]

    # no autocast: a first call inside a bfloat16 autocast would time bfloat16 against itself
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        return best_seconds(three_calls(torch.float32), rounds) / best_seconds(three_calls(dtype), rounds)


def onednn_has(dtype: torch.dtype) -> bool:
    """Whether oneDNN has a CPU path for ``dtype`` (bfloat16 or float16) on this CPU (bfloat16:
    AVX-512 or newer; float16: AVX-512-FP16 or AMX-FP16). Without one, a matmul in that dtype
    runs tens of times slower than float32 (bfloat16: 70x on an AVX2 EPYC VM), and is not timed."""
    probe = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}[dtype]
    try:
        return bool(getattr(torch.ops.mkldnn, probe)())
    except (AttributeError, RuntimeError):
        return False


def half_matmul_pays(dtype: torch.dtype) -> bool:
    """Whether a ``dtype`` (bfloat16 or float16) matmul is fast on this CPU: oneDNN has a path
    for it (:func:`onednn_has`) and it is at least ``MIN_SPEEDUP`` times as fast as float32's
    (:func:`matmul_speedup`)."""
    return onednn_has(dtype) and matmul_speedup(dtype) >= MIN_SPEEDUP
