"""GPTAQ (``asym_calibration``): the closed-form target, the paired-input statistic, and the
stage on a tiny Llama (first block unchanged, lower error against the float model, resume)."""

import collections

import pytest
import torch
from torch import nn

from hfcompress import GPTQConfig, LearnedRoundingConfig, RecipeError, compress
from hfcompress.input_stats import HessianAccumulator, InputShiftHooks
from hfcompress.techniques.gptq import modifier as gptq_modifier
from hfcompress.techniques.gptq.algorithm import asymmetric_target
from tests.conftest import assert_resume_gives_the_uninterrupted_result, make_tiny_llama

CALIB = torch.randint(0, 128, (8, 24), generator=torch.Generator().manual_seed(5))


def test_asymmetric_target_is_the_least_squares_fit_to_the_float_output():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 12, generator=g)
    x_float = x + 0.3 * torch.randn(256, 12, generator=g)
    w = torch.randn(5, 12, generator=g)
    acc = HessianAccumulator(12)
    acc.add(x)
    d = (x_float - x).t() @ x * (2.0 / 256)
    target = asymmetric_target(w, acc.hessian(), d, damp=1e-9)
    expected = torch.linalg.lstsq(x, x_float @ w.t()).solution.t()  # argmin ||x W'^T - x~ W^T||
    torch.testing.assert_close(target, expected, rtol=1e-4, atol=1e-4)
    half = asymmetric_target(w, acc.hessian(), d, damp=1e-9, alpha=0.5)  # part of the way there
    torch.testing.assert_close(half - w, 0.5 * (target - w))
    assert torch.equal(asymmetric_target(w, acc.hessian(), torch.zeros(12, 12), damp=0.01), w)


def test_shift_hooks_pair_the_inputs_of_two_modules():
    g = torch.Generator().manual_seed(1)
    quantized, float_copy = nn.Sequential(nn.Linear(6, 6)), nn.Sequential(nn.Linear(6, 6))
    hooks = InputShiftHooks(quantized, float_copy, ["0"], torch.float32)
    expected = torch.zeros(6, 6)
    for _ in range(3):
        x, x_float = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
        quantized(x)
        float_copy(x_float)
        expected += (x_float - x).t() @ x
    hooks.remove()
    torch.testing.assert_close(hooks.shift("0"), expected * 2.0 / 12)
    quantized(torch.randn(4, 6))  # removed: nothing more is added
    torch.testing.assert_close(hooks.shift("0"), expected * 2.0 / 12)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_first_block_is_plain_gptq_and_later_blocks_fit_the_float_model():
    plain, asym = make_tiny_llama(seed=2, layers=3), make_tiny_llama(seed=2, layers=3)
    reference = make_tiny_llama(seed=2, layers=3)
    compress(plain, [GPTQConfig(bits=3, group_size=16)], calibration_data=CALIB, progress=False)
    compress(asym, [GPTQConfig(bits=3, group_size=16, asym_calibration=True)], calibration_data=CALIB, progress=False)
    p, a = _state(plain), _state(asym)
    first = [k for k in p if k.startswith("model.layers.0.")]
    assert first and all(torch.equal(p[k], a[k]) for k in first)  # block 0 sees the float inputs
    assert any(not torch.equal(p[k], a[k]) for k in p if k.startswith("model.layers.2."))

    def error(model):
        with torch.no_grad():
            out = model(CALIB, output_hidden_states=True).hidden_states[-1]
            ref = reference(CALIB, output_hidden_states=True).hidden_states[-1]
        return float((out - ref).square().mean())

    assert error(asym) < error(plain)


def test_resume_after_a_kill_gives_the_uninterrupted_result(tmp_path, monkeypatch):
    config = [GPTQConfig(bits=4, group_size=16, asym_calibration=True, true_sequential=True)]
    assert_resume_gives_the_uninterrupted_result(
        monkeypatch, tmp_path, config, CALIB, gptq_modifier.GPTQModifier, "_quantize_block", 1
    )


def test_alpha_outside_zero_to_one_is_refused():
    with pytest.raises(RecipeError, match=r"asym_alpha=1.5 is invalid; accepted: a number in \[0, 1\]"):
        GPTQConfig(asym_calibration=True, asym_alpha=1.5)


def test_the_float_copy_of_a_block_runs_once_per_batch():
    """GPTAQ's pass through the float block also gives the float model's activations that
    the next block needs (and learned rounding fits to): no second pass computes them."""
    model = make_tiny_llama(seed=2, layers=2)
    calls = collections.Counter()
    for i, layer in enumerate(model.model.layers):  # the runner's float copies keep these hooks
        layer.post_attention_layernorm.register_forward_hook(lambda *_, i=i: calls.update([i]))
    config = GPTQConfig(bits=4, group_size=16, asym_calibration=True, batch_size=2)
    compress(model, [config], calibration_data=CALIB, progress=False)
    # 4 batches, each through the block (statistics), its float copy, then the block again
    # (the next block's inputs).
    assert calls == {0: 12, 1: 12}
    calls.clear()
    model = make_tiny_llama(seed=2, layers=2)
    for i, layer in enumerate(model.model.layers):
        layer.post_attention_layernorm.register_forward_hook(lambda *_, i=i: calls.update([i]))
    config = LearnedRoundingConfig(bits=4, group_size=16, asym_calibration=True, batch_size=2, steps=3)
    compress(model, [config], calibration_data=CALIB, progress=False)
    assert calls == {0: 15, 1: 15}  # and one per learned-rounding step
