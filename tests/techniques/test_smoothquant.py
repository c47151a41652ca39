"""SmoothQuant: the factors, the mapping discovery, exactness, and that it helps int8 activations."""

import pytest
import torch

import hfcompress
from hfcompress import ActivationQuantConfig, GPTQConfig, RecipeError, RTNConfig, SmoothQuantConfig, compress
from hfcompress.modifier import CompressionContext
from hfcompress.techniques.smoothquant.algorithm import smoothing_scales
from hfcompress.techniques.smoothquant.modifier import Mapping, SmoothQuantModifier
from tests.conftest import make_tiny_causal, make_tiny_llama

CALIB = torch.randint(1, 100, (8, 24), generator=torch.Generator().manual_seed(3))  # valid for both tiny models
W8 = RTNConfig(bits=8, group_size=-1, symmetric=True)


def _with_outliers(model):
    """Give the input norms a few huge channels, as trained LLMs have (the reason for SmoothQuant)."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[[3, 40]] *= 60
            layer.post_attention_layernorm.weight[[7]] *= 60
    return model


def _smoothquant(model, **options):
    """Run the stage and return its modifier (what it found and chose)."""
    modifier = SmoothQuantModifier(SmoothQuantConfig(**options), "smooth")
    context = CompressionContext(calibration_data=CALIB, progress=False)
    view = hfcompress.modifier.ModelView(model)
    modifier.check(model, context, view)
    modifier.apply(model, context)
    return modifier


def test_factors_follow_the_papers_equation():
    act = torch.tensor([16.0, 1.0, 0.0])
    weight = torch.tensor([1.0, 4.0, 2.0])
    s = smoothing_scales(act, weight, alpha=0.5)
    assert s[0].item() == pytest.approx(4.0)  # 16^0.5 / 1^0.5
    assert s[1].item() == pytest.approx(0.5)  # 1 / 4^0.5
    assert s[2].item() == 1.0  # a channel never used keeps its scale
    assert smoothing_scales(act[:2], weight[:2], alpha=1.0)[0].item() == pytest.approx(16.0)


def test_discovers_the_llama_mappings_with_grouped_v_to_o(tiny_llama):
    modifier = _smoothquant(tiny_llama)
    found = set(modifier.applied["model.layers.0."])
    assert found == {
        Mapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        Mapping("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        Mapping("mlp.up_proj", ("mlp.down_proj",)),
        # 4 query heads share 2 KV heads of 20 dims: each v channel feeds 2 o columns.
        Mapping("self_attn.v_proj", ("self_attn.o_proj",), groups=2, head_dim=20),
    }


def test_an_explicit_grouped_v_to_o_mapping_is_accepted_as_the_discovery_finds_it(tiny_llama, llama_ids):
    # Under grouped-query attention v gives fewer channels than o reads; the explicit mapping
    # that the discovery itself uses must not be refused as a shape mismatch.
    with torch.no_grad():
        before = tiny_llama(llama_ids).logits
        modifier = _smoothquant(tiny_llama, mappings=("self_attn.v_proj -> self_attn.o_proj",))
        after = tiny_llama(llama_ids).logits
    assert modifier.applied["model.layers.0."] == [
        Mapping("self_attn.v_proj", ("self_attn.o_proj",), groups=2, head_dim=20)
    ]
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_grouped_reader_index_maps_query_heads_to_their_kv_head():
    index = Mapping("v", ("o",), groups=2, head_dim=3).reader_index(12, torch.device("cpu"))
    assert index.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5, 3, 4, 5]


def test_v_to_o_is_one_to_one_without_grouped_query_attention():
    model = make_tiny_llama()
    model.config.num_key_value_heads = 4
    model = type(model)(model.config).eval()
    modifier = _smoothquant(model)
    assert Mapping("self_attn.v_proj", ("self_attn.o_proj",)) in modifier.applied["model.layers.1."]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_are_smoothed_as_float32_ones(dtype, tiny_bert):
    # The exactness check allowed any dtype a change of 1e-3, below bfloat16's round-off, so
    # every mapping of a bfloat16 model was judged inexact and nothing was smoothed (SmolLM2's
    # static W8A8 recipe: perplexity +35% instead of +5%). BERT's post-norm stays refused.
    llama = _with_outliers(make_tiny_llama(hidden_size=256, intermediate_size=512, layers=4)).to(dtype)
    found = _smoothquant(llama).applied
    assert len(found) == 4 and all(len(mappings) == 4 for mappings in found.values())
    assert _smoothquant(tiny_bert.to(dtype)).applied["bert.encoder.layer.0."] == [
        Mapping("attention.self.value", ("attention.output.dense",))
    ]


def test_a_stage_that_smooths_nothing_says_so(tiny_llama, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="hfcompress"):
        modifier = _smoothquant(tiny_llama, ignore=["re:.*"])
    assert not any(modifier.applied.values())
    assert "no mapping was smoothable in any block" in caplog.text


def test_bert_post_norm_is_rejected_and_value_to_output_kept(tiny_bert):
    modifier = _smoothquant(tiny_bert)
    found = modifier.applied["bert.encoder.layer.0."]
    # The post-attention LayerNorm's output is also the residual stream: not smoothable.
    assert found == [Mapping("attention.self.value", ("attention.output.dense",))]


@pytest.mark.parametrize("make", ["tiny_llama", "tiny_bert"])
def test_smoothing_leaves_the_float_model_unchanged(make, request):
    model = _with_outliers(request.getfixturevalue(make)) if make == "tiny_llama" else request.getfixturevalue(make)
    ids = torch.randint(1, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        _smoothquant(model, alpha_grid=(0.3, 0.5, 0.8))
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_smoothing_flattens_the_input_outliers(tiny_llama):
    _with_outliers(tiny_llama)
    q = tiny_llama.model.layers[0].self_attn.q_proj

    def spread():
        seen = {}
        handle = q.register_forward_pre_hook(lambda _m, a: seen.setdefault("x", a[0]))
        with torch.no_grad():
            tiny_llama(CALIB)
        handle.remove()
        channel = seen["x"].abs().amax(dim=(0, 1))
        return float(channel.max() / channel.median())

    before = spread()
    _smoothquant(tiny_llama)
    assert spread() < before / 4


@pytest.mark.parametrize("weights", ["rtn", "gptq"])
def test_smoothing_lowers_the_w8a8_error(weights, llama_ids):
    def error(smooth):
        model = _with_outliers(make_tiny_llama())
        with torch.no_grad():
            ref = model(llama_ids).logits
        stages = [SmoothQuantConfig()] if smooth else []
        weight = W8 if weights == "rtn" else GPTQConfig(bits=8, group_size=-1, symmetric=True, batch_size=4)
        stages += [weight, ActivationQuantConfig(strategy="tensor", dynamic=False)]
        compress(model, stages, calibration_data=CALIB, progress=False)
        with torch.no_grad():
            return float((model(llama_ids).logits - ref).norm() / ref.norm())

    assert error(smooth=True) < 0.5 * error(smooth=False)


def test_alpha_search_picks_from_the_grid_per_mapping(tiny_llama):
    modifier = _smoothquant(_with_outliers(tiny_llama), alpha_grid=(0.2, 0.6))
    assert len(modifier.alphas) == 2
    for prefix, alphas in modifier.alphas.items():
        assert set(alphas) == {m.source for m in modifier.applied[prefix]}
        assert set(alphas.values()) <= {0.2, 0.6}


def test_explicit_mapping_whose_shapes_disagree_is_refused(tiny_llama):
    config = SmoothQuantConfig(mappings=("input_layernorm -> mlp.down_proj",))
    with pytest.raises(RecipeError, match=r"shapes disagree: 'input_layernorm' gives 80 channels and 'mlp.down_proj'"):
        compress(tiny_llama, [config], calibration_data=CALIB, progress=False)


def test_explicit_mapping_that_is_not_an_identity_is_refused(tiny_bert):
    config = SmoothQuantConfig(mappings=("attention.output.LayerNorm -> intermediate.dense",))
    with pytest.raises(RecipeError, match=r"changes the output of block 'bert\.encoder\.layer\.0'"):
        compress(tiny_bert, [config, W8], calibration_data=torch.randint(1, 100, (4, 16)), progress=False)


def test_malformed_mapping_text_is_refused():
    with pytest.raises(RecipeError, match="mappings='input_layernorm' is invalid"):
        SmoothQuantConfig(mappings=("input_layernorm",))


def test_smoothquant_after_the_weight_stage_is_refused(tiny_llama):
    with pytest.raises(RecipeError, match="put it before the weight stages"):
        compress(tiny_llama, [W8, SmoothQuantConfig()], calibration_data=CALIB, progress=False)


@pytest.mark.parametrize("technique", ["smoothquant", "awq"])
def test_smoothing_a_model_compressed_by_an_earlier_call_is_refused(tiny_llama, llama_ids, technique):
    # it ran and smoothed nothing ("0 mappings"), recorded as a stage that had been applied
    compress(tiny_llama, [W8], progress=False)
    before = tiny_llama(llama_ids).logits
    config = SmoothQuantConfig() if technique == "smoothquant" else hfcompress.AWQConfig()
    with pytest.raises(RecipeError, match=r"already compressed by an earlier run: .* put it before the weight stages"):
        compress(tiny_llama, [config], calibration_data=CALIB, progress=False)
    assert torch.equal(tiny_llama(llama_ids).logits, before)
    assert len(tiny_llama.config.quantization_config.recipe["stages"]) == 1


@pytest.mark.parametrize("model_type", ["gemma", "gemma3_text"])
def test_gemma_norms_of_gain_one_plus_weight_are_smoothed(model_type, llama_ids):
    """Gemma's RMSNorms scale by 1 + weight: dividing the weight by s is not dividing the gain,
    so the exactness check used to drop every norm mapping of Gemma models, silently (and
    with them most of what SmoothQuant does)."""
    from hfcompress.norms import norm_offset

    def make():
        model = make_tiny_causal(model_type, head_dim=16)
        with torch.no_grad():
            for layer in model.model.layers:
                layer.input_layernorm.weight[[3, 40]] = 60.0
        return model

    model = make()
    assert norm_offset(model.model.layers[0].input_layernorm) == 1
    before = model(llama_ids).logits.detach()
    modifier = _smoothquant(model)
    sources = {m.source for m in modifier.applied["model.layers.0."]}
    assert "input_layernorm" in sources
    assert {"post_attention_layernorm", "pre_feedforward_layernorm"} & sources
    with torch.no_grad():
        torch.testing.assert_close(model(llama_ids).logits, before, rtol=1e-4, atol=1e-4)

    def error(smooth):
        model = make()
        stages = ([SmoothQuantConfig()] if smooth else []) + [
            W8,
            ActivationQuantConfig(strategy="tensor", dynamic=False),
        ]
        compress(model, stages, calibration_data=CALIB, progress=False)
        with torch.no_grad():
            return float((model(llama_ids).logits - before).norm() / before.norm())

    assert error(smooth=True) < 0.5 * error(smooth=False)
