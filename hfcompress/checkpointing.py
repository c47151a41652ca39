"""Per-block checkpoints for layerwise stages, so a killed run resumes where it stopped.

A checkpoint folder holds ``manifest.json`` (a fingerprint of the run: stage config, model
config, targeted weights and calibration tokens) and one ``block_XXXX.safetensors`` per
finished block with that block's ``QuantLinear`` tensors; each file is written to a
temporary name and renamed, so a file that exists is complete. A folder whose fingerprint
differs from the current run's is refused rather than mixed in.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from hfcompress.errors import CheckpointError
from hfcompress.quant.linear import QuantLinear

__all__ = ["BlockCheckpoint", "run_fingerprint"]


def run_fingerprint(
    stage: dict[str, Any], model: nn.Module, weights: list[torch.Tensor], ids: list[torch.Tensor]
) -> str:
    """A hash of everything that decides a layerwise run's result."""
    digest = hashlib.sha256()
    digest.update(json.dumps(stage, sort_keys=True).encode())
    digest.update(model.config.to_json_string(use_diff=False).encode() if hasattr(model, "config") else b"")
    with torch.no_grad():
        for w in weights:  # cheap weight checksums: a changed checkpoint changes them
            if w.is_meta:  # offloaded: its shape is all we can see without loading it
                digest.update(str(tuple(w.shape)).encode())
            else:
                digest.update(f"{w.double().sum().item():.12e},{w.double().abs().sum().item():.12e}".encode())
    for t in ids:
        digest.update(t.cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class BlockCheckpoint:
    """Finished blocks of one stage, under ``directory``."""

    def __init__(self, directory: Path, fingerprint: str) -> None:
        self.directory = Path(directory)
        manifest = self.directory / "manifest.json"
        if manifest.is_file():
            try:
                saved = json.loads(manifest.read_text())["fingerprint"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{manifest} is unreadable ({exc}); delete the folder to start over") from exc
            if saved != fingerprint:
                raise CheckpointError(
                    f"checkpoint folder {self.directory} belongs to a run with other settings, model or "
                    "calibration data; pass another checkpoint folder or delete this one to start over"
                )
        else:
            self.directory.mkdir(parents=True, exist_ok=True)
            _atomic_write(manifest, lambda p: p.write_text(json.dumps({"fingerprint": fingerprint})))

    def _path(self, index: int) -> Path:
        return self.directory / f"block_{index:04d}.safetensors"

    def has(self, index: int) -> bool:
        return self._path(index).is_file()

    def save(self, index: int, block: nn.Module) -> None:
        """Persist the ``QuantLinear`` layers of ``block``."""
        tensors: dict[str, torch.Tensor] = {}
        specs: dict[str, dict[str, Any]] = {}
        for name, layer in block.named_modules():
            if isinstance(layer, QuantLinear):
                for key, tensor in layer.state_dict().items():
                    tensors[f"{name}.{key}"] = tensor.detach().cpu().contiguous()
                specs[name] = layer.spec()
        metadata = {"layers": json.dumps(specs)}
        _atomic_write(self._path(index), lambda p: save_file(tensors, str(p), metadata=metadata))

    def load(self, index: int, block: nn.Module) -> None:
        """Replace ``block``'s Linear layers by the saved ``QuantLinear`` layers."""
        from safetensors import safe_open

        path = self._path(index)
        with safe_open(str(path), framework="pt") as f:
            specs = json.loads(f.metadata()["layers"])
        tensors = load_file(str(path))
        for name, spec in specs.items():
            old = block.get_submodule(name)
            device = old.weight.device  # a saved block is loaded before it is quantized
            bias = tensors.get(f"{name}.bias")
            layer = QuantLinear.from_spec(spec, bias=bias is not None, dtype=bias.dtype if bias is not None else None)
            layer.load_state_dict(
                {k.removeprefix(f"{name}."): v for k, v in tensors.items() if k.startswith(f"{name}.")}
            )
            block.set_submodule(name, layer.to(device))
