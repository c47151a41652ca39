"""AWQ: the factors, that the float model is unchanged, that the search helps weight-only
quantization (and never hurts on its tokens), its place in a recipe, and bad input."""

import pytest
import torch

import hfcompress
from hfcompress import AWQConfig, GPTQConfig, RecipeError, RTNConfig, compress
from hfcompress.modifier import CompressionContext
from hfcompress.techniques.awq.modifier import AWQModifier, awq_scales, relative_weight_mean
from hfcompress.techniques.smoothquant.modifier import Mapping
from tests.conftest import make_tiny_llama
from tests.techniques.test_smoothquant import CALIB, _with_outliers


def _awq(model, **options):
    """Run the stage alone and return its modifier (what it found and chose)."""
    modifier = AWQModifier(AWQConfig(**options), "awq")
    context = CompressionContext(calibration_data=CALIB, progress=False)
    modifier.check(model, context, hfcompress.modifier.ModelView(model))
    modifier.apply(model, context)
    return modifier


def test_factors_follow_awq_and_are_normalized():
    x = torch.tensor([4.0, 1.0, 0.25, 0.0])
    s = awq_scales(x, None, alpha=0.5)
    # sqrt(x) = 2, 1, 0.5 over the used channels, divided by sqrt(2 * 0.5) = 1.
    torch.testing.assert_close(s[:3], torch.tensor([2.0, 1.0, 0.5]))
    assert s[3].item() == 1.0  # a channel no calibration token used is left alone
    assert torch.equal(awq_scales(x, None, alpha=0.0), torch.ones(4))
    duo = awq_scales(x[:2], torch.tensor([0.5, 2.0]), alpha=0.5)  # 4^.5/.5^.5, 1/2^.5, normalized
    raw = torch.tensor([2.0 / 0.5**0.5, 1.0 / 2.0**0.5])
    torch.testing.assert_close(duo, raw / (raw.max() * raw.min()).sqrt())


def test_relative_weight_mean_is_per_group():
    w = torch.tensor([[1.0, -2.0, 3.0, 6.0], [4.0, 4.0, -1.0, 2.0]])
    # Groups of 2, each |w| over its group's largest: row 0 -> [.5, 1, .5, 1], row 1 -> [1, 1, .5, 1].
    expected = torch.tensor([(0.5 + 1.0) / 2, (1.0 + 1.0) / 2, (0.5 + 0.5) / 2, (1.0 + 1.0) / 2])
    torch.testing.assert_close(relative_weight_mean(w, 2), expected)


def test_scaling_leaves_the_float_model_unchanged(llama_ids):
    model = _with_outliers(make_tiny_llama())
    with torch.no_grad():
        before = model(llama_ids).logits
        modifier = _awq(model, bits=3, group_size=16)
        after = model(llama_ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert set(modifier.applied["model.layers.0."]) == {
        Mapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        Mapping("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        Mapping("mlp.up_proj", ("mlp.down_proj",)),
        Mapping("self_attn.v_proj", ("self_attn.o_proj",), groups=2, head_dim=20),
    }
    # With outlier channels feeding them, at least the norm mappings get scaled.
    chosen = modifier.alphas["model.layers.0."]
    assert chosen["input_layernorm"] is not None and chosen["post_attention_layernorm"] is not None


@pytest.mark.parametrize(("weights", "factor"), [("rtn", 0.8), ("gptq", 0.95)])
def test_scaling_lowers_the_weight_only_error(weights, factor, llama_ids):
    def error(awq):
        model = _with_outliers(make_tiny_llama())
        with torch.no_grad():
            ref = model(llama_ids).logits
        grid = dict(bits=3, group_size=16)
        stages = [AWQConfig(**grid)] if awq else []
        stages += [RTNConfig(**grid) if weights == "rtn" else GPTQConfig(**grid, batch_size=4)]
        compress(model, stages, calibration_data=CALIB, progress=False)
        with torch.no_grad():
            return float((model(llama_ids).logits - ref).norm() / ref.norm())

    assert error(awq=True) < factor * error(awq=False)  # GPTQ alone already recovers part of it


def test_the_search_never_picks_a_larger_error_than_no_scaling():
    model = make_tiny_llama()  # no outliers: scaling may well not pay
    modifier = AWQModifier(AWQConfig(bits=4, group_size=16, grid=4), "awq")
    layer = model.model.layers[0]
    x = torch.randn(64, 80, generator=torch.Generator().manual_seed(0))
    mapping = Mapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))
    s, alpha = modifier._search(layer, mapping, x.abs().mean(dim=0), x)

    def error(scale):
        from hfcompress.quant.affine import quantize_rtn

        total = 0.0
        for name in mapping.readers:
            w = layer.get_submodule(name).weight.detach()
            scale_ = torch.ones(80) if scale is None else scale
            w_hat = quantize_rtn(w * scale_, bits=4, group_size=16, symmetric=False).dequantize() / scale_
            total += float((x @ w_hat.t() - x @ w.t()).square().sum())
        return total

    assert (s is None) == (alpha is None)
    assert error(s) <= error(None)


def test_the_search_picks_the_exponent_with_the_lowest_output_error():
    """The search scores candidates through x^T x; the choice is the one that measuring the
    readers' outputs directly would make."""
    from hfcompress.quant.affine import quantize_rtn

    model = make_tiny_llama()
    modifier = AWQModifier(AWQConfig(bits=3, group_size=16, grid=8, duo_scaling=False), "awq")
    layer = model.model.layers[0]
    x = torch.randn(64, 80, generator=torch.Generator().manual_seed(0))
    x[:, [3, 17, 40]] *= 30  # outlier channels, so that some scaling pays
    mapping = Mapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))
    x_mean = x.abs().mean(dim=0)

    def output_error(scale):
        total = 0.0
        for name in mapping.readers:
            w = layer.get_submodule(name).weight.detach()
            w_hat = quantize_rtn(w * scale, bits=3, group_size=16, symmetric=False).dequantize() / scale
            total += float((x @ w_hat.t() - x @ w.t()).double().square().sum())
        return total

    errors = {None: output_error(torch.ones(80))}
    errors.update({i / 8: output_error(awq_scales(x_mean, None, i / 8)) for i in range(8)})
    _, alpha = modifier._search(layer, mapping, x_mean, x)
    assert alpha is not None and errors[alpha] == pytest.approx(min(errors.values()), rel=1e-4)


def test_awq_after_the_weight_stage_is_refused(tiny_llama):
    with pytest.raises(RecipeError, match="AWQ rescales float weights, so put it before the weight stages"):
        compress(tiny_llama, [RTNConfig(bits=4, group_size=16), AWQConfig()], calibration_data=CALIB, progress=False)


@pytest.mark.parametrize("technique", ["awq", "smoothquant"])
def test_a_smoothing_stage_without_the_stage_it_prepares_for_is_refused(tiny_llama, llama_ids, technique):
    # alone (or before a stage that quantizes nothing) it left a float model with the same
    # function and no quantization_config, silently: {"technique": "awq", "bits": 4} reads as 4-bit
    before = tiny_llama(llama_ids).logits
    alone = [{"name": "s", "technique": technique}, {"technique": "kv_cache", "bits": 4, "group_size": 16}]
    with pytest.raises(RecipeError, match=r"stage 's' .* no later stage of this recipe does that: the model"):
        compress(tiny_llama, alone, calibration_data=CALIB, progress=False)
    assert torch.equal(tiny_llama(llama_ids).logits, before)
    # what each prepares for, after it
    after = {"awq": RTNConfig(bits=4, group_size=16), "smoothquant": {"technique": "int8_activations"}}[technique]
    if technique == "awq":  # int8 activations alone do not count for AWQ: it scales for the weight grid
        with pytest.raises(RecipeError, match="stage 's' "):
            compress(tiny_llama, [alone[0], {"technique": "int8_activations"}], calibration_data=CALIB, progress=False)
    stages = [alone[0], after] if technique == "awq" else [alone[0], RTNConfig(bits=8, group_size=-1), after]
    compress(tiny_llama, stages, calibration_data=CALIB, progress=False)
    assert tiny_llama.config.quantization_config.layers


def test_recipe_stage_reads_from_a_mapping(tiny_llama):
    recipe = hfcompress.Recipe.from_dict(
        {
            "stages": [
                {"technique": "awq", "bits": 4, "group_size": 16, "grid": 5},
                {"technique": "gptq", "bits": 4, "group_size": 16},
            ]
        }
    )
    compress(tiny_llama, recipe, calibration_data=CALIB, progress=False)
    assert type(tiny_llama.model.layers[0].mlp.down_proj).__name__ == "QuantLinear"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"bits": 5}, "bits=5 is invalid"),
        ({"group_size": 4}, "group_size=4 is invalid"),
        ({"grid": 0}, "grid=0 is invalid"),
        ({"search_tokens": 0}, "search_tokens=0 is invalid"),
        ({"mappings": ["input_layernorm"]}, "mappings='input_layernorm' is invalid"),
    ],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises(RecipeError, match=message):
        AWQConfig(**options)


@pytest.mark.parametrize("config", [AWQConfig(), hfcompress.SmoothQuantConfig()])
def test_nan_in_calibration_inputs_names_the_layer(config):
    model = make_tiny_llama()
    calib = CALIB.clone()
    calib[calib == 99] = 98
    calib[5, 3] = 99  # not in the first sequence, which the mapping discovery probes with
    with torch.no_grad():
        model.model.embed_tokens.weight[99] = float("inf")
    with pytest.raises(
        hfcompress.CalibrationDataError, match=r"'model\.layers\.0\.self_attn\.q_proj' hold NaN or infinite"
    ):
        compress(model, [config, RTNConfig(bits=8, group_size=-1)], calibration_data=calib, progress=False)
