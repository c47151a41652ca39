"""torch.inference_mode(): compressing inside it, a model made inside it, and quantized layers
whose buffers are inference tensors (no version counter for the kernel cache to key on)."""

import copy

import pytest
import torch

import hfcompress
from hfcompress import ActivationQuantConfig, LearnedRoundingConfig, ModelError, QuantLinear, RTNConfig, compress
from hfcompress.quant import dispatch
from tests.conftest import make_tiny_llama
from tests.quant.helpers import quant_layer

IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
CALIB = torch.randint(0, 128, (8, 24), generator=torch.Generator().manual_seed(2))

W8A8_STATIC_SQ = (
    "stages:\n"
    "  - {technique: smoothquant, alpha: 0.5}\n"
    "  - {technique: rtn, bits: 8, group_size: -1, symmetric: true, ignore: [lm_head]}\n"
    "  - {technique: int8_activations, strategy: tensor, dynamic: false, observer: minmax}\n"
)
RECIPES = {
    "w4_rtn": "stages:\n  - {technique: rtn, bits: 4, group_size: 16}\n",
    "w8a8_dynamic": (
        "stages:\n"
        "  - {technique: rtn, bits: 8, group_size: -1, symmetric: true}\n"
        "  - {technique: int8_activations, strategy: token, dynamic: true}\n"
    ),
    "w8a8_static_smoothquant": W8A8_STATIC_SQ,
    "w4_gptq": "stages:\n  - {technique: gptq, bits: 4, group_size: 16}\n",
}


def _compressed(recipe: str, mode) -> torch.nn.Module:
    model = make_tiny_llama()
    with mode():
        compress(model, hfcompress.Recipe.from_yaml_str(recipe), calibration_data=CALIB, progress=False)
    return model


def _buffers_are_normal(model) -> bool:
    return all(not b.is_inference() for m in model.modules() if isinstance(m, QuantLinear) for b in m.buffers())


@pytest.mark.parametrize("name", list(RECIPES))
def test_compressing_inside_inference_mode_gives_the_no_grad_model(name):
    plain = _compressed(RECIPES[name], torch.no_grad)
    inside = _compressed(RECIPES[name], torch.inference_mode)
    assert _buffers_are_normal(inside)  # made by the stages outside inference mode
    with torch.inference_mode():
        assert torch.equal(inside(IDS).logits, plain(IDS).logits)
        # and generation, whose inputs are inference tensors
        out = inside.generate(IDS[:1, :6], max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        assert torch.equal(out, plain.generate(IDS[:1, :6], max_new_tokens=4, do_sample=False))


def test_a_model_made_inside_inference_mode_is_compressed_in_it():
    """Its weights are inference tensors: the stages write them in place (SmoothQuant's
    scaling) inside inference mode, where alone that is allowed; the layers then run on
    buffers that have no version counter."""
    plain = _compressed(W8A8_STATIC_SQ, torch.no_grad)
    with torch.inference_mode():
        model = make_tiny_llama()
    assert next(model.parameters()).is_inference()
    compress(model, hfcompress.Recipe.from_yaml_str(W8A8_STATIC_SQ), calibration_data=CALIB, progress=False)
    with torch.inference_mode():
        assert torch.equal(model(IDS).logits, plain(IDS).logits)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, plain(IDS).logits)


@pytest.mark.parametrize(
    "config",
    [
        LearnedRoundingConfig(bits=4, group_size=16, steps=2, batch_size=4),
        ActivationQuantConfig(strategy="tensor", dynamic=False, e2e_steps=2),
    ],
    ids=["learned_rounding", "tuned_static_scales"],
)
def test_a_stage_that_takes_gradients_refuses_inference_weights_before_anything_changes(config):
    with torch.inference_mode():
        model = make_tiny_llama()
    stages = (
        [config]
        if isinstance(config, LearnedRoundingConfig)
        else [RTNConfig(bits=8, group_size=-1, symmetric=True), config]
    )
    with pytest.raises(
        ModelError, match=r"takes gradients .* made under torch.inference_mode\(\).*torch.no_grad\(\) is fine"
    ):
        compress(model, stages, calibration_data=CALIB, progress=False)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())  # untouched


def test_a_stage_that_takes_gradients_runs_inside_inference_mode():
    base = make_tiny_llama()
    config = [LearnedRoundingConfig(bits=4, group_size=16, steps=3, batch_size=4)]
    plain, inside = copy.deepcopy(base), copy.deepcopy(base)
    compress(plain, config, calibration_data=CALIB, progress=False)
    with torch.inference_mode():
        compress(inside, config, calibration_data=CALIB, progress=False)
    with torch.no_grad():
        assert torch.equal(inside(IDS).logits, plain(IDS).logits)


@pytest.mark.parametrize("rows", [1, 80])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_inference_tensor_buffers_run_and_in_place_writes_reach_the_kernels(dtype, rows):
    """Buffers made in inference mode (a layer built inside it) are swapped for normal copies
    at the first call of a kernel that keeps state; a later in-place write, even inside
    inference mode, then bumps a version and that state is rebuilt."""
    scheme = hfcompress.QuantScheme.weight_only(num_bits=4, group_size=32, in_features=128, symmetric=False)
    with torch.inference_mode():
        _, qw = quant_layer(64, 128, bits=4, group_size=32)
        layer = QuantLinear.from_quantized(qw, scheme).to(dtype)
    x = torch.randn(rows, 128).to(dtype)
    assert dispatch.select_path(layer, x) != "reference"  # a kernel with a cached pack or plan
    with torch.inference_mode():
        assert layer.scales.is_inference()
        y = layer(x)
        assert not layer.scales.is_inference()
        torch.testing.assert_close(y, layer(x), rtol=0, atol=0)
        layer.scales.mul_(2)
        y2 = layer(x)
    torch.testing.assert_close(y2.float(), 2 * y.float(), rtol=1e-2, atol=1e-3)
