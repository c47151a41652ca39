"""Soak: kill GPTQ and the save with SIGKILL at 20 random points each, rerun, and check that
the output is always either complete and equal to an uninterrupted run, or absent, and that
nothing is left behind.

Slow (about 7 minutes on 2 cores: every kill and rerun is a fresh Python process), so it is
out of the default suite; run it with ``pytest -m slow tests/test_soak.py``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

KILLS = 20
REPO = Path(__file__).resolve().parent.parent


def _start(phase: str, work: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.soak_worker", phase, str(work)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def _run(phase: str, work: Path) -> float:
    proc = _start(phase, work)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return float(out.split("done ")[-1])


def _killed(phase: str, work: Path, delay: float) -> bool:
    """Start the worker, SIGKILL it ``delay`` seconds after its imports; whether it was still
    running when killed."""
    proc = _start(phase, work)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(delay)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    return alive


def _snapshot(folder: Path) -> dict:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    config = json.loads((folder / "config.json").read_text())
    return {"config": config, "tensors": tensors, "files": sorted(p.name for p in folder.iterdir())}


def _same(a: dict, b: dict) -> bool:
    return (
        a["files"] == b["files"]
        and a["config"] == b["config"]
        and a["tensors"].keys() == b["tensors"].keys()
        and all(torch.equal(a["tensors"][k], b["tensors"][k]) for k in a["tensors"])
    )


def _assert_complete_and_equal_or_absent(out: Path, reference: dict) -> str:
    if not (out / "config.json").exists():
        # An interrupted first save: no model, and nothing that looks like one.
        assert not out.exists() or not list(out.glob("*.safetensors")), sorted(os.listdir(out))
        return "absent"
    assert _same(_snapshot(out), reference)
    return "complete"


def _leftovers(work: Path) -> list[str]:
    junk = [p.name for p in work.iterdir() if p.name.startswith(".")]
    out = work / "out"
    if out.is_dir():
        junk += [f"out/{p.name}" for p in out.iterdir() if p.name.startswith(".")]
    ckpt = work / "ckpt"
    if ckpt.is_dir():
        junk += [str(p.relative_to(work)) for p in ckpt.rglob(".*")]
    return junk


@pytest.mark.parametrize("phase", ["gptq", "save"])
def test_kill_at_random_points_then_rerun(tmp_path, phase):
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    duration = _run(phase, reference_dir)
    reference = _snapshot(reference_dir / "out")
    rng = random.Random(1234 if phase == "gptq" else 5678)
    outcomes = []
    for i in range(KILLS):
        work = tmp_path / f"run{i}"
        work.mkdir()
        if phase == "save" and i % 2:
            shutil.copytree(reference_dir / "out", work / "out")  # a kill while replacing an earlier save
        killed = _killed(phase, work, rng.uniform(0, duration * 1.1))
        state = _assert_complete_and_equal_or_absent(work / "out", reference)
        outcomes.append((killed, state))
        _run(phase, work)  # rerun: resumes GPTQ from its checkpoint; cleans up stale partial saves
        assert _assert_complete_and_equal_or_absent(work / "out", reference) == "complete"
        assert _leftovers(work) == [], f"kill {i}: left behind {_leftovers(work)}"
        shutil.rmtree(work)
    # The kills must land inside the work, not all before or after it.
    assert sum(killed for killed, _ in outcomes) >= KILLS // 2, outcomes
