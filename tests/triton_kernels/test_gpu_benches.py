"""The GPU benchmark scripts run their own code on CPU (the interpreter, tiny shapes, a stand-in
timer), so that an API change breaks here rather than in a lent GPU's few minutes: the H200 run
of 2026-12-04 lost its first call to three such breaks."""

import importlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.syspath_prepend(str(BENCHMARKS))

    def load(name):
        module = importlib.import_module(name)
        return importlib.reload(module)  # a fresh module: the tests patch its constants

    return load


def _once_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return 1000 * (time.perf_counter() - start)


def test_w4a16_layer_rows_and_tile_picker_run(bench, monkeypatch, tmp_path):
    w4 = bench("bench_w4a16")
    monkeypatch.setattr(w4, "DEVICE", "cpu")
    monkeypatch.setattr(w4, "bench_ms", _once_ms)
    configs = [
        {"BLOCK_N": 8, "BLOCK_K": 256, "num_warps": 4},
        {"BLOCK_N": 4, "BLOCK_K": 128, "num_warps": 4},
        {"BLOCK_N": 8, "BLOCK_K": 64, "SPLIT_K": 0, "num_warps": 4},
    ]
    assert any(c.get("SPLIT_K") == 0 and not c.get("MMA") for c in w4.GEMV_CONFIGS)  # the split tile GEMV is swept
    monkeypatch.setattr(w4, "GEMV_CONFIGS", configs)
    rows = w4.layer_rows(torch.float32, ("gemv",), {"tiny 16x256": (16, 256)}, (1,))
    (row,) = rows
    assert row["gemv_rel_err"] < 1e-4  # the Triton GEMV against the float reference
    assert row["layer_rel_err"] < 1e-2  # on CPU the layer runs the packed CPU kernel
    assert set(row["gemv_sweep"]) == {json.dumps(c) for c in configs}
    assert "tiny 16x256" in w4.layer_table(rows)

    results = tmp_path / "results.json"
    results.write_text(json.dumps({"layers": rows}))
    picked = subprocess.run(
        [sys.executable, str(BENCHMARKS / "pick_gemv_blocks.py"), str(results)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert picked.stdout.strip() == min(row["gemv_sweep"], key=row["gemv_sweep"].get)
    results.write_text(json.dumps({"layers": []}))
    empty = subprocess.run(
        [sys.executable, str(BENCHMARKS / "pick_gemv_blocks.py"), str(results)], capture_output=True, text=True
    )
    assert empty.returncode == 1 and "--sweep gemv" in empty.stderr
    assert list(w4.matching(w4.LAYER_SHAPES, "7b,q/o")) == [k for k in w4.LAYER_SHAPES if "7b" in k or "q/o" in k]


def test_w4a16_sweep_times_the_tensor_core_gemv(bench, monkeypatch):
    w4 = bench("bench_w4a16")
    monkeypatch.setattr(w4, "DEVICE", "cpu")
    monkeypatch.setattr(w4, "bench_ms", _once_ms)
    mma = [c for c in w4.GEMV_CONFIGS if c.get("MMA")]
    keys = {"MMA", "BLOCK_N", "BLOCK_K", "SPLIT_K", "ASM", "PERMUTE", "num_warps", "num_stages"}
    assert mma and all(set(c) <= keys for c in mma)
    configs = [{**mma[0], "BLOCK_N": 16, "BLOCK_K": 64}, {**mma[0], "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 3}]
    monkeypatch.setattr(w4, "GEMV_CONFIGS", configs)
    (row,) = w4.layer_rows(torch.float16, ("gemv",), {"tiny 16x256": (16, 256)}, (1,))
    assert set(row["gemv_sweep"]) == {json.dumps(c) for c in configs}  # both ran and matched the reference
    assert "TB/s" in w4.layer_table([row])


def test_w4a16_sustained_gemv_rows_run(bench, monkeypatch):
    w4 = bench("bench_w4a16")
    monkeypatch.setattr(w4, "DEVICE", "cpu")
    monkeypatch.setattr(w4, "_graph_ms", _once_ms)  # CUDA graphs need a GPU
    configs = [{}, {"BLOCK_K": 64, "SPLIT_K": 2}, {"MMA": 1, "BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 2}]
    (row,) = w4.sustained_gemv_rows(torch.float16, {"tiny 16x256": (16, 256)}, configs, copies=2)
    assert set(row["gemv_ms"]) == {json.dumps(c) for c in configs} and row["dense_ms"] > 0
    table = w4.sustained_table([row])
    assert table.count("tiny 16x256") == 3 and "TB/s" in table


def test_w4a16_e2e_rows_run(bench, monkeypatch):
    """The decode rows gpu_check.sh's e2e step prints, on CPU with a tiny Llama (no CUDA graph
    there): the model building, RTN W4, generate and prefill calls keep working."""
    w4 = bench("bench_w4a16")
    monkeypatch.setattr(w4, "DEVICE", "cpu")
    monkeypatch.setattr(w4, "bench_ms", _once_ms)
    tiny = {
        "hidden_size": 128,  # the step's RTN uses groups of 128
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 256,
        "tie_word_embeddings": True,
    }
    rows = w4.e2e_rows(torch.float32, {"tiny": tiny}, reference=False)
    assert [r["variant"] for r in rows] == ["dense", "W4 Triton"]
    assert all(r["decode_tok_s"] > 0 and r["graph_step_ms"] is None for r in rows)
    assert rows[1]["weights_gb"] < rows[0]["weights_gb"]
    assert "tiny" in w4.e2e_table(rows)


def test_kv_bench_measures_both_kernels(bench):
    kvb = bench("bench_kv_gpu")
    row = kvb.measure(1, 128, 32, 4, 2, 32, torch.device("cpu"), timer=_once_ms)
    assert {"sdpa", "lanes", "dot", "append"} <= set(row) and row["dot_error"] < 1.0
    assert kvb._ms_ratio(row, "dot").endswith("x") and kvb._ms_ratio({"sdpa": 1.0}, "dot") == "- | -"


def test_w8a8_measure_runs_and_sweeps(bench, monkeypatch):
    w8 = bench("bench_w8a8")
    from hfcompress_triton import w8a8, w8a8_ref

    monkeypatch.setattr(w8, "DEVICE", "cpu")
    monkeypatch.setattr(w8, "GEMM_CONFIGS", w8.GEMM_CONFIGS[:2])
    times, sweep = w8._measure(w8a8, w8a8_ref, _once_ms, 48, 64, 16, sweep=True)
    assert {"bf16", "gemm", "layer"} <= set(times)
    best = w8.best_of(sweep)
    assert best is not None and json.dumps(best[1]) in sweep


def test_block_sparse_bench_smoke_run(bench, monkeypatch, capsys):
    bs = bench("bench_block_sparse_gpu")
    monkeypatch.setattr(
        sys, "argv", ["x", "--device", "cpu", "--lengths", "64", "--blocks", "16", "--densities", "1.0", "0.5"]
    )
    bs.main()
    out = capsys.readouterr().out
    # with every tile kept, the kernel equals dense attention
    err = float(out.split("max |ours - SDPA| = ")[1].split()[0])
    assert err < 1e-4
    assert out.count("| 64 | 16 |") == 2
