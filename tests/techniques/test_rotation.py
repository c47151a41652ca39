"""The rotate stage: Hadamard transforms, exactness on Llama-family models, save and reload,
the online down-projection transform under later stages, and errors."""

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

import hfcompress
from hfcompress import ActivationQuantConfig, GPTQConfig, QuantLinear, RecipeError, RTNConfig, compress
from hfcompress.techniques.rotation import RotatedRMSNorm, RotationConfig
from hfcompress.techniques.rotation.hadamard import block_hadamard, ffn_block_size, hadamard_matrix, random_orthogonal
from tests.conftest import make_tiny_causal, make_tiny_llama

CALIB = torch.randint(0, 128, (8, 24), generator=torch.Generator().manual_seed(3))
W8 = RTNConfig(bits=8, group_size=-1, symmetric=True)


def _with_outliers(model):
    """A few huge channels in the norms' outputs, as trained LLMs have (SmolLM2's are 100x)."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[5] = 100.0  # a gain of 100 (101 where norms scale by 1 + weight)
            layer.post_attention_layernorm.weight[7] = 100.0
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("block", [1, 2, 8, 32, 512])
def test_block_hadamard_is_the_block_diagonal_matmul_and_its_own_inverse(block):
    x = torch.randn(2, 3, 3 * block, dtype=torch.float64)
    h = torch.block_diag(*[hadamard_matrix(block, dtype=torch.float64)] * 3)
    torch.testing.assert_close(block_hadamard(x, block), x @ h)
    torch.testing.assert_close(block_hadamard(block_hadamard(x, block), block), x)
    assert torch.allclose(h @ h.t(), torch.eye(3 * block, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("block", [16, 32, 512, 2048])
def test_cpu_hadamard_kernel_is_the_block_diagonal_matmul(block, dtype):
    # hadamard_cpu.c (the fast Walsh-Hadamard transform) serves float32 and bfloat16 on CPU for
    # blocks of 16 or more: float32 sums, one rounding of the output.
    from hfcompress.techniques.rotation import hadamard

    if hadamard._native_library() is None:
        pytest.skip("no C compiler: the matmul path serves")
    wide = torch.randn(2, 7, 3 * block + 5, dtype=torch.float64)
    x64 = wide[..., 5:]  # a strided view: rows not contiguous in memory
    x = x64.to(dtype)
    y = hadamard._native_block_hadamard(x, block)
    assert y is not None and y.dtype == dtype and y.shape == x.shape
    h = torch.block_diag(*[hadamard_matrix(block, dtype=torch.float64)] * 3)
    exact = x.double() @ h
    tol = 1e-6 if dtype == torch.float32 else 2**-8  # float32 sums; bfloat16: one output rounding
    assert ((y.double() - exact).norm() / exact.norm()).item() < tol
    assert torch.equal(block_hadamard(x, block), y)
    # Where it does not apply, the matmul path runs: a block not a power of two is refused there.
    assert hadamard._native_block_hadamard(x, 3 * block // 2) is None
    with pytest.raises(ValueError, match="power-of-two order"):
        block_hadamard(torch.randn(2, 96), 48)
    needs_grad = x.float().requires_grad_()
    assert hadamard._native_block_hadamard(needs_grad, block) is None
    block_hadamard(needs_grad, block).sum().backward()  # the matmul path keeps autograd
    assert needs_grad.grad is not None


def test_transform_sizes_and_bad_sizes():
    assert [ffn_block_size(n) for n in (1536, 11008, 14336, 96)] == [512, 256, 2048, 32]
    with pytest.raises(ValueError, match="not a multiple of the Hadamard block 64"):
        block_hadamard(torch.randn(4, 96), 64)
    with pytest.raises(ValueError, match="power-of-two order, not 12"):
        hadamard_matrix(12)
    q = random_orthogonal(80, seed=1)
    assert torch.allclose(q @ q.t(), torch.eye(80, dtype=torch.float64))
    assert torch.equal(q, random_orthogonal(80, seed=1)) and not torch.equal(q, random_orthogonal(80, seed=2))


def _tiny_qwen2():
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # Qwen2's q/k/v biases start at zero: make them count
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_()
    return model


MODELS = {
    "llama-tied-head20": lambda: make_tiny_llama(),
    "llama-untied-head16": lambda: make_tiny_llama(tie=False, hidden_size=64),
    "qwen2-biases": _tiny_qwen2,
    # scalar multipliers on the embeddings, the residual branches, attention and the logits
    "granite": lambda: make_tiny_causal(
        "granite", embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.1, logits_scaling=4.0
    ),
    # norms that scale by 1 + weight, and a scaled embedding
    "gemma": lambda: make_tiny_causal("gemma", head_dim=16),
    # fused q/k/v and gate/up layers (Phi-3, Phi-4), a partial rotary embedding
    "phi3-fused": lambda: make_tiny_causal("phi3", pad_token_id=0, partial_rotary_factor=0.5),
}


@pytest.mark.parametrize("make", MODELS, ids=list(MODELS))
def test_rotation_keeps_the_function_and_spreads_the_outliers(make, llama_ids):
    model = _with_outliers(MODELS[make]())
    before = _logits(model, llama_ids)
    seen = {}
    norm = model.model.layers[1].input_layernorm  # what the q/k/v projections read
    handle = norm.register_forward_hook(lambda _m, _a, out: seen.setdefault("b", out))
    _logits(model, llama_ids)
    handle.remove()
    compress(model, [RotationConfig()], progress=False)
    torch.testing.assert_close(_logits(model, llama_ids), before, rtol=1e-4, atol=1e-4)
    assert isinstance(model.model.norm, RotatedRMSNorm)
    tied = model.config.tie_word_embeddings
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    handle = norm.register_forward_hook(lambda _m, _a, out: seen.setdefault("a", out))
    _logits(model, llama_ids)
    handle.remove()

    def peak(x):  # largest channel over the median channel
        channel = x.abs().amax(dim=(0, 1))
        return float(channel.max() / channel.median())

    assert peak(seen["a"]) < peak(seen["b"]) / 2


def test_bf16_model_rotates_within_its_precision(llama_ids):
    model = make_tiny_llama(hidden_size=64).to(torch.bfloat16)
    before = _logits(model, llama_ids).float()
    compress(model, [RotationConfig()], progress=False)
    after = _logits(model, llama_ids).float()
    assert float((after - before).norm() / before.norm()) < 3e-2


def test_rotation_lowers_the_w8a8_error(llama_ids):
    def error(rotate):
        model = _with_outliers(make_tiny_llama(hidden_size=64))
        ref = _logits(model, llama_ids)
        stages = ([RotationConfig()] if rotate else []) + [W8, ActivationQuantConfig()]
        compress(model, stages, progress=False)
        return float((_logits(model, llama_ids) - ref).norm() / ref.norm())

    assert error(rotate=True) < 0.5 * error(rotate=False)


def test_later_stages_see_the_rotated_down_projection_input(llama_ids):
    """A hook a later stage puts on the down projection (GPTQ's Hessian, an observer) sees the
    input the rotated weight is paired with, even on the QuantLinear that replaced it."""
    model = make_tiny_llama(hidden_size=64)
    compress(model, [RotationConfig(), W8], progress=False)
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp.down_proj, QuantLinear)
    seen = {}
    mlp.down_proj.register_forward_pre_hook(lambda _m, a: seen.setdefault("x", a[0]))  # before the MLP ever ran
    _logits(model, llama_ids)
    gate_in = {}
    mlp.gate_proj.register_forward_pre_hook(lambda _m, a: gate_in.setdefault("x", a[0]))
    _logits(model, llama_ids)
    with torch.no_grad():
        product = mlp.act_fn(mlp.gate_proj(gate_in["x"])) * mlp.up_proj(gate_in["x"])
    torch.testing.assert_close(seen["x"], block_hadamard(product, 32))


@pytest.mark.parametrize(
    "stages",
    [
        [RotationConfig(), W8, ActivationQuantConfig()],
        [RotationConfig(), GPTQConfig(bits=4, group_size=32, batch_size=4), ActivationQuantConfig()],
        [RotationConfig(ffn=False, heads=False), W8, ActivationQuantConfig(strategy="tensor", dynamic=False)],
    ],
    ids=["w8a8-dynamic", "gptq-w4a8", "static-no-online"],
)
def test_rotated_models_reload_with_the_same_logits(llama_ids, tmp_path, stages):
    model = make_tiny_llama()
    compress(model, stages, calibration_data=CALIB, progress=False)
    expected = _logits(model, llama_ids)
    hfcompress.save_pretrained(model, tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert isinstance(reloaded.model.norm, RotatedRMSNorm)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert torch.equal(_logits(reloaded, llama_ids), expected)


@pytest.mark.parametrize("make", ["gemma", "phi3-fused"])
def test_rotated_gemma_and_phi3_reload_with_the_same_logits(make, llama_ids, tmp_path):
    model = MODELS[make]()
    stages = [RotationConfig(), GPTQConfig(bits=4, group_size=32, batch_size=4), ActivationQuantConfig()]
    compress(model, stages, calibration_data=CALIB, progress=False)
    expected = _logits(model, llama_ids)
    hfcompress.save_pretrained(model, tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert isinstance(reloaded.model.norm, RotatedRMSNorm)
    assert torch.equal(_logits(reloaded, llama_ids), expected)


def test_rotating_after_a_weight_stage_is_refused(tiny_llama):
    with pytest.raises(RecipeError, match=r"layers\.0\.self_attn\.q_proj is compressed by stage 'stage_0'.*before"):
        compress(tiny_llama, [W8, RotationConfig()], progress=False)
    assert not isinstance(tiny_llama.model.norm, RotatedRMSNorm)  # refused before anything changed


def test_rotating_twice_is_refused(tiny_llama):
    with pytest.raises(RecipeError, match="rotated already"):
        compress(tiny_llama, [RotationConfig(), RotationConfig()], progress=False)
    compress(tiny_llama, [RotationConfig()], progress=False)
    with pytest.raises(RecipeError, match=r"rotated already \(by an earlier run"):
        compress(tiny_llama, [RotationConfig()], progress=False)


def test_post_norm_encoders_are_refused(tiny_bert):
    with pytest.raises(RecipeError, match=r"not model_type 'bert'.*smoothquant instead"):
        compress(tiny_bert, [RotationConfig()], progress=False)


def test_bad_seed_is_refused():
    with pytest.raises(RecipeError, match="seed=-1 is invalid"):
        RotationConfig(seed=-1)


def test_a_sequence_classifier_keeps_its_function(llama_ids, tmp_path):
    """A decoder with a classification head (no LM head): the final norm gives its output back
    unrotated, so the `score` head reads what it was trained on. Before, the stage broke the
    model (logits off by 390%) and then refused it."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.for_model(
        "llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_labels=3, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = _with_outliers(AutoModelForSequenceClassification.from_config(config).eval())
    before = _logits(model, llama_ids)
    compress(model, [RotationConfig()], progress=False)
    torch.testing.assert_close(_logits(model, llama_ids), before, rtol=1e-4, atol=1e-4)
    hfcompress.save_pretrained(model, tmp_path / "m")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m")
    assert torch.equal(_logits(reloaded, llama_ids), _logits(model, llama_ids))


LLAMA_LIKE = {
    "smollm3": dict(pad_token_id=0),  # NoPE layers
    "ernie4_5": {},
    "seed_oss": dict(head_dim=16),  # q/k/v/o biases
    "helium": dict(head_dim=16),
    "arcee": {},  # an MLP without a gate (ReLU^2): up -> down
    "apertus": {},  # the same, and norms named attention_layernorm / feedforward_layernorm
}


MOES = {
    "mixtral": dict(num_local_experts=4),
    # a shared expert and its gate beside the routed ones
    "qwen2_moe": dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32
    ),
}


@pytest.mark.parametrize("model_type", [*LLAMA_LIKE, *MOES])
def test_more_decoders_rotate_exactly_and_reload(model_type, tmp_path):
    """Each added model type keeps its logits (1e-4) with norm gains that are not all 1, then
    quantizes and reloads. In the mixtures of experts the router, the fused experts' gate/up and
    down tensors (and a shared expert and its gate) rotate with the residual stream, and the
    experts then split and quantize (GPTQ W4A8)."""
    model = make_tiny_causal(model_type, **{**LLAMA_LIKE, **MOES}[model_type])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.3)
    ids = torch.randint(3, 100, (2, 24), generator=torch.Generator().manual_seed(1))
    before = _logits(model, ids)
    compress(model, [RotationConfig()], progress=False)
    torch.testing.assert_close(_logits(model, ids), before, rtol=1e-4, atol=1e-4)
    weights = GPTQConfig(bits=4, group_size=16, batch_size=4) if model_type in MOES else W8
    compress(model, [weights, ActivationQuantConfig()], calibration_data=CALIB, progress=False)
    hfcompress.save_pretrained(model, tmp_path / "m")
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "m"), ids), _logits(model, ids))


def test_a_base_decoder_without_a_head_rotates_to_the_same_hidden_states(tmp_path):
    from transformers import AutoModel

    model = make_tiny_llama().model  # LlamaModel: outputs hidden states, no logits
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    reference = model(ids).last_hidden_state
    hfcompress.compress(model, [hfcompress.RotationConfig()], progress=False)
    rotated = model(ids).last_hidden_state
    assert ((rotated - reference).norm() / reference.norm()) < 1e-4
    hfcompress.save_pretrained(model, tmp_path)
    assert torch.equal(AutoModel.from_pretrained(tmp_path)(ids).last_hidden_state, rotated)
