"""Any architecture: blocks and layer groups are discovered, not tabulated.

Four model types beyond the override table (GPT-2 with its Conv1D projections and fused
c_attn, Phi-3 with fused qkv and gate/up projections, Mixtral's mixture of experts, OPT)
compress with RTN and GPTQ, reload with equal logits, and GPTQ beats RTN on every block.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    FalconConfig,
    FalconForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    MixtralConfig,
    MixtralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
)

import hfcompress
from hfcompress import GPTQConfig, QuantLinear, RTNConfig, compress
from hfcompress.architectures import ARCHITECTURES, blocks_of, find_blocks, sequential_groups
from hfcompress.layerwise import capture_block_inputs, run_block
from tests.conftest import make_tiny_bert, make_tiny_llama, make_tiny_llava

VOCAB = 128


def _gpt2():
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64))


def _phi3():
    config = Phi3Config(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return Phi3ForCausalLM(config)


def _mixtral():
    config = MixtralConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    return MixtralForCausalLM(config)


def _opt():
    config = OPTConfig(
        hidden_size=64,
        ffn_dim=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=VOCAB,
        word_embed_proj_dim=64,
        max_position_embeddings=64,
        pad_token_id=1,
    )
    return OPTForCausalLM(config)


MODELS = {"gpt2": _gpt2, "phi3": _phi3, "mixtral": _mixtral, "opt": _opt}
# Quantized linear layers per model: GPT-2 4 Conv1D per block; Phi-3 4 (qkv, o, gate_up,
# down); Mixtral q/k/v/o plus gate_up and down of 4 experts; OPT 6.
QUANTIZED = {"gpt2": 8, "phi3": 8, "mixtral": 24, "opt": 12}
CALIB = torch.randint(2, VOCAB, (16, 24), generator=torch.Generator().manual_seed(5))
HELD_OUT = torch.randint(2, VOCAB, (8, 24), generator=torch.Generator().manual_seed(6))


def _make(name: str):
    torch.manual_seed(0)
    return MODELS[name]().eval()


@pytest.mark.parametrize("name", MODELS, ids=list(MODELS))
@pytest.mark.parametrize("technique", ["rtn", "gptq"])
def test_compresses_and_reloads_with_equal_logits(name, technique, tmp_path):
    assert _make(name).config.model_type not in ARCHITECTURES
    model = _make(name)
    config = RTNConfig(bits=4, group_size=16) if technique == "rtn" else GPTQConfig(bits=4, group_size=16)
    compress(model, [config], calibration_data=CALIB, progress=False)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == QUANTIZED[name]
    expected = model(HELD_OUT).logits
    hfcompress.save_pretrained(model, tmp_path / name)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / name)
    assert sum(isinstance(m, QuantLinear) for m in reloaded.modules()) == QUANTIZED[name]
    assert torch.equal(reloaded(HELD_OUT).logits, expected)


def _block_errors(float_model, quantized, ids) -> list[float]:
    """MSE of each quantized block's output against the float block's, both fed the float
    model's inputs to that block."""
    _, float_blocks = blocks_of(float_model)
    _, q_blocks = blocks_of(quantized)
    inputs = capture_block_inputs(float_model, float_blocks[0], [{"input_ids": ids}], torch.device("cpu"))
    errors = []
    for fb, qb in zip(float_blocks, q_blocks, strict=True):
        item = inputs[0]
        with torch.no_grad():
            ref = fb(*item.args, **item.kwargs)
            out = qb(*item.args, **item.kwargs)
        ref, out = (t[0] if isinstance(t, tuple) else t for t in (ref, out))
        errors.append((out - ref).pow(2).mean().item())
        inputs[0] = item.with_hidden(ref)
    return errors


@pytest.mark.parametrize("name", MODELS, ids=list(MODELS))
def test_gptq_beats_rtn_on_every_block(name):
    reference = _make(name)
    rtn, gptq = copy.deepcopy(reference), copy.deepcopy(reference)
    compress(rtn, [RTNConfig(bits=3, group_size=16)], progress=False)
    compress(gptq, [GPTQConfig(bits=3, group_size=16)], calibration_data=CALIB, progress=False)
    rtn_errors = _block_errors(reference, rtn, HELD_OUT)
    gptq_errors = _block_errors(reference, gptq, HELD_OUT)
    assert all(g < r for g, r in zip(gptq_errors, rtn_errors, strict=True)), (gptq_errors, rtn_errors)


@pytest.mark.parametrize("make", [make_tiny_llama, make_tiny_bert], ids=["llama", "bert"])
def test_discovery_agrees_with_the_override_table(make):
    model = make()
    assert find_blocks(model) == blocks_of(model)


TABLE_GROUPS = {
    "llama": [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ],
    "bert": [
        ["attention.self.query", "attention.self.key", "attention.self.value"],
        ["attention.output.dense"],
        ["intermediate.dense"],
        ["output.dense"],
    ],
}


@pytest.mark.parametrize("make,kind", [(make_tiny_llama, "llama"), (make_tiny_bert, "bert")], ids=["llama", "bert"])
def test_traced_groups_are_the_layers_sharing_an_input(make, kind):
    model = make()
    _, blocks = blocks_of(model)
    ids = torch.randint(1, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    inputs = capture_block_inputs(model, blocks[0], [{"input_ids": ids}], torch.device("cpu"))
    names = [n for n, m in blocks[0].named_modules() if isinstance(m, torch.nn.Linear)]
    assert sequential_groups(blocks[0], names, lambda: run_block(blocks[0], inputs)) == TABLE_GROUPS[kind]


def test_true_sequential_runs_on_a_discovered_architecture():
    model = _make("phi3")
    compress(model, [GPTQConfig(bits=4, group_size=16, true_sequential=True)], calibration_data=CALIB, progress=False)
    assert isinstance(model.model.layers[1].self_attn.qkv_proj, QuantLinear)


@pytest.mark.parametrize("name", MODELS, ids=list(MODELS))
def test_block_sparse_attention_through_the_attention_interface(name, tmp_path):
    # Auto-discovered architectures take the block-sparse attention function as they are: the
    # first block's rows are unchanged, later rows change, and the reload is patched.
    model = _make(name)
    ids = torch.randint(2, VOCAB, (2, 64), generator=torch.Generator().manual_seed(7))
    dense = model(ids).logits
    compress(model, [hfcompress.BlockSparseConfig(layout="dynamic", density=0.4, block_size=16)], progress=False)
    sparse = model(ids).logits
    torch.testing.assert_close(sparse[:, :16], dense[:, :16], atol=1e-5, rtol=0)
    assert (sparse - dense).abs().max() > 1e-4
    hfcompress.save_pretrained(model, tmp_path / name)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / name)
    assert (reloaded(ids).logits - sparse).abs().max() <= 1e-5


def _falcon():
    config = FalconConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_kv_heads=2,
        new_decoder_architecture=True,
        vocab_size=VOCAB,
    )
    return FalconForCausalLM(config).eval()


@pytest.mark.parametrize("technique", ["rtn", "gptq"])
def test_falcons_linear_subclass_is_compressed(technique, tmp_path):
    # FalconLinear subclasses nn.Linear with a forward of its own that computes the same;
    # "Linear" (the default target) selected no layer of Falcon before.
    torch.manual_seed(0)
    model = _falcon()
    reference = model(HELD_OUT).logits
    config = RTNConfig(bits=8, group_size=-1) if technique == "rtn" else GPTQConfig(bits=8, group_size=-1)
    compress(model, [config], calibration_data=CALIB, progress=False)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 8  # qkv, dense, h_to_4h, 4h_to_h
    expected = model(HELD_OUT).logits
    assert (expected - reference).norm() < 0.05 * reference.norm()
    hfcompress.save_pretrained(model, tmp_path / "falcon")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "falcon")
    assert torch.equal(reloaded(HELD_OUT).logits, expected)


class _Doubled(torch.nn.Linear):  # a forward of its own that is not x W^T + b
    def forward(self, x):
        return 2 * super().forward(x)


class _Plain(torch.nn.Linear):  # nn.Linear's forward: linear-like
    pass


@pytest.mark.parametrize("targets", [["Linear"], ["re:.*"]], ids=["Linear", "everything"])
def test_a_linear_subclass_with_another_forward_is_never_compressed(targets):
    """An MoE router (Phi-MoE's, Llama 4's) subclasses nn.Linear but returns the top experts; a
    quantized layer in its place would compute something else, whatever the pattern."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(_Plain(32, 32), torch.nn.ReLU(), _Doubled(32, 32), torch.nn.Linear(32, 8))
    x = torch.randn(4, 32)
    reference = model(x)
    compress(model, [RTNConfig(bits=8, group_size=-1, targets=targets)], progress=False)
    assert [type(m).__name__ for m in model] == ["QuantLinear", "ReLU", "_Doubled", "QuantLinear"]
    assert (model(x) - reference).norm() < 0.02 * reference.norm()


def test_a_multimodal_model_compresses_its_language_model(tmp_path):
    """The blocks are the language model's, not the longer vision tower's (GPTQ failed: the
    text calibration data never reached the vision blocks), and "Linear" targets the language
    model and its head; the vision tower is compressed only when named."""
    from transformers import LlavaForConditionalGeneration

    model = make_tiny_llava()
    assert blocks_of(model)[0] == "model.language_model.layers"
    calibration = torch.randint(3, 140, (4, 24), generator=torch.Generator().manual_seed(0))
    compress(
        model, [GPTQConfig(bits=4, group_size=16, ignore=["lm_head"])], calibration_data=calibration, progress=False
    )
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 14 and all(n.startswith("model.language_model.layers.") for n in quantized)
    ids = torch.randint(3, 140, (1, 12), generator=torch.Generator().manual_seed(1))
    hfcompress.save_pretrained(model, tmp_path / "m")
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)

    named = make_tiny_llava()
    compress(named, [RTNConfig(bits=8, group_size=-1, targets=[r"re:model\.vision_tower\..*"])], progress=False)
    quantized = [n for n, m in named.named_modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 24 and all(n.startswith("model.vision_tower.") for n in quantized)


def test_block_sparse_attention_on_a_multimodal_model_leaves_the_vision_tower_dense():
    from hfcompress.techniques.block_sparse.attention import states

    model = make_tiny_llava()
    compress(model, [hfcompress.BlockSparseConfig(density=0.5, block_size=16, min_tokens=16)], progress=False)
    dense = {name: state.windowed for name, state in states(model).items()}
    assert dense == {
        **{f"model.vision_tower.encoder.layers.{i}.self_attn": True for i in range(4)},
        **{f"model.language_model.layers.{i}.self_attn": False for i in range(2)},
    }
    ids = torch.randint(3, 140, (1, 64), generator=torch.Generator().manual_seed(0))
    ids[0, 5:21] = 150  # the image's 16 patch tokens
    with torch.no_grad():
        model(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32))
    assert states(model)["model.language_model.layers.0.self_attn"].last_density < 1


def test_rotating_a_multimodal_model_is_refused_with_the_reason():
    with pytest.raises(hfcompress.RecipeError, match="image features enter the language model's residual stream"):
        compress(make_tiny_llava(), [hfcompress.RotationConfig()], progress=False)


def test_albert_s_shared_layer_is_refused_by_layerwise_stages_and_quantized_by_rtn(tmp_path):
    """ALBERT runs one layer num_hidden_layers times: no block per layer for GPTQ to walk, which
    the error says, pointing to RTN, which works on it (and reloads with equal logits)."""
    from transformers import AlbertConfig, AlbertForSequenceClassification

    config = AlbertConfig(vocab_size=VOCAB, embedding_size=32, hidden_size=64, intermediate_size=96,
                          num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    model = AlbertForSequenceClassification(config).eval()
    calib = torch.randint(0, VOCAB, (2, 16))
    with pytest.raises(hfcompress.RecipeError, match=r"runs its blocks more than once \(num_hidden_layers=3, but its"):
        compress(model, [GPTQConfig(bits=4, group_size=16)], calibration_data=calib, progress=False)
    compress(model, [RTNConfig(bits=4, group_size=16)], progress=False)
    assert isinstance(model.albert.encoder.albert_layer_groups[0].albert_layers[0].ffn, QuantLinear)
    ids = torch.randint(0, VOCAB, (2, 12))
    model.save_pretrained(tmp_path)
    reloaded = AlbertForSequenceClassification.from_pretrained(tmp_path)
    assert torch.equal(reloaded(ids).logits, model(ids).logits)
