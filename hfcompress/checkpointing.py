"""Per-block checkpoints for layerwise stages, so a killed run resumes where it stopped.

A checkpoint folder holds ``manifest.json`` (the run's fingerprint: a hash of the stage's
settings, of the model's content and of the calibration tokens, each kept apart so a refusal
can say which one differs) and one ``block_XXXX.safetensors`` per finished block with the
whole block's state and the specs of its compressed modules. Each file is written to a
temporary name and renamed, so a file that exists was written completely; its metadata
records the block's index and a hash of its content, checked when it is read back, so a
truncated, damaged or misnamed file is refused with what to do about it.

The model is fingerprinted by content, streamed tensor by tensor (offloaded weights
included), not by its path: the same model from another folder resumes; a model whose
weights changed at the same path does not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from hfcompress.errors import CheckpointError
from hfcompress.integrity import tensor_digest
from hfcompress.kinds import compressed_modules, get_module_kind
from hfcompress.layerwise import offloaded_tensors

__all__ = ["BlockCheckpoint", "claim_folder", "model_digest", "run_fingerprint", "training_fingerprint"]

logger = logging.getLogger(__name__)

# Config entries that name where a model came from, not what it is.
_PATH_KEYS = ("_name_or_path", "_commit_hash", "transformers_version")


def model_digest(model: nn.Module) -> str:
    """SHA-256 over the model's config (without path entries) and every tensor's bytes, in
    module order; tensors accelerate offloaded are read from their CPU or disk copy."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        data = {k: v for k, v in config.to_dict().items() if k not in _PATH_KEYS}
        digest.update(json.dumps(data, sort_keys=True, default=str).encode())
    offloaded = {(id(sub), name): value for sub, name, value in offloaded_tensors(model)}
    with torch.no_grad():
        for module_name, module in model.named_modules():
            for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                value = offloaded.get((id(module), name), tensor)
                digest.update(f"{module_name}.{name}:{value.dtype}:{tuple(value.shape)}".encode())
                if value.is_meta:
                    raise CheckpointError(f"{module_name}.{name} is on the meta device and has no offloaded copy")
                digest.update(tensor_digest(value).encode())
    return digest.hexdigest()


def run_fingerprint(stage: dict[str, Any], model: nn.Module, ids: list[torch.Tensor]) -> dict[str, str]:
    """Hashes of what decides a layerwise run's result: the stage's settings, the model's
    content and the calibration tokens."""
    data = hashlib.sha256()
    for t in ids:
        data.update(t.cpu().contiguous().numpy().tobytes())
    return _fingerprint(stage, model, data.hexdigest())


def training_fingerprint(stage: dict[str, Any], model: nn.Module, dataset: Any) -> dict[str, str]:
    """:func:`run_fingerprint` of a training stage: the training set's rows (their values, in
    order) take the calibration tokens' place."""
    data = hashlib.sha256()
    for row in dataset:
        plain = {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in dict(row).items()}
        data.update(json.dumps(plain, sort_keys=True, default=str).encode())
    return _fingerprint(stage, model, data.hexdigest())


def _fingerprint(stage: dict[str, Any], model: nn.Module, data: str) -> dict[str, str]:
    return {
        "stage": hashlib.sha256(json.dumps(stage, sort_keys=True).encode()).hexdigest(),
        "model": model_digest(model),
        "data": data,
    }


_WHAT_DIFFERS = {
    "stage": "other stage settings",
    "model": "a model with other weights, dtypes or config",
    "data": "other calibration (or training) data",
}


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _content_hash(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(f"{key}:{tensor_digest(tensors[key])}".encode())
    return digest.hexdigest()


def claim_folder(directory: Path, fingerprint: dict[str, str]) -> Path:
    """A run's checkpoint folder, created with a manifest of ``fingerprint`` (see
    :func:`run_fingerprint`), or an existing one whose manifest matches; a folder of another run
    is refused, naming what differs."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"checkpoint folder {directory} is a file; pass a folder path")
    manifest = directory / "manifest.json"
    if manifest.is_file():
        try:
            saved = json.loads(manifest.read_text())["fingerprint"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{manifest} is unreadable ({exc}); delete the folder to start over") from exc
        differs = [
            _WHAT_DIFFERS[k] for k in _WHAT_DIFFERS if not isinstance(saved, dict) or saved.get(k) != fingerprint[k]
        ]
        if differs:
            raise CheckpointError(
                f"checkpoint folder {directory} belongs to a run with {' and '.join(differs)}; pass another "
                "checkpoint folder, or delete this one to start over"
            )
    else:
        directory.mkdir(parents=True, exist_ok=True)
        _atomic_write(manifest, lambda p: p.write_text(json.dumps({"fingerprint": fingerprint})))
    return directory


class BlockCheckpoint:
    """Finished blocks of one stage, under ``directory``.

    Args:
        directory: The stage's checkpoint folder (created if missing).
        fingerprint: :func:`run_fingerprint` of the current run; a folder of another run is
            refused, naming what differs.
    """

    def __init__(self, directory: Path, fingerprint: dict[str, str]) -> None:
        self.directory = claim_folder(directory, fingerprint)
        for stale in self.directory.glob(".block_*.tmp-*"):  # a write killed before its rename
            stale.unlink(missing_ok=True)

    def _path(self, index: int) -> Path:
        return self.directory / f"block_{index:04d}.safetensors"

    def has(self, index: int) -> bool:
        return self._path(index).is_file()

    def completed(self, count: int) -> int:
        """How many blocks, counted from the first, are saved (the point a rerun resumes after)."""
        done = 0
        while done < count and self.has(done):
            done += 1
        return done

    def save(self, index: int, block: nn.Module) -> None:
        """Persist ``block``'s whole state and the specs of its compressed modules."""
        tensors = {k: v.detach().cpu().contiguous() for k, v in block.state_dict().items()}
        specs = {name: m.spec() for name, m in compressed_modules(block).items()}
        metadata = {"block": str(index), "modules": json.dumps(specs), "sha256": _content_hash(tensors)}
        _atomic_write(self._path(index), lambda p: save_file(tensors, str(p), metadata=metadata))

    def _damaged(self, index: int, problem: str) -> CheckpointError:
        path = self._path(index)
        return CheckpointError(
            f"checkpoint file {path} {problem}. Delete it and the block files after it to resume after block "
            f"{index} (or delete {self.directory} to start over)"
        )

    def load(self, index: int, block: nn.Module) -> None:
        """Restore ``block`` (still float, on its compute device) to the saved state."""
        path = self._path(index)
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise self._damaged(index, f"is unreadable ({exc}; truncated by a crash or a full disk?)") from exc
        if metadata.get("block") != str(index):
            raise self._damaged(index, f"holds block {metadata.get('block')}, not block {index} (copied or renamed)")
        if metadata.get("sha256") != _content_hash(tensors):
            raise self._damaged(index, "does not match the content hash recorded when it was written")
        device = next(block.parameters(), next(block.buffers(), torch.empty(0))).device
        for name, spec in json.loads(metadata["modules"]).items():
            old = block.get_submodule(name)
            with torch.device("meta"):
                new = get_module_kind(spec["kind"]).from_spec(spec, old)
            block.set_submodule(name, new.to_empty(device=device))
        try:
            block.load_state_dict(tensors, strict=True)
        except RuntimeError as exc:
            raise self._damaged(index, f"does not fit this block ({str(exc).splitlines()[0]})") from exc
