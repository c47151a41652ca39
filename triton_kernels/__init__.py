"""hfcompress's Triton kernels, installed under the import name ``hfcompress_triton``.

The source folder is ``triton_kernels/``; it is installed as ``hfcompress_triton`` so that it
cannot collide with the ``triton_kernels`` package that Triton's own repository ships (and that
vLLM installs). Importing this package does not import Triton: the pure-torch references live
in :mod:`hfcompress_triton.w4a16_ref`, the kernels in :mod:`hfcompress_triton.w4a16`.
"""

from __future__ import annotations

__all__ = [
    "block_sparse",
    "block_sparse_ref",
    "device",
    "kv",
    "kv_ref",
    "split_k",
    "w4a16",
    "w4a16_mma",
    "w4a16_ref",
    "w8a8",
    "w8a8_ref",
]
