"""Layer mappings and layer dropping on tiny BERT and Llama models."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import hfcompress
from hfcompress.techniques.pkd.mapping import LAYER_MAP_KEY, drop_layers, layer_map
from tests.conftest import make_tiny_bert, make_tiny_causal, make_tiny_llama


@pytest.mark.parametrize(
    ("n", "strategy", "k", "expected"),
    [
        (6, "skip", 3, (1, 3, 5)),
        (12, "skip", 6, (1, 3, 5, 7, 9, 11)),
        (6, "last", 3, (3, 4, 5)),
        (12, "skip", 5, (2, 4, 7, 9, 11)),
        (6, "skip", 4, (1, 2, 4, 5)),
        (30, "skip", 8, (3, 7, 11, 14, 18, 22, 26, 29)),
        (4, "last", 1, (3,)),
    ],
    ids=["6-skip-3", "12-skip-6", "6-last-3", "12-skip-5", "6-skip-4", "30-skip-8", "4-last-1"],
)
def test_pkd_strategies(n, strategy, k, expected):
    assert layer_map(n, strategy, num_student_layers=k) == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(strategy="explicit", layers=(0, 6)), r"layers \[6\] do not exist in the teacher, which has layers 0..5"),
        (dict(strategy="explicit", layers=(3, 1)), "strictly increasing"),
        (dict(strategy="explicit", layers=tuple(range(6))), "keeps all 6 teacher layers"),
        (dict(strategy="skip", num_student_layers=8), "a student of 8 layers from a teacher of 6"),
        (dict(strategy="last", num_student_layers=6), "a student of 6 layers from a teacher of 6"),
        (dict(strategy="explicit"), "needs `layers`"),
        (dict(strategy="explicit", layers=3), r"layers=3 must be a list of teacher layer indices"),
        (dict(strategy="explicit", layers="1,3"), r"layers='1,3' must be a list"),
    ],
    ids=["missing-layer", "unordered", "all-layers", "more-layers", "as-many-layers", "explicit-empty", "int", "str"],
)
def test_bad_mappings_are_refused(kwargs, message):
    with pytest.raises(hfcompress.RecipeError, match=message):
        layer_map(6, **kwargs)


def _run_kept_blocks_by_hand(teacher, keep, ids):
    """The student's last hidden state computed from the teacher's own modules (no padding,
    so no attention mask is needed)."""
    h = teacher.bert.embeddings(input_ids=ids)
    for i in keep:
        out = teacher.bert.encoder.layer[i](h)
        h = out[0] if isinstance(out, tuple) else out
    return h


def test_bert_student_is_the_teacher_minus_layers(tmp_path):
    teacher = make_tiny_bert(0, layers=4)
    ids = torch.randint(1, 100, (2, 7))
    student = drop_layers(teacher, (1, 3), copy_model=True)
    assert len(teacher.bert.encoder.layer) == 4  # copy_model left the teacher whole
    assert student.config.num_hidden_layers == 2
    assert getattr(student.config, LAYER_MAP_KEY) == {"teacher_layers": [1, 3], "num_teacher_layers": 4}
    with torch.no_grad():
        by_hand = _run_kept_blocks_by_hand(teacher, (1, 3), ids)
        assert torch.allclose(student(ids, output_hidden_states=True).hidden_states[-1], by_hand, atol=1e-6)
    student.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert getattr(reloaded.config, LAYER_MAP_KEY)["teacher_layers"] == [1, 3]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, student(ids).logits)


def test_llama_student_decodes_with_its_kv_cache(tmp_path):
    teacher = make_tiny_llama(0, layers=4)
    student = drop_layers(teacher, (0, 2), copy_model=True)
    assert [b.self_attn.layer_idx for b in student.model.layers] == [0, 1]
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        cached = student.generate(ids, max_new_tokens=5, do_sample=False)
        uncached = student.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    student.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 2
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, student(ids).logits)


def test_student_of_a_student_records_the_original_teacher_layers():
    student = drop_layers(make_tiny_bert(0, layers=4), (1, 2, 3))
    drop_layers(student, (0, 2))
    assert getattr(student.config, LAYER_MAP_KEY) == {"teacher_layers": [1, 3], "num_teacher_layers": 4}


def test_model_without_repeated_blocks_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(hfcompress.ModelError, match="cannot find the repeated transformer blocks of Sequential"):
        drop_layers(model, (0,))


def _modernbert():
    from transformers import ModernBertConfig, ModernBertForSequenceClassification

    config = ModernBertConfig(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=64,
        num_labels=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        cls_token_id=1,
        sep_token_id=2,
    )
    torch.manual_seed(0)
    return ModernBertForSequenceClassification(config).eval()


def test_a_student_whose_first_block_would_reload_differently_is_refused(tmp_path):
    """ModernBERT builds block 0 without an attention norm: a student whose first block is
    teacher block 1 would drop that norm's weights on reload (a different model, silently)."""
    model = _modernbert()
    with pytest.raises(hfcompress.ModelError, match=r"builds its block 0 unlike block 1, .*attn_norm"):
        hfcompress.drop_layers(model, (1, 3))
    assert model.config.num_hidden_layers == 4 and len(model.model.layers) == 4  # untouched
    with torch.no_grad():  # a norm that is not the identity, so that losing it shows
        model.model.layers[3].attn_norm.weight.mul_(3)
    student = hfcompress.drop_layers(model, (0, 3))
    hfcompress.save_pretrained(student, tmp_path / "s")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "s")
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, student(ids).logits)


def _reloads_the_same(student, tmp_path) -> AutoModelForCausalLM:
    hfcompress.save_pretrained(student, tmp_path / "s")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, student(ids).logits)
    return reloaded


def test_the_dense_blocks_of_a_qwen_moe_follow_the_kept_layers(tmp_path):
    """Qwen-MoE lists its dense blocks by index (``mlp_only_layers``): the student lists the
    kept ones at their new indices, so teacher block 1 (dense) can open the student. A sparse
    block the student's ``decoder_sparse_step`` cannot place is refused."""
    experts = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)
    model = make_tiny_causal("qwen2_moe", mlp_only_layers=[1], **experts)
    student = drop_layers(model, (1, 3), copy_model=True)
    assert student.config.mlp_only_layers == [0]
    reloaded = _reloads_the_same(student, tmp_path)
    assert type(reloaded.model.layers[0].mlp).__name__ == "Qwen2MoeMLP"
    assert type(reloaded.model.layers[1].mlp).__name__ == "Qwen2MoeSparseMoeBlock"

    stepped = make_tiny_causal("qwen2_moe", decoder_sparse_step=2, **experts)  # blocks 1 and 3 sparse
    with pytest.raises(hfcompress.ModelError, match=r"builds its block 0 unlike block 1"):
        drop_layers(stepped, (1, 3))
    assert drop_layers(stepped, (0, 3), copy_model=True).config.mlp_only_layers == [0]


def test_llama4_per_block_fields_follow_the_kept_layers(tmp_path):
    """Llama 4 keeps which blocks skip RoPE (``no_rope_layers``, one entry per block) and which
    are MoE (``moe_layers``, indices): both must describe the kept blocks, or the reloaded student
    applies RoPE where the teacher did not, silently."""
    model = make_tiny_causal(
        "llama4_text",
        head_dim=16,
        num_local_experts=4,
        interleave_moe_layer_step=2,
        intermediate_size_mlp=96,
        no_rope_layers=[1, 1, 1, 0],
    )
    assert model.config.moe_layers == [1, 3]
    student = drop_layers(model, (1, 3), copy_model=True)
    assert student.config.no_rope_layers == [1, 0] and student.config.moe_layers == [0, 1]
    _reloads_the_same(student, tmp_path)
