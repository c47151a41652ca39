"""The ``embeddings`` stage: quantized token embeddings, stored once with a tied LM head."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import hfcompress
from hfcompress import EmbeddingQuantConfig, ModelError, Recipe, RecipeError, RTNConfig
from hfcompress.eval.size import linear_layer_stats, size_report, total_bytes
from hfcompress.quant.affine import dequantize, quantize_rtn
from hfcompress.quant.embedding import QuantEmbedding, TiedQuantEmbedding
from hfcompress.quant.linear import QuantLinear
from tests.conftest import make_tiny_bert, make_tiny_causal, make_tiny_llama

IDS = torch.tensor([[3, 0, 127, 5, 5, 64, 1], [9, 8, 7, 6, 5, 4, 3]])


def _compress(model, *stages):
    return hfcompress.compress(model, Recipe(list(stages)), progress=False)


def _float_with_table(model: nn.Module, table: torch.Tensor) -> nn.Module:
    """A copy of the float ``model`` whose (tied) embedding matrix is ``table``."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.get_input_embeddings().weight.copy_(table)
    return ref


def test_tied_head_and_embedding_share_one_packed_table():
    model = make_tiny_llama(tie=True)
    weight = model.model.embed_tokens.weight.detach().clone()
    expected = dequantize(*_rtn_parts(weight, bits=8, group_size=-1), group_size=80)
    reference = _float_with_table(model, expected)
    before = total_bytes(model)

    _compress(model, EmbeddingQuantConfig())

    embedding, head = model.model.embed_tokens, model.lm_head
    assert isinstance(embedding, TiedQuantEmbedding) and isinstance(head, QuantLinear)
    assert embedding.source is head and embedding.tied_to == "lm_head"
    assert not model.config.tie_word_embeddings  # the head's tensors are its own; the embedding reads them
    assert torch.equal(embedding(IDS), expected[IDS])
    assert torch.equal(head.dequantize(), expected)
    # The whole model computes as the float one with the quantized table in both places.
    torch.testing.assert_close(model(IDS).logits, reference(IDS).logits, rtol=1e-5, atol=1e-5)
    # Stored once: 128 x 80 codes of one byte and 128 float16 scales, where the float table was 4 bytes a weight.
    assert before - total_bytes(model) == 128 * 80 * 4 - (128 * 80 + 128 * 2)


def _rtn_parts(weight, *, bits, group_size, symmetric=True):
    qw = quantize_rtn(weight, bits=bits, group_size=group_size, symmetric=symmetric)
    zeros = qw.zeros if not symmetric else torch.full_like(qw.scales, 2 ** (bits - 1), dtype=torch.uint8)
    return qw.q, qw.scales, zeros


@pytest.mark.parametrize("tie", [True, False])
def test_reload_gives_the_same_model(tie, tmp_path):
    model = make_tiny_llama(tie=tie)
    _compress(model, RTNConfig(bits=4, group_size=16), EmbeddingQuantConfig(bits=4, group_size=16, symmetric=False))
    hfcompress.save_pretrained(model, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    embedding = reloaded.model.embed_tokens
    if tie:
        assert isinstance(embedding, TiedQuantEmbedding) and embedding.source is reloaded.lm_head
    else:
        assert isinstance(embedding, QuantEmbedding) and type(reloaded.lm_head) is nn.Linear
    assert torch.equal(reloaded(IDS).logits, model(IDS).logits)
    model.generation_config.pad_token_id = reloaded.generation_config.pad_token_id = 0
    kwargs = dict(max_new_tokens=4, do_sample=False)
    assert torch.equal(reloaded.generate(IDS, **kwargs), model.generate(IDS, **kwargs))


def test_untied_embedding_rows_match_its_table_at_every_grid():
    model = make_tiny_llama(tie=False)
    weight = model.model.embed_tokens.weight.detach().clone()
    _compress(model, EmbeddingQuantConfig(bits=3, group_size=32, symmetric=False, zero_point="float"))
    embedding = model.model.embed_tokens
    assert isinstance(embedding, QuantEmbedding) and embedding.group_size == 32  # 80 = 32 + 32 + a partial 16
    table = embedding.dequantize()
    assert torch.equal(embedding(IDS), table[IDS])
    assert (table - weight).abs().max() < 0.5 * (weight.max() - weight.min()) / 7  # on a 3-bit grid of each group
    assert type(model.lm_head) is nn.Linear


def test_scaled_embedding_keeps_its_scale(tmp_path):
    model = make_tiny_causal("gemma3_text", head_dim=16, tie_word_embeddings=True)
    scale = float(model.model.embed_tokens.embed_scale)
    _compress(model, EmbeddingQuantConfig())
    embedding = model.model.embed_tokens
    assert embedding.embed_scale == scale
    assert torch.equal(embedding(IDS), model.lm_head.dequantize()[IDS] * scale)
    hfcompress.save_pretrained(model, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(reloaded(IDS).logits, model(IDS).logits)


def test_bert_word_embeddings_reload_with_their_position_ids(tmp_path):
    # Loading must not mark BERT's embeddings module initialised: its init sets the position ids.
    model = make_tiny_bert()
    ids = IDS % 100
    _compress(model, EmbeddingQuantConfig())
    assert isinstance(model.bert.embeddings.word_embeddings, QuantEmbedding)
    hfcompress.save_pretrained(model, tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_dequantize_ties_the_float_head_and_embedding_again():
    model = make_tiny_llama(tie=True)
    _compress(model, EmbeddingQuantConfig(bits=4, group_size=16))
    logits = model(IDS).logits
    model.dequantize()
    assert type(model.model.embed_tokens) is nn.Embedding
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.config.tie_word_embeddings
    torch.testing.assert_close(model(IDS).logits, logits, rtol=1e-5, atol=1e-5)


def test_copies_and_pickles_keep_the_tie():
    model = make_tiny_llama(tie=True)
    _compress(model, EmbeddingQuantConfig())
    copied = copy.deepcopy(model)
    assert copied.model.embed_tokens.source is copied.lm_head
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.model.embed_tokens.source is loaded.lm_head
    assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_cast_follows_the_model_dtype():
    model = make_tiny_llama(tie=True)
    _compress(model, EmbeddingQuantConfig())
    model.to(torch.bfloat16)
    out = model.model.embed_tokens(IDS)
    assert out.dtype == torch.bfloat16
    assert model.lm_head.qweight.dtype == torch.uint8


def test_a_head_quantized_earlier_leaves_the_embedding_its_own_table():
    model = make_tiny_llama(tie=True)
    head_w8 = RTNConfig(bits=8, group_size=-1, symmetric=True, targets=("lm_head",), ignore=())
    _compress(model, head_w8, EmbeddingQuantConfig(bits=4, group_size=16))
    assert isinstance(model.model.embed_tokens, QuantEmbedding) and model.lm_head.bits == 8


def test_a_later_stage_leaves_the_shared_head_alone():
    model = make_tiny_llama(tie=True)
    _compress(model, EmbeddingQuantConfig(), RTNConfig(bits=4, group_size=16, ignore=()))
    assert model.lm_head.bits == 8 and model.model.embed_tokens.source is model.lm_head
    assert model.model.layers[0].mlp.down_proj.bits == 4


def test_size_report_counts_the_table_against_the_float_embedding():
    model = make_tiny_llama(tie=False)
    stats = linear_layer_stats(model)
    assert stats["model.embed_tokens"] == (128 * 80, 128 * 80 * 4)
    _compress(model, EmbeddingQuantConfig())
    before = size_report(model, ["model.embed_tokens"], stats=stats)
    after = size_report(model, ["model.embed_tokens"])
    assert before.bits_per_weight == 32
    assert after.bits_per_weight == pytest.approx(8 + 16 / 80)  # a float16 scale per row of 80


def test_errors_name_the_problem():
    model = make_tiny_llama(tie=True)
    with pytest.raises(RecipeError, match="group_size=128 exceeds the embedding dimension 80"):
        _compress(model, EmbeddingQuantConfig(group_size=128))
    with pytest.raises(RecipeError, match="zero_point"):
        EmbeddingQuantConfig(zero_point="float")
    with pytest.raises(RecipeError, match="bits=5"):
        EmbeddingQuantConfig(bits=5)
    _compress(model, EmbeddingQuantConfig())
    with pytest.raises(RecipeError, match="compressed already"):
        _compress(model, EmbeddingQuantConfig())
    with pytest.raises(ModelError, match=r"the token embedding \(TiedQuantEmbedding\) holds packed integers"):
        model.resize_token_embeddings(140)


def test_an_embedding_with_a_forward_of_its_own_is_refused():
    class Shifted(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) + 1

    model = make_tiny_llama(tie=False)
    model.model.embed_tokens = Shifted(128, 80)
    with pytest.raises(RecipeError, match="Shifted has a forward of its own"):
        _compress(model, EmbeddingQuantConfig())
    assert type(model.model.embed_tokens) is Shifted


def test_nan_weights_are_refused():
    model = make_tiny_llama(tie=False)
    with torch.no_grad():
        model.model.embed_tokens.weight[3, 4] = float("nan")
    with pytest.raises(RecipeError, match="NaN"):
        _compress(model, EmbeddingQuantConfig())


def test_recipe_file_runs(tmp_path):
    model = make_tiny_llama(tie=True, hidden_size=128, intermediate_size=128)
    hfcompress.compress(model, "recipes/smollm2_w4a16_rtn_g128_emb8.yaml", progress=False)
    assert isinstance(model.model.embed_tokens, TiedQuantEmbedding) and model.lm_head.bits == 8
    assert model.model.layers[0].self_attn.q_proj.bits == 4


@pytest.mark.parametrize("tie", [True, False])
def test_rotation_after_the_embeddings_stage_is_refused_before_anything_changes(tie):
    model = make_tiny_llama(tie=tie)
    before = model.model.embed_tokens.weight.detach().clone()
    with pytest.raises(RecipeError, match="put the rotate stage before"):
        _compress(model, EmbeddingQuantConfig(), hfcompress.RotationConfig())
    assert torch.equal(model.model.embed_tokens.weight, before)


def test_rotation_before_the_embeddings_stage_keeps_the_table_shared():
    model = make_tiny_llama(tie=True)
    reference = model(IDS).logits
    _compress(model, hfcompress.RotationConfig(), EmbeddingQuantConfig())
    assert model.model.embed_tokens.source is model.lm_head
    assert (model(IDS).logits - reference).norm() / reference.norm() < 0.05


def test_modernbert_reloads_although_its_embeddings_init_reaches_into_the_table(tmp_path):
    # ModernBERT's init of its embeddings module writes into tok_embeddings.weight: loading
    # gives the quantized table a stand-in for those writes, gone once the load is done.
    from transformers import AutoConfig

    config = AutoConfig.for_model(
        "modernbert", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, pad_token_id=1, bos_token_id=2, eos_token_id=3,
        cls_token_id=2, sep_token_id=3, num_labels=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    ids = IDS % 100 + 5
    _compress(model, EmbeddingQuantConfig())
    hfcompress.save_pretrained(model, tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    embedding = reloaded.get_input_embeddings()
    assert isinstance(embedding, QuantEmbedding) and "weight" not in embedding.__dict__
    assert torch.equal(reloaded(ids).logits, model(ids).logits)
    with pytest.raises(ModelError, match="cannot be resized; resize the float model's embeddings before"):
        reloaded.resize_token_embeddings(140)


def test_an_offloaded_tied_pair_is_still_stored_once(tmp_path):
    # accelerate's disk offload keeps tied weights as two meta tensors: the config says they
    # are one matrix, and the stage shares it as in memory.
    from accelerate import dispatch_model

    reference = make_tiny_llama(tie=True)
    _compress(reference, EmbeddingQuantConfig())
    model = make_tiny_llama(tie=True)
    device_map = {"model.embed_tokens": "disk", "model.layers": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu",
                  "lm_head": "disk"}  # fmt: skip
    model = dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path / "offload"))
    _compress(model, EmbeddingQuantConfig())
    assert isinstance(model.model.embed_tokens, TiedQuantEmbedding) and model.model.embed_tokens.source is model.lm_head
    assert torch.equal(model(IDS).logits, reference(IDS).logits)


def test_resizing_a_model_with_a_packed_lm_head_changes_nothing():
    # transformers resized the float embedding to 140 rows, then failed on the packed head with
    # "'QuantLinear' object has no attribute 'weight'": embedding and head no longer agreed.
    model = make_tiny_llama(tie=False)
    head = {"name": "head", "technique": "rtn", "bits": 8, "group_size": -1, "targets": ["lm_head"], "ignore": []}
    hfcompress.compress(model, [RTNConfig(bits=4, group_size=16), head], progress=False)
    with pytest.raises(ModelError, match=r"the LM head \(QuantLinear\) holds packed integers, which cannot be resized"):
        model.resize_token_embeddings(140)
    assert model.get_input_embeddings().weight.shape[0] == model.config.vocab_size == 128
