"""The C kernels for CPU (``*.c`` beside this module), compiled on first use.

Each source is compiled with the system C compiler into ``~/.cache/hfcompress/kernels``
(once per source, the local headers it includes, flags and CPU, about a second) and loaded
through ``ctypes``. Without a compiler, or if the build fails, :func:`load` returns None and
logs the reason once; callers then use their torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from hfcompress.models import cache_dir

__all__ = ["build", "load"]

logger = logging.getLogger(__name__)

FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]


def _cpu_id() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    lines = [line for line in text.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(lines[:2])


_LOCAL_INCLUDE = re.compile(rb'^[ \t]*#[ \t]*include[ \t]+"([^"]+)"', re.MULTILINE)


def _source_text(source: Path) -> bytes:
    """``source`` and the headers beside it that it includes with quotes (``cpu_bf16.h``): what
    the build depends on, so that editing a header rebuilds the libraries that include it."""
    text = source.read_bytes()
    return text + b"".join((source.parent / name.decode()).read_bytes() for name in _LOCAL_INCLUDE.findall(text))


def build(source: Path) -> Path:
    """Compile ``source`` into a shared library (or find it built) and return its path.

    Raises:
        RuntimeError: No C compiler, or the compiler failed (its message included).
    """
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    text = _source_text(source)
    key = hashlib.sha256(text + " ".join(FLAGS).encode() + _cpu_id().encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: a crash mid-build never leaves a truncated library.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run(
            [compiler, *FLAGS, str(source), "-o", str(built), "-lm"], capture_output=True, text=True
        )
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-500:]}")
        os.replace(built, target)
    return target


def load(source: Path, what: str) -> ctypes.CDLL | None:
    """The library built from ``source``, or None (logged as a warning naming ``what``, the
    kernel's purpose and its fallback) when it cannot be built or loaded."""
    try:
        return ctypes.CDLL(str(build(source)))
    except (OSError, RuntimeError) as exc:
        logger.warning("%s is unavailable (%s)", what, exc)
        return None
