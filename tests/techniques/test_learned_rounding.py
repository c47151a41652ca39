"""Learned rounding: the stand-in layer, its start equal to GPTQ/RTN, its gains, resume,
save/reload and bad configs."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import hfcompress
from hfcompress import GPTQConfig, LearnedRoundingConfig, QuantLinear, RecipeError, RTNConfig, compress
from hfcompress.quant.affine import QuantizedWeight, compute_qparams, quantize
from hfcompress.techniques.learned_rounding import modifier as lr_modifier
from hfcompress.techniques.learned_rounding.algorithm import RoundingLinear, signed_step
from tests.conftest import assert_resume_gives_the_uninterrupted_result, make_tiny_llama

CALIB = torch.randint(0, 128, (16, 24), generator=torch.Generator().manual_seed(5))
EVAL = torch.randint(0, 128, (16, 24), generator=torch.Generator().manual_seed(6))


def _start(w, *, bits=3, group_size=16, symmetric=False, float_zero=False):
    scales, zeros = compute_qparams(w, bits=bits, group_size=group_size, symmetric=symmetric, float_zero=float_zero)
    q = quantize(w, scales, zeros, bits=bits, group_size=group_size)
    return QuantizedWeight(q=q, scales=scales, zeros=zeros, bits=bits, group_size=group_size)


GRIDS = [
    {"symmetric": False, "float_zero": False},
    {"symmetric": False, "float_zero": True},
    {"symmetric": True, "float_zero": False},
]


@pytest.mark.parametrize("grid", GRIDS)
def test_stand_in_starts_at_the_starting_quantization(grid):
    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(0))  # 40: a partial last group
    start = _start(w, **grid)
    layer = RoundingLinear(w, start, None, learn_range=True, **grid)
    assert torch.equal(layer.weight(), start.dequantize())
    got = layer.quantized()
    assert torch.equal(got.q, start.q) and torch.equal(got.scales, start.scales) and torch.equal(got.zeros, start.zeros)


@pytest.mark.parametrize("grid", GRIDS)
def test_signed_steps_lower_a_layers_output_error_and_the_codes_say_so(grid):
    gen = torch.Generator().manual_seed(1)
    # Correlated inputs (rank 8 plus noise), as activations are: with white inputs
    # round-to-nearest is already optimal and there is nothing to learn.
    w = torch.randn(32, 48, generator=gen)
    x = torch.randn(256, 8, generator=gen) @ torch.randn(8, 48, generator=gen) + 0.1 * torch.randn(
        256, 48, generator=gen
    )
    start = _start(w, **grid)
    layer = RoundingLinear(w, start, None, learn_range=True, **grid)
    target = x @ w.T

    def error():
        return (layer(x) - target).pow(2).mean()

    before = error().item()
    for step in range(100):
        error().backward()
        signed_step([layer], 0.005 * (1 - step / 100))
    assert layer.offset.abs().max() <= 0.5
    assert layer.lo.min() >= 0.5 and layer.hi.max() <= 1.5
    assert error().item() < 0.6 * before
    # What is stored dequantizes to exactly what was trained.
    stored = layer.quantized()
    assert stored.q.max() <= 7 and stored.scales.dtype == torch.float16
    assert torch.equal(stored.dequantize(), layer.weight().detach())


@pytest.mark.parametrize("asym", [False, True])
def test_no_steps_from_gptq_is_gptq_exactly(asym):
    # asym: started from GPTAQ, whose float copy of the block must see the block untouched
    common = dict(bits=3, group_size=16, act_order=True, clip_search=True, compute_dtype="float32", batch_size=4)
    common["asym_calibration"] = asym
    gptq, rounded = make_tiny_llama(layers=3), make_tiny_llama(layers=3)
    compress(gptq, [GPTQConfig(**common)], calibration_data=CALIB, progress=False)
    compress(rounded, [LearnedRoundingConfig(**common, steps=0)], calibration_data=CALIB, progress=False)
    expected, got = gptq.state_dict(), rounded.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def _logit_error(model, reference):
    with torch.no_grad():
        return (model(EVAL).logits - reference).pow(2).mean().item()


@pytest.mark.parametrize(
    "options", [{"init": "rtn"}, {"init": "rtn", "target": "block", "learn_range": False, "keep_best": True}]
)
def test_learned_rounding_beats_its_start(options):
    base = make_tiny_llama(layers=3)
    with torch.no_grad():
        reference = base(EVAL).logits
    rtn, rounded = copy.deepcopy(base), copy.deepcopy(base)
    compress(rtn, [RTNConfig(bits=3, group_size=16)], progress=False)
    config = LearnedRoundingConfig(bits=3, group_size=16, clip_search=False, steps=200, batch_size=4, **options)
    compress(rounded, [config], calibration_data=CALIB, progress=False)
    assert sum(isinstance(m, QuantLinear) for m in rounded.modules()) == 21
    assert _logit_error(rounded, reference) < 0.7 * _logit_error(rtn, reference)


def test_resume_after_a_kill_gives_the_uninterrupted_result(tmp_path, monkeypatch):
    config = [LearnedRoundingConfig(bits=4, group_size=16, steps=10, batch_size=4)]
    # Killed in the middle of the second block's steps.
    assert_resume_gives_the_uninterrupted_result(
        monkeypatch, tmp_path, config, CALIB, lr_modifier.LearnedRoundingModifier, "_tune", 1
    )


def test_resume_after_a_kill_in_the_end_to_end_steps_gives_the_uninterrupted_result(tmp_path, monkeypatch):
    from hfcompress.techniques.learned_rounding.scales import _TunedScales

    config = [LearnedRoundingConfig(bits=4, group_size=16, steps=4, batch_size=4, e2e_steps=8, e2e_windows=6)]
    # 21 quantized layers: killed in the fourth end-to-end step, after every block is done.
    assert_resume_gives_the_uninterrupted_result(monkeypatch, tmp_path, config, CALIB, _TunedScales, "forward", 70)


def test_saves_and_reloads_with_the_same_logits(tmp_path):
    model = make_tiny_llama()
    compress(
        model,
        [LearnedRoundingConfig(bits=4, group_size=16, steps=5, batch_size=8)],
        calibration_data=CALIB,
        progress=False,
    )
    hfcompress.save_pretrained(model, tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(reloaded(EVAL).logits, model(EVAL).logits)


def test_bert_pooler_outside_the_blocks_is_quantized(tiny_bert, bert_ids, tmp_path):
    compress(
        tiny_bert,
        [LearnedRoundingConfig(bits=4, group_size=16, steps=3, batch_size=4)],
        calibration_data=bert_ids,
        progress=False,
    )
    assert isinstance(tiny_bert.bert.pooler.dense, QuantLinear)
    hfcompress.save_pretrained(tiny_bert, tmp_path / "m")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(bert_ids).logits, tiny_bert(bert_ids).logits)


def _kl_to(reference, model, ids):
    with torch.no_grad():
        p = torch.log_softmax(reference(ids).logits, -1)
        q = torch.log_softmax(model(ids).logits, -1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


def test_end_to_end_scales_lower_the_kl_and_keep_the_codes(tmp_path):
    base = make_tiny_llama(layers=3)
    common = dict(bits=3, group_size=16, steps=10, batch_size=4, compute_dtype="float32")
    plain, tuned = copy.deepcopy(base), copy.deepcopy(base)
    compress(plain, [LearnedRoundingConfig(**common)], calibration_data=CALIB, progress=False)
    tuning = LearnedRoundingConfig(**common, e2e_steps=40, e2e_lr=3e-3)
    compress(tuned, [tuning], calibration_data=CALIB, progress=False)
    # The objective, measured in full (not over the top tokens the pass keeps): lower.
    assert _kl_to(base, tuned, CALIB) < 0.9 * _kl_to(base, plain, CALIB)
    layers = {n: m for n, m in tuned.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 21
    changed = 0
    for name, layer in layers.items():
        start = plain.get_submodule(name)
        assert torch.equal(layer.qweight, start.qweight) and torch.equal(layer.zeros, start.zeros)
        changed += not torch.equal(layer.scales, start.scales)
    assert changed == 21
    assert all(not p.requires_grad or p.grad is None for p in tuned.parameters())
    assert all("forward" not in m.__dict__ for m in layers.values())  # the training forwards are gone
    hfcompress.save_pretrained(tuned, tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(reloaded(EVAL).logits, tuned(EVAL).logits)


def test_end_to_end_scales_are_seeded():
    config = LearnedRoundingConfig(bits=4, group_size=16, steps=3, batch_size=4, e2e_steps=6, e2e_windows=5)
    runs = [make_tiny_llama(layers=2) for _ in range(2)]
    for model in runs:
        compress(model, [config], calibration_data=CALIB, progress=False)
    first, second = (m.state_dict() for m in runs)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_top_k_kl_is_zero_only_at_the_teacher():
    from hfcompress.techniques.learned_rounding.scales import partial_kl

    logits = torch.randn(7, 300, generator=torch.Generator().manual_seed(0))
    logp = torch.log_softmax(logits, -1)
    values, index = logp.topk(64, dim=-1)
    rest = torch.log1p(-values.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-6))
    teacher = torch.cat([values, rest], -1)
    assert abs(partial_kl(logits, teacher, index).item()) < 1e-5
    assert partial_kl(logits + torch.randn_like(logits), teacher, index).item() > 1e-3
    # Mass moved out of the tail into the top tokens (which a top-k-only KL would reward) costs.
    shifted = logits.clone()
    shifted.scatter_add_(-1, index, torch.full_like(values, 0.5))
    assert partial_kl(shifted, teacher, index).item() > 1e-3


def test_end_to_end_scales_refuse_an_offloaded_model(tmp_path):
    make_tiny_llama(layers=2).save_pretrained(tmp_path / "float")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk"}
    device_map |= {"model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "float", device_map=device_map, offload_folder=tmp_path / "offload"
    )
    assert model.model.layers[1].mlp.up_proj.weight.is_meta
    with pytest.raises(RecipeError, match="offloaded"):
        compress(model, [LearnedRoundingConfig(bits=4, group_size=16, e2e_steps=2)], calibration_data=CALIB)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("steps", -1, "steps=-1"),
        ("lr", 0.0, "lr=0.0"),
        ("init", "awq", "init='awq'"),
        ("target", "x", "target='x'"),
        ("e2e_steps", -2, "e2e_steps=-2"),
        ("e2e_lr", 0.0, "e2e_lr=0.0"),
        ("e2e_windows", 0, "e2e_windows=0"),
    ],
)
def test_bad_config_is_refused(field, value, match):
    with pytest.raises(RecipeError, match=match):
        LearnedRoundingConfig(**{field: value})


@pytest.mark.parametrize("config_class", [LearnedRoundingConfig, hfcompress.ActivationQuantConfig])
@pytest.mark.parametrize(("key", "value"), [("e2e_lr", 0.0), ("e2e_lr", 2.0), ("e2e_windows", 0)])
def test_bad_end_to_end_fields_are_refused_by_both_stages_that_have_them(config_class, key, value):
    extra = {} if config_class is LearnedRoundingConfig else {"dynamic": False, "strategy": "tensor"}
    with pytest.raises(RecipeError, match=f"{key}={value!r} is invalid"):
        config_class(**extra, **{key: value})


def test_end_to_end_steps_refuse_an_offloaded_model():
    from hfcompress.techniques.learned_rounding.scales import check_in_memory

    model = torch.nn.Linear(4, 4, device="meta")
    with pytest.raises(RecipeError, match="offloaded"):
        check_in_memory(model, RecipeError)
    check_in_memory(torch.nn.Linear(4, 4), RecipeError)  # in memory: no error


@pytest.mark.parametrize("stages", ["learned_rounding", "static_activations"])
def test_end_to_end_steps_on_a_base_model_are_refused_before_anything_changes(stages):
    # A base model has no logits to match: refused at the check, not after earlier stages ran.
    from hfcompress import ActivationQuantConfig

    model = make_tiny_llama().model
    recipe = {
        "learned_rounding": [LearnedRoundingConfig(bits=4, group_size=16, steps=2, batch_size=2, e2e_steps=2)],
        "static_activations": [
            RTNConfig(bits=8, group_size=-1, symmetric=True),
            ActivationQuantConfig(strategy="tensor", dynamic=False, e2e_steps=2),
        ],
    }[stages]
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(RecipeError, match=r"returns no logits.*set e2e_steps: 0"):
        compress(model, recipe, calibration_data=ids, progress=False)
    assert not any(type(m).__name__ == "QuantLinear" for m in model.modules())
