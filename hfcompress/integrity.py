"""Content hashes of the compressed tensors, stored in the safetensors metadata at save.

A flipped byte in a packed weight decodes to a different code without any error: nothing
about its dtype or shape changes. So every save records the SHA-256 of each compressed
module's tensors (packed codes, scales, zero points, static scales, bias) in the
``hfcompress.sha256`` metadata entry of the safetensors files (a JSON map, tensor name to
hex digest), and :func:`verify_checkpoint` recomputes them. ``hfcompress verify DIR`` and our
CLI's loads run it; in Python, ``hfcompress.verify(dir)``, or
``HFCOMPRESS_VERIFY_ON_LOAD=1`` for every ``from_pretrained`` of an hfcompress checkpoint.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from hfcompress.errors import CheckpointError

__all__ = [
    "HASH_KEY",
    "VERIFY_ENV",
    "VerifyReport",
    "compressed_tensor_hashes",
    "tensor_digest",
    "verify_checkpoint",
    "verifying",
]

HASH_KEY = "hfcompress.sha256"
VERIFY_ENV = "HFCOMPRESS_VERIFY_ON_LOAD"


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes as stored (row-major, its own dtype)."""
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(data.data).hexdigest()


def compressed_tensor_hashes(model: nn.Module) -> dict[str, str]:
    """Digests of every tensor of every compressed module of ``model``, by state-dict key."""
    from hfcompress.kinds import compressed_modules

    out: dict[str, str] = {}
    for name, module in compressed_modules(model).items():
        for key, tensor in module.state_dict().items():
            if not tensor.is_meta:
                out[f"{name}.{key}"] = tensor_digest(tensor)
    return out


_VERIFY_OVERRIDE: contextvars.ContextVar[bool | None] = contextvars.ContextVar("hfcompress_verify", default=None)


def verify_on_load() -> bool:
    """Whether a ``from_pretrained`` of an hfcompress checkpoint checks the recorded digests:
    inside :func:`verifying`, as it says; else ``$HFCOMPRESS_VERIFY_ON_LOAD``."""
    forced = _VERIFY_OVERRIDE.get()
    if forced is not None:
        return forced
    return os.environ.get(VERIFY_ENV, "0") not in ("", "0", "false", "False")


@contextlib.contextmanager
def verifying(enabled: bool = True) -> Iterator[None]:
    """Turn the digest check of loads inside the block on (or off), whatever the environment."""
    token = _VERIFY_OVERRIDE.set(enabled)
    try:
        yield
    finally:
        _VERIFY_OVERRIDE.reset(token)


@dataclass(frozen=True)
class VerifyReport:
    """Attributes:
    files: Safetensors files read.
    checked: Tensors whose digest matched.
    unhashed_files: Files without recorded digests (saved by another tool or an older
        hfcompress).
    """

    files: int
    checked: int
    unhashed_files: tuple[str, ...]


def _checkpoint_files(directory: Path) -> list[Path]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory} holds no .safetensors file; it is not a saved model folder")
    return files


def verify_files(files: list[str | Path]) -> VerifyReport:
    """Recompute the recorded digests of ``files``; raise :class:`CheckpointError` on the first
    mismatch, naming the tensor and the file."""
    checked, unhashed = 0, []
    for file in map(Path, files):
        try:
            with safe_open(str(file), framework="pt") as f:
                recorded = json.loads((f.metadata() or {}).get(HASH_KEY, "null"))
                if recorded is None:
                    unhashed.append(file.name)
                    continue
                keys = set(f.keys())
                for key, digest in recorded.items():
                    if key not in keys:
                        continue  # sharded: another file holds it
                    if tensor_digest(f.get_tensor(key)) != digest:
                        raise CheckpointError(
                            f"{file}: tensor {key!r} does not match the digest recorded when it was saved; the file "
                            "is corrupt (a bad copy or download). Download or copy it again"
                        )
                    checked += 1
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own error types for unreadable files
            raise CheckpointError(f"{file} is not a readable safetensors file ({exc}); re-save the model") from exc
    return VerifyReport(len(files), checked, tuple(unhashed))


def verify_checkpoint(directory: str | os.PathLike) -> VerifyReport:
    """Check every recorded tensor digest of the model saved in ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a folder")
    return verify_files(_checkpoint_files(directory))
