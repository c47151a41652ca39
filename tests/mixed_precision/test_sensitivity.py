"""The Fisher diagonal and the per-candidate loss estimates."""

import pytest
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

from hfcompress.errors import ModelError
from hfcompress.mixed_precision import Choice
from hfcompress.mixed_precision.sensitivity import choice_losses, fisher_diagonal
from hfcompress.quant.affine import quantize_rtn
from tests.conftest import make_tiny_bert, make_tiny_llama

IDS = torch.randint(0, 100, (3, 16), generator=torch.Generator().manual_seed(2))


def _rtn(w, choice):
    return quantize_rtn(w, bits=choice.bits, group_size=choice.group_size, symmetric=False).dequantize()


def test_causal_lm_fisher_is_the_mean_squared_per_sequence_gradient():
    model = make_tiny_llama()
    name = "model.layers.1.mlp.down_proj"
    got = fisher_diagonal(model, [name], [{"input_ids": IDS[:2]}, {"input_ids": IDS[2:]}], samples=3)[name]
    expected = torch.zeros_like(got)
    for row in IDS:
        model.zero_grad()
        model(input_ids=row[None], labels=row[None]).loss.backward()
        expected += model.get_submodule(name).weight.grad.square() / 3
    torch.testing.assert_close(got, expected)


def test_conv1d_fisher_is_laid_out_like_its_weight_even_when_square():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=2, n_positions=32)).eval()
    names = ["transformer.h.0.attn.c_proj", "transformer.h.0.attn.c_attn"]  # [32, 32] (square) and [96, 32]
    got = fisher_diagonal(model, names, [{"input_ids": IDS[:1]}], samples=1)
    model.zero_grad()
    model(input_ids=IDS[:1], labels=IDS[:1]).loss.backward()
    for name in names:
        torch.testing.assert_close(got[name], model.get_submodule(name).weight.grad.t().square())


def test_gradients_are_left_as_they_were():
    model = make_tiny_llama()
    model.model.embed_tokens.weight.requires_grad_(False)
    fisher_diagonal(model, ["model.layers.0.self_attn.q_proj"], [{"input_ids": IDS}], samples=2)
    assert not model.model.embed_tokens.weight.requires_grad
    assert all(p.requires_grad and p.grad is None for n, p in model.named_parameters() if "embed" not in n)


@pytest.mark.parametrize(
    "build",
    [
        make_tiny_bert,
        lambda: BertModel(
            BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48)
        ).eval(),
    ],
    ids=["class-logits", "hidden-states"],
)
def test_models_without_a_language_model_loss(build):
    model = build()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "encoder" in n]
    fisher = fisher_diagonal(model, names, [{"input_ids": IDS}], samples=3)
    assert all(f.shape == model.get_submodule(n).weight.shape and f.sum() > 0 for n, f in fisher.items())
    again = fisher_diagonal(model, names, [{"input_ids": IDS}], samples=3)
    assert all(torch.equal(fisher[n], again[n]) for n in names)  # the drawn labels are seeded


def test_offloaded_weights_are_refused():
    with torch.device("meta"):
        model = make_tiny_llama()
    with pytest.raises(ModelError, match="offloaded"):
        fisher_diagonal(model, ["model.layers.0.mlp.up_proj"], [{"input_ids": IDS}], samples=1)


def test_choice_losses_weight_the_rounding_error_by_the_fisher():
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    choices = [Choice(2, 16), Choice(4, 16), Choice(8, -1)]
    plain = choice_losses(w, torch.ones_like(w), choices, _rtn)
    assert plain == pytest.approx([0.5 * float((w - _rtn(w, c)).square().sum()) for c in choices])
    assert plain[0] > plain[1] > plain[2]
    doubled = choice_losses(w, torch.full_like(w, 2.0), choices, _rtn)
    assert doubled == pytest.approx([2 * x for x in plain])
    masked = torch.zeros_like(w)
    masked[0] = 1  # only row 0 matters
    assert choice_losses(w, masked, choices[:1], _rtn)[0] == pytest.approx(
        0.5 * float((w - _rtn(w, choices[0]))[0].square().sum())
    )


def test_a_base_encoder_measures_its_pooler_too():
    # BertModel outputs the pooled vector beside the hidden states: the projection covers both,
    # so the pooler has a sensitivity (it had no gradient, and a size budget crashed).
    import hfcompress

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48
    )
    model = BertModel(config).eval()
    fisher = fisher_diagonal(model, ["pooler.dense", "encoder.layer.0.output.dense"], [{"input_ids": IDS}], samples=3)
    assert fisher["pooler.dense"].sum() > 0 and fisher["encoder.layer.0.output.dense"].sum() > 0
    budget = {"bits_per_weight": 4.5, "group_sizes": [16]}
    hfcompress.compress(model, [hfcompress.RTNConfig(budget=budget)], calibration_data=IDS, progress=False)
    assert isinstance(model.pooler.dense, hfcompress.QuantLinear)


def test_a_float16_models_fisher_is_the_float32_ones():
    """A float16 model's loss is scaled up for the backward pass (its gradients would fall below
    float16's range on a real model) and the gradients divided back in float32."""
    model = make_tiny_llama()
    names = ["model.layers.1.mlp.down_proj", "model.layers.0.self_attn.q_proj"]
    batches = [{"input_ids": IDS}]
    expected = fisher_diagonal(model, names, batches, samples=3)
    got = fisher_diagonal(model.half(), names, batches, samples=3)
    for name in names:
        assert got[name].dtype == torch.float32
        assert (got[name] == 0).float().mean() < 0.01
        assert ((got[name] - expected[name]).norm() / expected[name].norm()) < 0.05
