"""Reliability: paths checked before any work, resume checks that see the model, loads that
refuse a silently wrong model, integrity hashes, and CLI errors instead of tracebacks.

Each test reproduces one finding of the reliability review on a tiny random model. CLI cases
call ``main()`` in-process: an uncaught exception would fail the test, so a return code of 2
also proves there was no traceback.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import hfcompress
from hfcompress import GPTQConfig, RTNConfig, compress
from hfcompress import saving as saving_module
from hfcompress.cli import main
from hfcompress.errors import (
    CalibrationDataError,
    CheckpointError,
    EvaluationError,
    ModelError,
    OutputPathError,
    RecipeError,
)
from hfcompress.eval.perplexity import perplexity
from tests.conftest import killed_run, make_char_tokenizer, make_tiny_llama

RTN_RECIPE = "stages:\n  - name: w4\n    technique: rtn\n    bits: 4\n    group_size: 16\n"
GPTQ_RECIPE = "stages:\n  - name: gptq\n    technique: gptq\n    bits: 4\n    group_size: 16\n"
CALIB = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def rtn_recipe(tmp_path):
    path = tmp_path / "rtn.yaml"
    path.write_text(RTN_RECIPE)
    return path


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the CLI gets as far as loading a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded although the arguments were invalid")

    monkeypatch.setattr("hfcompress.models.load_model", refuse)


def _compress_cli(model_dir, recipe, output, *extra):
    return main(
        ["--quiet", "compress", "--model", str(model_dir), "--recipe", str(recipe), "--output", str(output), *extra]
    )


def _logits(model, ids=None):
    ids = torch.arange(2, 18).view(1, -1) if ids is None else ids
    with torch.no_grad():
        return model(ids).logits


# -- 1. output paths are checked before any stage runs ---------------------------------------


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_output_that_is_a_file_fails_before_loading(
    tiny_llama_dir, rtn_recipe, tmp_path, capsys, no_model_load, overwrite
):
    target = tmp_path / "out.bin"
    target.write_text("not a folder")
    code = _compress_cli(tiny_llama_dir, rtn_recipe, target, *(["--overwrite"] if overwrite else []))
    assert code == 2
    err = capsys.readouterr().err
    assert f"--output {target} is a file; give the path of a folder" in err
    assert "pass --overwrite" not in err
    assert target.read_text() == "not a folder"


def test_output_under_a_file_fails_before_loading(tiny_llama_dir, rtn_recipe, tmp_path, capsys, no_model_load):
    (tmp_path / "f").write_text("x")
    assert _compress_cli(tiny_llama_dir, rtn_recipe, tmp_path / "f" / "sub" / "out") == 2
    assert f"cannot be created: {tmp_path / 'f'} is a file, not a folder" in capsys.readouterr().err


def test_read_only_parent_fails_before_loading(
    tiny_llama_dir, rtn_recipe, tmp_path, capsys, no_model_load, monkeypatch
):
    # Simulated (tests run as root here, and root writes through mode bits): creating a file
    # in the folder fails as on a read-only mount.
    parent = tmp_path / "ro"
    parent.mkdir()
    real_mkstemp = saving_module.tempfile.mkstemp

    def read_only(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == parent:
            raise OSError(errno.EROFS, "Read-only file system")
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(saving_module.tempfile, "mkstemp", read_only)
    assert _compress_cli(tiny_llama_dir, rtn_recipe, parent / "out") == 2
    assert f"{parent} is not writable (Read-only file system)" in capsys.readouterr().err


def _mount_tmpfs(path: Path, options: str = "") -> bool:
    path.mkdir(exist_ok=True)
    args = ["mount", "-t", "tmpfs", *(["-o", options] if options else []), "tmpfs", str(path)]
    try:
        return subprocess.run(args, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def test_real_read_only_mount_fails_before_loading(tiny_llama_dir, rtn_recipe, tmp_path, capsys, no_model_load):
    mount = tmp_path / "ro-mount"
    if not _mount_tmpfs(mount, "ro"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        assert _compress_cli(tiny_llama_dir, rtn_recipe, mount / "out") == 2
        assert "is not writable" in capsys.readouterr().err
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def _check_saved(output, reference_logits):
    assert (output / "config.json").is_file()
    assert not [p for p in output.iterdir() if p.name.startswith(".")]
    reloaded = AutoModelForCausalLM.from_pretrained(output)
    torch.testing.assert_close(_logits(reloaded), reference_logits, rtol=0, atol=0)


def test_mount_point_output_is_written_file_by_file(tiny_llama, tmp_path, monkeypatch):
    # Simulated: the target reports as a mount point and refuses to be renamed (EBUSY).
    target = tmp_path / "volume"
    target.mkdir()
    (target / "old-weights.bin").write_text("a previous model")
    real_replace = os.replace

    def busy(src, dst, *args, **kwargs):
        if Path(src) == target or Path(dst) == target:
            raise OSError(errno.EBUSY, "Device or resource busy")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(saving_module.os, "replace", busy)
    monkeypatch.setattr(saving_module.os.path, "ismount", lambda p: Path(p) == target)
    compress(tiny_llama, [RTNConfig(bits=4, group_size=16)], progress=False)
    expected = _logits(tiny_llama)
    hfcompress.save_pretrained(tiny_llama, target)
    assert not (target / "old-weights.bin").exists()
    _check_saved(target, expected)


def test_real_mount_point_output(tiny_llama_dir, rtn_recipe, tmp_path):
    mount = tmp_path / "mnt"
    if not _mount_tmpfs(mount):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        (mount / "stale.txt").write_text("from an earlier run")
        assert _compress_cli(tiny_llama_dir, rtn_recipe, mount, "--overwrite") == 0
        model = make_tiny_llama()
        compress(model, [RTNConfig(bits=4, group_size=16)], progress=False)
        _check_saved(mount, _logits(model))
        assert not (mount / "stale.txt").exists()
    finally:
        subprocess.run(["umount", str(mount)], check=False)


# -- 2. stale partial folders; permissions ---------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_stale_partial_folders_are_removed_and_reported(tiny_llama, tmp_path, caplog):
    compress(tiny_llama, [RTNConfig(bits=4, group_size=16)], progress=False)
    dead = _dead_pid()
    stale = tmp_path / f".out.partial-{dead}-0123abcd"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 4096)
    inside = tmp_path / "out" / f".hfcompress-partial-{dead}-89abcdef"
    inside.mkdir(parents=True)
    live = tmp_path / f".out.partial-{os.getpid()}-feedbeef"  # a save of this process, still running
    live.mkdir()
    other = tmp_path / f".other.partial-{dead}-00000000"  # another target's: not ours to remove
    other.mkdir()
    with caplog.at_level(logging.WARNING, logger="hfcompress.saving"):
        hfcompress.save_pretrained(tiny_llama, tmp_path / "out")
    assert not stale.exists() and not inside.exists()
    assert live.exists() and other.exists()
    assert f"removed {stale}, left by an interrupted save" in caplog.text


def test_a_model_left_part_way_by_an_interrupted_compress_is_neither_saved_nor_compressed_again(
    tiny_llama, tmp_path, monkeypatch
):
    # Ctrl-C (or an error) in the middle of a stage left 4 of 14 layers packed, with no
    # quantization_config: the model ran half compressed, save_pretrained wrote it like any
    # model, and loading the files blamed a deleted config.json.
    from hfcompress.techniques.rtn.modifier import RTNModifier

    ids = torch.randint(1, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    killed_run(
        monkeypatch,
        RTNModifier,
        "rtn_weight",
        4,
        lambda: compress(tiny_llama, [RTNConfig(bits=4, group_size=16)], progress=False),
    )
    assert len(hfcompress.kinds.compressed_modules(tiny_llama)) == 4
    assert tiny_llama(ids).logits.isfinite().all()  # what is compressed still runs
    refused = r"interrupted in stage 'stage_0' \(rtn\) by Killed, so (the|this) model is partly compressed"
    with pytest.raises(ModelError, match=refused + "; saving it is refused"):
        tiny_llama.save_pretrained(tmp_path / "plain")
    with pytest.raises(ModelError, match=refused):
        hfcompress.save_pretrained(tiny_llama, tmp_path / "atomic")
    assert not (tmp_path / "plain" / "config.json").exists() and not (tmp_path / "atomic").exists()
    with pytest.raises(ModelError, match=refused + "; load the float model again"):
        compress(tiny_llama, [RTNConfig(bits=4, group_size=16)], progress=False)
    # stopped before its first layer: no layer is compressed, and saving is still refused
    model = make_tiny_llama()
    killed_run(
        monkeypatch,
        RTNModifier,
        "rtn_weight",
        0,
        lambda: compress(model, [RTNConfig(bits=4, group_size=16)], progress=False),
    )
    assert not hfcompress.kinds.compressed_modules(model)
    with pytest.raises(ModelError, match=refused + "; saving it is refused"):
        model.save_pretrained(tmp_path / "none")
    # a failure in a stage's checks changes nothing, so the model is not marked
    model = make_tiny_llama()
    with pytest.raises(RecipeError):
        compress(model, [RTNConfig(bits=4, group_size=1024)], progress=False)
    compress(model, [RTNConfig(bits=4, group_size=16)], progress=False)
    model.save_pretrained(tmp_path / "whole")
    assert (tmp_path / "whole" / "config.json").exists()


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_saved_folder_has_the_permissions_of_a_plain_save(tiny_llama, tmp_path, umask):
    compress(tiny_llama, [RTNConfig(bits=4, group_size=16)], progress=False)
    old = os.umask(umask)
    try:
        ours = hfcompress.save_pretrained(tiny_llama, tmp_path / "ours")
        tiny_llama.save_pretrained(tmp_path / "plain")
    finally:
        os.umask(old)
    assert (ours.stat().st_mode & 0o777) == ((tmp_path / "plain").stat().st_mode & 0o777) == 0o777 & ~umask


# -- 3. the resume check fingerprints the model's content, not its path ----------------------


def _killed_gptq(model, checkpoint_dir, monkeypatch, after_blocks=1):
    from hfcompress.techniques.gptq import modifier as gptq_modifier

    killed_run(
        monkeypatch,
        gptq_modifier.GPTQModifier,
        "_quantize_block",
        after_blocks,
        lambda: compress(
            model,
            [GPTQConfig(bits=4, group_size=16)],
            calibration_data=CALIB,
            progress=False,
            checkpoint_dir=checkpoint_dir,
        ),
    )


def test_same_model_from_another_folder_resumes(tmp_path, monkeypatch, caplog):
    make_tiny_llama(seed=3, layers=3).save_pretrained(tmp_path / "m")
    shutil.copytree(tmp_path / "m", tmp_path / "copy")
    _killed_gptq(AutoModelForCausalLM.from_pretrained(tmp_path / "m"), tmp_path / "ckpt", monkeypatch)
    resumed = AutoModelForCausalLM.from_pretrained(f"./{os.path.relpath(tmp_path / 'copy')}")
    with caplog.at_level(logging.INFO, logger="hfcompress"):
        compress(
            resumed,
            [GPTQConfig(bits=4, group_size=16)],
            calibration_data=CALIB,
            progress=False,
            checkpoint_dir=tmp_path / "ckpt",
        )
    assert "resuming after block 1 of 3" in caplog.text
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    compress(fresh, [GPTQConfig(bits=4, group_size=16)], calibration_data=CALIB, progress=False)
    for (name, a), (_, b) in zip(resumed.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    "changed", ["model.norm.weight", "model.embed_tokens.weight", "model.layers.2.input_layernorm.weight"]
)
def test_model_with_other_weights_at_the_same_path_is_refused(tmp_path, monkeypatch, changed):
    make_tiny_llama(seed=3, layers=3).save_pretrained(tmp_path / "m")
    _killed_gptq(AutoModelForCausalLM.from_pretrained(tmp_path / "m"), tmp_path / "ckpt", monkeypatch)
    edited = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        edited.get_parameter(changed).mul_(1.01)
    edited.save_pretrained(tmp_path / "m")  # same path, other weights
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    with pytest.raises(CheckpointError, match="belongs to a run with a model with other weights, dtypes or config"):
        compress(
            model,
            [GPTQConfig(bits=4, group_size=16)],
            calibration_data=CALIB,
            progress=False,
            checkpoint_dir=tmp_path / "ckpt",
        )


# -- 4. block files carry their index and a content hash -------------------------------------


@pytest.fixture
def killed_after_two(tmp_path, monkeypatch):
    _killed_gptq(make_tiny_llama(seed=3, layers=4), tmp_path / "ckpt", monkeypatch, after_blocks=2)
    return tmp_path / "ckpt" / "stage_0"


def _resume(ckpt_root):
    compress(
        make_tiny_llama(seed=3, layers=4),
        [GPTQConfig(bits=4, group_size=16)],
        calibration_data=CALIB,
        progress=False,
        checkpoint_dir=ckpt_root,
    )


def test_truncated_block_file_names_the_file_and_the_fix(killed_after_two):
    path = killed_after_two / "block_0001.safetensors"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError) as info:
        _resume(killed_after_two.parent)
    message = str(info.value)
    assert f"checkpoint file {path} is unreadable" in message
    assert "Delete it and the block files after it to resume after block 1" in message


def test_block_file_copied_over_another_is_refused(killed_after_two):
    shutil.copy(killed_after_two / "block_0000.safetensors", killed_after_two / "block_0001.safetensors")
    with pytest.raises(CheckpointError, match=r"holds block 0, not block 1 \(copied or renamed\)"):
        _resume(killed_after_two.parent)


def test_block_file_with_changed_bytes_is_refused(killed_after_two):
    path = killed_after_two / "block_0001.safetensors"
    tensors, metadata = load_file(path), safe_open(str(path), "pt").metadata()
    key = next(k for k in tensors if k.endswith("qweight"))
    tensors[key][0, 0] ^= 0xFF
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(CheckpointError, match="does not match the content hash recorded when it was written"):
        _resume(killed_after_two.parent)


def test_deleting_the_bad_file_and_later_ones_resumes(killed_after_two, caplog):
    (killed_after_two / "block_0001.safetensors").unlink()
    with caplog.at_level(logging.INFO, logger="hfcompress"):
        _resume(killed_after_two.parent)
    assert "resuming after block 1 of 4" in caplog.text


# -- 5. config edits that would load a silently wrong model ----------------------------------


@pytest.fixture
def saved(tmp_path):
    model = make_tiny_llama()
    compress(model, [RTNConfig(bits=4, group_size=16)], progress=False)
    path = hfcompress.save_pretrained(model, tmp_path / "m", tokenizer=make_char_tokenizer())
    return path


def _edit_config(path, edit):
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


def test_deleted_quantization_config_is_refused(saved):
    _edit_config(saved, lambda c: c.pop("quantization_config"))
    first = r"packed quantized tensors for layer\(s\) \['model\.layers\.0\.mlp\.down_proj'"
    with pytest.raises(CheckpointError, match=first):
        AutoModelForCausalLM.from_pretrained(saved)


def test_deleted_layer_entry_is_refused(saved):
    _edit_config(saved, lambda c: c["quantization_config"]["layers"].pop("model.layers.1.mlp.down_proj"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.down_proj"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_flipped_symmetry_is_refused(saved):
    def flip(config):
        config["quantization_config"]["layers"]["model.layers.0.self_attn.q_proj"]["scheme"]["weights"]["symmetric"] = (
            True
        )

    _edit_config(saved, flip)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.q_proj"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_cli_refuses_a_load_with_missing_weights(tiny_llama_dir, tmp_path, capsys):
    tensors = load_file(tiny_llama_dir / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tiny_llama_dir / "model.safetensors", metadata={"format": "pt"})
    text = tmp_path / "t.txt"
    text.write_text("abcdefgh " * 20)
    code = main(["--quiet", "eval", "ppl", "--model", str(tiny_llama_dir), "--eval-data", str(text), "--seq-len", "16"])
    assert code == 2
    assert "1 weight(s) missing (model.layers.1.mlp.up_proj.weight)" in capsys.readouterr().err


# -- 6. per-tensor hashes of the packed bytes ------------------------------------------------


def _flip_a_byte(path, key):
    file = path / "model.safetensors"
    with safe_open(str(file), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(file)
    tensors[key].view(-1)[3] ^= 0x10
    save_file(tensors, file, metadata=metadata)


def test_saved_files_record_a_hash_per_compressed_tensor(saved):
    with safe_open(str(saved / "model.safetensors"), "pt") as f:
        hashes = json.loads(f.metadata()["hfcompress.sha256"])
    assert "model.layers.0.mlp.up_proj.qweight" in hashes and "model.layers.0.mlp.up_proj.scales" in hashes
    report = hfcompress.verify(saved)
    assert report.checked == len(hashes) and report.unhashed_files == ()


def test_flipped_bytes_are_found(saved, monkeypatch, capsys):
    _flip_a_byte(saved, "model.layers.1.self_attn.v_proj.qweight")
    with pytest.raises(CheckpointError, match=r"tensor 'model.layers.1.self_attn.v_proj.qweight' does not match"):
        hfcompress.verify(saved)
    AutoModelForCausalLM.from_pretrained(saved)  # off by default in Python: the check reads every tensor
    monkeypatch.setenv("HFCOMPRESS_VERIFY_ON_LOAD", "1")
    with pytest.raises(CheckpointError, match=r"v_proj\.qweight"):
        AutoModelForCausalLM.from_pretrained(saved)
    monkeypatch.delenv("HFCOMPRESS_VERIFY_ON_LOAD")
    assert main(["--quiet", "verify", str(saved)]) == 2
    assert "does not match the digest recorded when it was saved" in capsys.readouterr().err
    text = saved / "t.txt"
    text.write_text("abcdefgh " * 20)
    assert main(["--quiet", "eval", "ppl", "--model", str(saved), "--eval-data", str(text), "--seq-len", "16"]) == 2


def test_verify_command_passes_a_good_folder(saved, capsys):
    assert main(["--quiet", "verify", str(saved)]) == 0
    assert "OK (" in capsys.readouterr().out


# -- 7. NaN or Inf in a metric ---------------------------------------------------------------


class _NaNOnWindow(torch.nn.Module):
    """Returns finite logits, except NaN for inputs whose first token is ``bad_first``."""

    def __init__(self, bad_first):
        super().__init__()
        self.bad_first = bad_first
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids, use_cache=False):
        logits = torch.zeros(*ids.shape, 16)
        logits[ids[:, 0] == self.bad_first] = float("nan")
        return type("Out", (), {"logits": logits})()


@pytest.mark.parametrize("batch_size", [1, 2])
def test_nan_loss_names_the_first_bad_window(batch_size):
    ids = torch.arange(40) % 16  # windows of 8 start with 0, 8, 0, 8, 0
    ids[24] = 15  # window 3 starts with 15
    with pytest.raises(EvaluationError, match=r"NaN or Inf on window 3 \(tokens 24-31\)"):
        perplexity(_NaNOnWindow(15), ids, seq_len=8, batch_size=batch_size, progress=False)


def test_cli_eval_ppl_of_an_overflowing_model_exits_2(tiny_llama_dir, tmp_path, capsys):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.fill_(float("inf"))
    model.save_pretrained(tiny_llama_dir)
    text = tmp_path / "t.txt"
    text.write_text("abcdefgh " * 20)
    code = main(["--quiet", "eval", "ppl", "--model", str(tiny_llama_dir), "--eval-data", str(text), "--seq-len", "16"])
    assert code == 2
    assert "NaN or Inf on window 0" in capsys.readouterr().err


def test_glue_nan_output_names_the_example(tiny_bert):
    from datasets import Dataset

    from hfcompress.glue.harness import predict
    from hfcompress.glue.tasks import get_task
    from tests.conftest import make_char_tokenizer as _tok

    tokenizer = _tok()
    tokenizer.pad_token = "<unk>"
    data = {"input_ids": [[5, 6, 7], [5, 6], [5, 6, 7, 8]], "attention_mask": [[1, 1, 1], [1, 1], [1, 1, 1, 1]]}

    rows = Dataset.from_dict(data)
    with torch.no_grad():
        tiny_bert.bert.embeddings.word_embeddings.weight[8] = float("nan")  # only example 2 holds token 8
    with pytest.raises(EvaluationError, match=r"NaN or Inf on mrpc dev example 2;"):
        predict(tiny_bert, tokenizer, rows, task=get_task("mrpc"), batch_size=2)


# -- 8. one sentence instead of a traceback --------------------------------------------------


def test_calibration_ids_outside_the_vocabulary():
    ids = torch.tensor([[3, 5, 200, 7] * 4])
    with pytest.raises(
        CalibrationDataError, match=r"calibration token id 200 is outside the model's vocabulary \(0\.\.127\)"
    ):
        compress(make_tiny_llama(), [GPTQConfig(bits=4, group_size=16)], calibration_data=ids, progress=False)


def test_calibration_ids_of_the_wrong_shape():
    # [batches, samples, tokens] failed inside attention with a size mismatch
    ids = torch.randint(0, 128, (2, 4, 16))
    with pytest.raises(CalibrationDataError, match=r"must be \[num_samples, seq_len\].*got shape \(2, 4, 16\)"):
        compress(make_tiny_llama(), [GPTQConfig(bits=4, group_size=16)], calibration_data=ids, progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a torch without CUDA")
def test_a_cuda_device_without_cuda_is_named_before_anything_runs():
    model = make_tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 128, (4, 16))
    with pytest.raises(ModelError, match=r"device='cuda', but this torch .* sees no CUDA; pass device='cpu'"):
        compress(model, [GPTQConfig(bits=4, group_size=16)], calibration_data=ids, device="cuda", progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_calibration_window_longer_than_the_model_allows():
    ids = torch.randint(0, 128, (1, 100))
    with pytest.raises(CalibrationDataError, match="exceed the model's max_position_embeddings=64"):
        compress(make_tiny_llama(), [GPTQConfig(bits=4, group_size=16)], calibration_data=ids, progress=False)


def test_checkpoint_dir_that_is_a_file(tiny_llama_dir, tmp_path, capsys, no_model_load):
    recipe = tmp_path / "gptq.yaml"
    recipe.write_text(GPTQ_RECIPE)
    (tmp_path / "ckpt").write_text("x")
    code = _compress_cli(
        tiny_llama_dir, recipe, tmp_path / "out", "--checkpoint-dir", str(tmp_path / "ckpt"), "--calibration", "x"
    )
    assert code == 2
    assert f"--checkpoint-dir {tmp_path / 'ckpt'} is a file" in capsys.readouterr().err


def test_checkpoint_dir_that_is_a_file_in_python(tiny_llama, tmp_path):
    (tmp_path / "ckpt").write_text("x")
    with pytest.raises(OutputPathError, match=r"checkpoint_dir .* is a file"):
        compress(
            tiny_llama,
            [GPTQConfig(bits=4, group_size=16)],
            calibration_data=CALIB,
            progress=False,
            checkpoint_dir=tmp_path / "ckpt",
        )


def test_eval_ppl_text_shorter_than_a_window(tiny_llama_dir, tmp_path, capsys):
    text = tmp_path / "short.txt"
    text.write_text("just a few words")
    code = main(["--quiet", "eval", "ppl", "--model", str(tiny_llama_dir), "--eval-data", str(text), "--seq-len", "64"])
    assert code == 2
    assert "the text has 16 tokens, fewer than one window of seq_len=64" in capsys.readouterr().err


def test_eval_glue_on_a_causal_lm(tiny_llama_dir, capsys):
    code = main(["--quiet", "eval", "glue", "--model", str(tiny_llama_dir), "--tasks", "rte"])
    assert code == 2
    assert "is a causal LM (LlamaForCausalLM); the GLUE harness scores encoder classifiers" in capsys.readouterr().err


def test_push_to_hub_failure_says_the_local_save_is_complete(tiny_llama_dir, rtn_recipe, tmp_path, capsys, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    def offline(self, *args, **kwargs):
        raise ConnectionError("Failed to resolve 'huggingface.co'\nmore lines\nof traceback")

    # The Hub looks reachable (even where the caller set HF_HUB_OFFLINE), and the upload fails.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", offline)
    out = tmp_path / "out"
    assert _compress_cli(tiny_llama_dir, rtn_recipe, out, "--push-to-hub", "me/tiny") == 2
    err = capsys.readouterr().err
    assert f"the compressed model is saved, complete, in {out.absolute()}; uploading it to me/tiny failed" in err
    assert "Failed to resolve 'huggingface.co')" in err and "more lines" not in err
    assert hfcompress.verify(out).checked > 0
    assert (out / "README.md").is_file()  # the card was written before the upload was tried
    AutoModelForCausalLM.from_pretrained(out)


def test_push_to_hub_with_hub_offline_fails_before_loading(
    tiny_llama_dir, rtn_recipe, tmp_path, capsys, monkeypatch, no_model_load
):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert _compress_cli(tiny_llama_dir, rtn_recipe, tmp_path / "out", "--push-to-hub", "me/tiny") == 2
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err


def test_rtn_on_a_model_folder_without_a_tokenizer(tmp_path, rtn_recipe, caplog):
    make_tiny_llama().save_pretrained(tmp_path / "bare")
    with caplog.at_level(logging.WARNING):
        assert _compress_cli(tmp_path / "bare", rtn_recipe, tmp_path / "out") == 0
    assert "the output folder will have none" in caplog.text
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_gptq_without_calibration_fails_before_loading(tiny_llama_dir, tmp_path, capsys, no_model_load):
    recipe = tmp_path / "gptq.yaml"
    recipe.write_text(GPTQ_RECIPE)
    assert _compress_cli(tiny_llama_dir, recipe, tmp_path / "out") == 2
    assert "stage 'gptq' needs calibration data; pass --calibration wikitext2:valid" in capsys.readouterr().err


def test_recipe_path_that_is_a_folder(tiny_llama_dir, tmp_path, capsys, no_model_load):
    assert _compress_cli(tiny_llama_dir, tmp_path, tmp_path / "out") == 2
    assert "is a folder; give the path of a recipe YAML file inside it" in capsys.readouterr().err
