"""GPTQ end to end on tiny models: quality, resume, calibration inputs, errors."""

import copy
import logging

import pytest
import torch

from hfcompress import CalibrationDataError, CheckpointError, GPTQConfig, QuantLinear, RecipeError, RTNConfig, compress
from hfcompress.input_stats import InputHessianHooks
from hfcompress.techniques.gptq import modifier as gptq_modifier
from tests.conftest import killed_run, make_char_tokenizer, make_tiny_llama

CALIB = torch.randint(0, 128, (16, 24), generator=torch.Generator().manual_seed(5))


def _mse(model, reference, ids):
    return (model(ids).logits - reference).pow(2).mean().item()


def test_gptq_beats_rtn_on_a_tiny_llama(tiny_llama):
    reference = tiny_llama(CALIB).logits
    rtn, gptq = copy.deepcopy(tiny_llama), copy.deepcopy(tiny_llama)
    compress(rtn, [RTNConfig(bits=3, group_size=16)], progress=False)
    compress(gptq, [GPTQConfig(bits=3, group_size=16)], calibration_data=CALIB, progress=False)
    assert _mse(gptq, reference, CALIB) < 0.7 * _mse(rtn, reference, CALIB)


@pytest.mark.parametrize(
    "options", [{"true_sequential": True}, {"act_order": True, "clip_search": True}, {"compute_dtype": "bfloat16"}]
)
def test_options_run_and_quantize_every_target(tiny_llama, options, monkeypatch):
    # bfloat16 passes even on a CPU that would fall back to float32 for speed
    monkeypatch.setattr("hfcompress.layerwise.native_bfloat16", lambda device_type: True)
    compress(tiny_llama, [GPTQConfig(bits=4, group_size=16, **options)], calibration_data=CALIB, progress=False)
    assert sum(isinstance(m, QuantLinear) for m in tiny_llama.modules()) == 14


def _tensors(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resume_after_a_kill_gives_the_uninterrupted_result(tmp_path, monkeypatch):
    config = [GPTQConfig(bits=4, group_size=16)]
    uninterrupted = make_tiny_llama(seed=3, layers=4)
    compress(uninterrupted, config, calibration_data=CALIB, progress=False)
    expected = _tensors(uninterrupted)

    original = gptq_modifier.GPTQModifier._quantize_block
    killed_run(
        monkeypatch,
        gptq_modifier.GPTQModifier,
        "_quantize_block",
        2,
        lambda: compress(
            make_tiny_llama(seed=3, layers=4), config, calibration_data=CALIB, progress=False, checkpoint_dir=tmp_path
        ),
    )
    assert sorted(p.name for p in (tmp_path / "stage_0").glob("block_*")) == [
        "block_0000.safetensors",
        "block_0001.safetensors",
    ]

    resumed_calls = []
    monkeypatch.setattr(
        gptq_modifier.GPTQModifier,
        "_quantize_block",
        lambda self, *a, **k: (resumed_calls.append(1), original(self, *a, **k))[1],
    )
    resumed = make_tiny_llama(seed=3, layers=4)
    compress(resumed, config, calibration_data=CALIB, progress=False, checkpoint_dir=tmp_path)
    assert len(resumed_calls) == 2  # only the two unfinished blocks were quantized again
    got = _tensors(resumed)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_checkpoint_of_another_run_is_refused(tmp_path):
    compress(
        make_tiny_llama(),
        [GPTQConfig(bits=4, group_size=16)],
        calibration_data=CALIB,
        progress=False,
        checkpoint_dir=tmp_path,
    )
    with pytest.raises(CheckpointError, match="belongs to a run with other stage settings"):
        compress(
            make_tiny_llama(),
            [GPTQConfig(bits=3, group_size=16)],
            calibration_data=CALIB,
            progress=False,
            checkpoint_dir=tmp_path,
        )


def test_text_calibration_needs_and_uses_a_tokenizer(tiny_llama, tmp_path):
    text = ["the quick brown fox jumps over the lazy dog"] * 10
    with pytest.raises(CalibrationDataError, match="needs a tokenizer"):
        compress(copy.deepcopy(tiny_llama), [GPTQConfig(group_size=16)], calibration_data=text, progress=False)
    compress(
        tiny_llama,
        [GPTQConfig(group_size=16)],
        calibration_data=text,
        tokenizer=make_char_tokenizer(),
        num_calibration_samples=4,
        calibration_seq_len=16,
        progress=False,
    )
    assert isinstance(tiny_llama.model.layers[0].mlp.up_proj, QuantLinear)


def test_calibration_from_a_text_file_and_a_dataset(tiny_llama, tmp_path):
    from datasets import Dataset

    path = tmp_path / "calib.txt"
    path.write_text("some calibration text, repeated. " * 20)
    tok = make_char_tokenizer()
    for data in (str(path), Dataset.from_dict({"text": ["a line of text for calibration"] * 8})):
        model = copy.deepcopy(tiny_llama)
        compress(
            model,
            [GPTQConfig(group_size=16)],
            calibration_data=data,
            tokenizer=tok,
            num_calibration_samples=4,
            calibration_seq_len=16,
            progress=False,
        )
        assert isinstance(model.model.layers[1].self_attn.o_proj, QuantLinear)


def test_model_without_blocks_is_refused_before_anything_changes():
    model = torch.nn.Sequential(torch.nn.Linear(32, 32))
    before = model[0].weight.clone()
    config = GPTQConfig(bits=4, group_size=16)
    with pytest.raises(RecipeError, match=r"stage 'stage_0' \(gptq\): cannot find the repeated transformer blocks"):
        compress(model, [config], calibration_data=CALIB % 64, progress=False)
    assert isinstance(model[0], torch.nn.Linear) and torch.equal(model[0].weight, before)


def test_damping_escalation_is_logged(tiny_llama, caplog):
    # One calibration token: every Hessian has rank 1, so tiny damping cannot factorize it.
    with caplog.at_level(logging.WARNING, logger="hfcompress.techniques.gptq.modifier"):
        compress(
            tiny_llama, [GPTQConfig(bits=4, group_size=16, damp=1e-9)], calibration_data=CALIB[:1, :1], progress=False
        )
    assert any(
        "model.layers.0.self_attn.q_proj was not positive definite with damp=1e-09" in r.getMessage()
        for r in caplog.records
    )


def test_offloaded_model_gives_the_in_memory_tensors(tmp_path):
    from transformers import AutoModelForCausalLM

    make_tiny_llama(seed=4, layers=3).save_pretrained(tmp_path / "float")
    config = [GPTQConfig(bits=4, group_size=16, act_order=True)]
    in_memory = AutoModelForCausalLM.from_pretrained(tmp_path / "float")
    compress(in_memory, config, calibration_data=CALIB, progress=False)

    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.layers.2": "disk",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    offloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "float", device_map=device_map, offload_folder=tmp_path / "offload"
    )
    assert offloaded.model.layers[2].mlp.up_proj.weight.is_meta
    compress(offloaded, config, calibration_data=CALIB, progress=False)
    expected, got = _tensors(in_memory), _tensors(offloaded)
    quantized = [k for k in expected if k.endswith((".qweight", ".scales", ".zeros"))]
    assert len(quantized) == 3 * 7 * 3
    assert all(torch.equal(got[k], expected[k]) for k in quantized)
    torch.testing.assert_close(offloaded(CALIB).logits, in_memory(CALIB).logits)


def test_layers_reading_one_input_share_one_product(tiny_llama, llama_ids):
    # Defect: the docstring promised one x^T x for q/k/v and one for gate/up, but the identity
    # check compared against a fresh `.detach()` and never matched (0 reuses).
    block = tiny_llama.model.layers[0]
    names = [n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    inputs = {}
    hooks = InputHessianHooks(block, names)

    def keep_input(name):
        def hook(_module, args, _output):
            inputs[name] = args[0].detach()

        return hook

    handles = [block.get_submodule(n).register_forward_hook(keep_input(n)) for n in names]
    tiny_llama(llama_ids)
    hooks.remove()
    for h in handles:
        h.remove()
    assert (hooks.products, hooks.reuses) == (4, 3)  # q/k/v, o, gate/up, down
    for name in names:
        x = inputs[name].reshape(-1, inputs[name].shape[-1])
        torch.testing.assert_close(hooks.acc[name].hessian(), 2 * x.t() @ x / x.shape[0])
