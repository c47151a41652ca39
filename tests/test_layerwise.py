"""The generic layerwise runner: any per-block work, gradient steps included, with resume."""

from __future__ import annotations

import pytest
import torch

from hfcompress.checkpointing import BlockCheckpoint, run_fingerprint
from hfcompress.layerwise import Block, LayerwiseRunner
from tests.conftest import make_tiny_llama

BATCHES = [{"input_ids": torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(i))} for i in range(2)]
TARGETS = [f"model.layers.{i}.mlp.down_proj" for i in range(3)]


class _Killed(Exception):
    pass


def _train_norm(losses: list[tuple[float, float]]):
    """A technique that takes gradient steps inside each block: it trains the block's MLP
    output projection so the block's output moves towards half of what it was."""

    def process(block: Block) -> None:
        weight = block.module.mlp.down_proj.weight
        targets = [0.5 * block.forward(item) for item in block.inputs]
        weight.requires_grad_(True)
        optimizer = torch.optim.Adam([weight], lr=0.01)
        first = last = None
        for _ in range(20):
            with torch.enable_grad():
                loss = sum(
                    (block.forward(item, grad=True) - t).pow(2).mean()
                    for item, t in zip(block.inputs, targets, strict=True)
                )
                optimizer.zero_grad()
                loss.backward()
            optimizer.step()
            first = loss.item() if first is None else first
            last = loss.item()
        weight.requires_grad_(False)
        losses.append((first, last))

    return process


def _run(model, checkpoint=None, process=None):
    losses = []
    runner = LayerwiseRunner(model, BATCHES, device=torch.device("cpu"), checkpoint=checkpoint, progress=False)
    runner.run(process or _train_norm(losses), TARGETS)
    return losses


def test_process_can_take_gradient_steps_inside_a_block():
    model = make_tiny_llama(layers=3)
    reference = make_tiny_llama(layers=3)
    losses = _run(model)
    assert len(losses) == 3 and all(last < 0.8 * first for first, last in losses)
    # The trained blocks are the model's now.
    ids = BATCHES[0]["input_ids"]
    hidden = model(ids, output_hidden_states=True).hidden_states
    float_hidden = reference(ids, output_hidden_states=True).hidden_states
    assert (hidden[1] - float_hidden[1]).abs().max() > 1e-3


def _fingerprint(model):
    return run_fingerprint({"stage": "train_norm"}, model, [b["input_ids"] for b in BATCHES])


def test_a_killed_run_resumes_from_its_block_checkpoints_to_the_same_result(tmp_path, caplog):
    expected = make_tiny_llama(layers=3)
    _run(expected)

    model = make_tiny_llama(layers=3)
    losses: list = []
    train = _train_norm(losses)

    def killed_at_block_2(block: Block) -> None:
        if block.index == 2:
            raise _Killed
        train(block)

    with pytest.raises(_Killed):
        _run(model, BlockCheckpoint(tmp_path, _fingerprint(model)), killed_at_block_2)

    resumed = make_tiny_llama(layers=3)
    checkpoint = BlockCheckpoint(tmp_path, _fingerprint(resumed))
    assert checkpoint.completed(3) == 2
    with caplog.at_level("INFO", logger="hfcompress.layerwise"):
        losses = _run(resumed, checkpoint)
    assert len(losses) == 1  # only block 2 was trained again
    assert "resuming after block 2 of 3" in caplog.text
    got, want = resumed.state_dict(), expected.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_reference_stream_carries_the_unprocessed_models_activations():
    model = make_tiny_llama(layers=3)
    with torch.no_grad():
        float_hidden = model(BATCHES[1]["input_ids"], output_hidden_states=True).hidden_states
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    train = _train_norm([])

    def record_then_train(block: Block) -> None:
        seen[block.index] = (block.reference[1], block.inputs[1].args[0])
        train(block)

    runner = LayerwiseRunner(model, BATCHES, device=torch.device("cpu"), progress=False, reference=True)
    runner.run(record_then_train, TARGETS)
    for index, (reference, inputs) in seen.items():
        # The block's float output on float inputs (the last block's is before the final norm).
        if index < 2:
            assert torch.allclose(reference, float_hidden[index + 1], atol=1e-5)
        if index > 0:  # the processed stream has drifted from it
            assert (inputs - float_hidden[index]).abs().max() > 1e-3


def test_bfloat16_compute_falls_back_to_float32_where_the_device_has_no_fast_bfloat16(monkeypatch, caplog):
    from hfcompress import layerwise

    monkeypatch.setattr(layerwise, "_WARNED_BF16", set())
    assert layerwise.autocast_dtype("float32", "cpu") is None
    monkeypatch.setattr(layerwise, "native_bfloat16", lambda device_type: True)
    assert layerwise.autocast_dtype("bfloat16", "cpu") is torch.bfloat16
    assert not caplog.records

    monkeypatch.setattr(layerwise, "native_bfloat16", lambda device_type: device_type != "cpu")
    with caplog.at_level("WARNING", logger="hfcompress.layerwise"):
        assert layerwise.autocast_dtype("bfloat16", torch.device("cpu")) is None
        assert layerwise.autocast_dtype("bfloat16", "cpu") is None  # warned once, not per stage
    (record,) = caplog.records
    assert "no fast bfloat16" in record.getMessage() and "compute_dtype: float32" in record.getMessage()


def test_training_in_bfloat16_falls_back_to_float32_where_it_would_be_slow(monkeypatch, tmp_path):
    from hfcompress import layerwise
    from hfcompress.integrations.trainer import training_arguments

    monkeypatch.setattr(layerwise, "_WARNED_BF16", set())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(layerwise, "native_bfloat16", lambda device_type: False)
    assert training_arguments(tmp_path, bf16=True).bf16 is False
    monkeypatch.setattr(layerwise, "native_bfloat16", lambda device_type: True)
    assert training_arguments(tmp_path, bf16=True).bf16 is True
    assert training_arguments(tmp_path, bf16=False).bf16 is False


@pytest.mark.parametrize(
    ("model_type", "extra"),
    [
        ("gemma3_text", dict(head_dim=16, sliding_window=16, sliding_window_pattern=2)),
        ("qwen2", dict(use_sliding_window=True, sliding_window=16, max_window_layers=1)),
    ],
    ids=["gemma3", "qwen2-sliding"],
)
def test_each_kind_of_block_gets_its_own_mask_and_rotary_tables(model_type, extra):
    """Hybrid models give their sliding-window and full-attention blocks different attention
    masks (and Gemma 3 different rotary tables). The calibration stream used to replay block
    0's to every block, so the full-attention blocks of Gemma 3 computed on a sliding-window
    mask (3.4 off the model's own activations at 64 tokens, window 16): GPTQ, AWQ and
    SmoothQuant calibrated on activations the model never produces."""
    from tests.conftest import make_tiny_causal

    model = make_tiny_causal(model_type, **extra)
    ids = torch.randint(3, 128, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    outputs = {}

    def record(block: Block) -> None:
        outputs[block.index] = block.forward(block.inputs[0])

    names = [f"model.layers.{i}.mlp.up_proj" for i in range(4)]
    LayerwiseRunner(model, [{"input_ids": ids}], device=torch.device("cpu"), progress=False).run(record, names)
    for index in range(3):  # the last block's output is before the final norm
        torch.testing.assert_close(outputs[index], hidden[index + 1], rtol=0, atol=1e-5)


def test_a_loaded_offloaded_layer_is_freed_when_replaced_without_waiting_for_the_garbage_collector(tmp_path):
    # accelerate's remove_hook_from_module puts the class's forward back as a bound method in
    # the module's dict: a reference cycle, so each float layer RTN replaced in an offloaded
    # model stayed alive until a gc.collect() (RTN over SmolLM2 on disk: 1521 MiB, not ~560).
    import gc
    import weakref

    from transformers import AutoModelForCausalLM

    import hfcompress.layerwise as layerwise

    make_tiny_llama(layers=2).save_pretrained(tmp_path / "float")
    device_map = {"model.embed_tokens": "cpu", "model.layers": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    device_map["model.rotary_emb"] = "cpu"
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "float", device_map=device_map, offload_folder=tmp_path / "offload"
    )
    block = model.model.layers[0]
    assert block.mlp.up_proj.weight.is_meta
    layerwise.materialize_offloaded(block, model=model)
    assert not block.mlp.up_proj.weight.is_meta and "forward" not in block.mlp.up_proj.__dict__
    up = weakref.ref(block.mlp.up_proj)
    gc.disable()
    try:
        block.mlp.up_proj = torch.nn.Identity()
        assert up() is None
    finally:
        gc.enable()


def test_a_run_leaves_garbage_collection_to_python(monkeypatch):
    # A full collection walks every object the process holds (0.2 s with transformers loaded,
    # 0.3-0.6 s in this test process): one per block cost 6 s of a 50 s SmolLM2 GPTQ run, and
    # found nothing there; what a run replaces is freed as its references go.
    import gc

    collections = []
    monkeypatch.setattr(gc, "collect", lambda *args: collections.append(args) or 0)
    model = make_tiny_llama()
    LayerwiseRunner(model, BATCHES, device=torch.device("cpu"), progress=False).run(lambda block: None, TARGETS)
    assert not collections
