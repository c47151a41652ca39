"""The int8_activations stage: W8A8 / W4A8 schemes, static calibration, save and reload, errors."""

import contextlib
import copy
import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import hfcompress
from hfcompress import (
    ActivationQuantConfig,
    CalibrationDataError,
    CheckpointError,
    GPTQConfig,
    QuantLinear,
    RecipeError,
    RTNConfig,
    compress,
)
from hfcompress.quant.dispatch import FORCE_REFERENCE_ENV, reference_path, select_path

CALIB = torch.randint(0, 128, (8, 24), generator=torch.Generator().manual_seed(3))
W8 = RTNConfig(bits=8, group_size=-1, symmetric=True)
W4 = RTNConfig(bits=4, group_size=-1, symmetric=True)
ACTS = {
    "dynamic-token": ActivationQuantConfig(),
    "dynamic-tensor": ActivationQuantConfig(strategy="tensor"),
    "static-minmax": ActivationQuantConfig(strategy="tensor", dynamic=False),
    "static-mse": ActivationQuantConfig(strategy="tensor", dynamic=False, observer="mse"),
    "static-kl": ActivationQuantConfig(strategy="tensor", dynamic=False, observer="kl"),
    "static-percentile-ema": ActivationQuantConfig(strategy="tensor", dynamic=False, observer="percentile", ema=0.9),
    "static-channel": ActivationQuantConfig(strategy="channel", dynamic=False),
}


def _layers(model):
    return [m for m in model.modules() if isinstance(m, QuantLinear)]


@pytest.mark.parametrize("act", ACTS, ids=list(ACTS))
def test_w8a8_sets_every_quantized_layer_and_stays_close(tiny_llama, llama_ids, act):
    with torch.no_grad():
        ref = tiny_llama(llama_ids).logits
    compress(tiny_llama, [W8, ACTS[act]], calibration_data=CALIB, progress=False)
    layers = _layers(tiny_llama)
    assert len(layers) == 14 and all(layer.scheme.name == "W8A8" for layer in layers)
    static = not ACTS[act].dynamic
    assert all(hasattr(layer, "input_scale") == static for layer in layers)
    with torch.no_grad():
        out = tiny_llama(llama_ids).logits
    # 8-bit weights and activations on a random 2-layer model: a small, nonzero change (static
    # scales from 8 short sequences clip some unseen values: up to ~8% measured).
    rel = float((out - ref).norm() / ref.norm())
    assert 0 < rel < 0.12


def test_static_scales_come_from_the_observed_inputs(tiny_llama):
    compress(tiny_llama, [W8, ACTS["static-minmax"]], calibration_data=CALIB, progress=False)
    seen = {}
    q = tiny_llama.model.layers[1].self_attn.q_proj
    handle = q.register_forward_pre_hook(lambda _m, a: seen.setdefault("x", a[0]))
    # The calibration pass ran the first block with its activations quantized: do the same.
    with torch.no_grad():
        for batch in CALIB.split(8):
            tiny_llama(batch)
    handle.remove()
    assert q.input_scale.item() == pytest.approx(seen["x"].abs().max().item() / 127, rel=1e-5)
    # q, k and v read one tensor: one observer, one scale.
    attn = tiny_llama.model.layers[1].self_attn
    assert attn.k_proj.input_scale.item() == attn.v_proj.input_scale.item() == q.input_scale.item()


@pytest.mark.parametrize("bits", [8, 4], ids=["W8A8", "W4A8"])
def test_int8_kernel_runs_and_matches_the_reference(tiny_llama, llama_ids, bits, monkeypatch):
    compress(tiny_llama, [W8 if bits == 8 else W4, ActivationQuantConfig()], progress=False)
    layer = tiny_llama.model.layers[0].mlp.down_proj
    assert select_path(layer, torch.randn(3, layer.in_features)) == "cpu_int_mm"
    with torch.no_grad():
        fast = tiny_llama(llama_ids).logits
        monkeypatch.setenv(FORCE_REFERENCE_ENV, "1")
        ref = tiny_llama(llama_ids).logits
    # Exact int32 products on one side, float32 dequantized matmuls on the other.
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)


SAVED = {
    "W8A8-dynamic": [W8, ACTS["dynamic-token"]],
    "W8A8-static": [W8, ACTS["static-mse"]],
    "W8A8-static-channel": [W8, ACTS["static-channel"]],
    "W4A8-gptq-g32": [GPTQConfig(bits=4, group_size=32, batch_size=4), ActivationQuantConfig()],
}


@pytest.mark.parametrize("recipe", SAVED, ids=list(SAVED))
def test_reload_runs_the_same_int8_path_with_the_same_logits(tiny_llama, llama_ids, tmp_path, recipe):
    compress(tiny_llama, SAVED[recipe], calibration_data=CALIB, progress=False)
    with torch.no_grad():
        expected = tiny_llama(llama_ids).logits
    hfcompress.save_pretrained(tiny_llama, tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    before, after = tiny_llama.model.layers[1].mlp.up_proj, reloaded.model.layers[1].mlp.up_proj
    assert after.scheme == before.scheme
    x = torch.randn(5, after.in_features)
    assert select_path(after, x) == select_path(before, x)
    if hasattr(before, "input_scale"):
        assert torch.equal(after.input_scale, before.input_scale)
    with torch.no_grad():
        assert torch.equal(reloaded(llama_ids).logits, expected)


def test_bert_classifier_w8a8_reloads(tiny_bert, bert_ids, tmp_path):
    recipe = [
        RTNConfig(bits=8, group_size=-1, symmetric=True, ignore=("classifier",)),
        ActivationQuantConfig(strategy="tensor", dynamic=False, observer="percentile"),
    ]
    compress(tiny_bert, recipe, calibration_data=torch.randint(1, 100, (8, 16)), progress=False)
    assert hasattr(tiny_bert.bert.pooler.dense, "input_scale")  # outside the blocks: full passes
    with torch.no_grad():
        expected = tiny_bert(bert_ids).logits
    tiny_bert.save_pretrained(tmp_path / "b")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "b")
    with torch.no_grad():
        assert torch.equal(reloaded(bert_ids).logits, expected)


def test_missing_static_scale_in_a_checkpoint_is_refused(tiny_llama, tmp_path):
    compress(tiny_llama, [W8, ACTS["static-minmax"]], calibration_data=CALIB, progress=False)
    path = hfcompress.save_pretrained(tiny_llama, tmp_path / "m")
    tensors = load_file(path / "model.safetensors")
    tensors.pop("model.layers.0.mlp.gate_proj.input_scale")
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model.layers.0.mlp.gate_proj.input_scale' \(F32 \[1\]\) is missing"):
        AutoModelForCausalLM.from_pretrained(path)


@pytest.mark.parametrize(
    "options,match",
    [
        ({"bits": 4}, r"bits=4 is invalid; accepted: 8"),
        ({"dynamic": False}, r"dynamic=False is invalid.*static scales \(dynamic: false\) need strategy: tensor"),
        ({"strategy": "channel"}, "dynamic=True is invalid"),
        ({"strategy": "channel", "dynamic": False, "observer": "kl"}, "observer='kl' is invalid"),
        ({"strategy": "tensor", "dynamic": False, "observer": "mse", "ema": 0.9}, "ema=0.9 is invalid"),
        ({"token_outlier_ratio": 50}, r"token_outlier_ratio=50(\.0)? is invalid"),  # dynamic: nothing to fall back from
        ({"strategy": "tensor", "dynamic": False, "token_outlier_ratio": 1}, r"token_outlier_ratio=1(\.0)? is invalid"),
    ],
    ids=["bits", "static-token", "dynamic-channel", "channel-kl", "mse-ema", "ratio-dynamic", "ratio-1"],
)
def test_bad_settings_are_refused(options, match):
    with pytest.raises(RecipeError, match=match):
        hfcompress.Recipe.from_dict({"stages": [{"technique": "int8_activations", **options}]})


def test_static_scheme_without_calibration_data_is_refused(tiny_llama):
    with pytest.raises(CalibrationDataError, match="needs calibration data"):
        compress(tiny_llama, [W8, ACTS["static-minmax"]], progress=False)
    assert not _layers(tiny_llama)  # refused before any stage ran


def test_float_layers_are_refused_with_the_fix(tiny_llama):
    with pytest.raises(RecipeError, match="Put an rtn or gptq stage for them before this one"):
        compress(tiny_llama, [ActivationQuantConfig(targets=("Linear",))], progress=False)
    with pytest.raises(RecipeError, match="select no quantized layer"):
        compress(tiny_llama, [ActivationQuantConfig()], progress=False)


def test_quantizing_activations_twice_is_refused(tiny_llama):
    with pytest.raises(RecipeError, match="already has quantized input activations"):
        compress(tiny_llama, [W8, ActivationQuantConfig(), ActivationQuantConfig()], progress=False)


def test_nan_in_calibration_activations_names_the_layer(tiny_llama):
    compress(tiny_llama, [W8], progress=False)
    with torch.no_grad():
        tiny_llama.model.layers[1].post_attention_layernorm.weight[5] = float("inf")
    with pytest.raises(CalibrationDataError, match=r"model.layers.1.mlp.gate_proj'.*NaN or infinite"):
        compress(tiny_llama, [ACTS["static-minmax"]], calibration_data=CALIB, progress=False)


def test_a_layer_with_a_massive_token_keeps_dynamic_scales_and_reloads_so(tiny_llama, llama_ids, tmp_path, caplog):
    # A massive activation on the first token of one layer's input (as SmolLM2's layer-11 down
    # projection has: 2100x the median token): that layer alone falls back to per-token scales.
    compress(tiny_llama, [W8], progress=False)
    down = tiny_llama.model.layers[1].mlp.down_proj

    def massive_first_token(_module, args):
        x = args[0].clone()
        x[:, 0] *= 500
        return (x,)

    down.register_forward_pre_hook(massive_first_token)
    stage = ActivationQuantConfig(strategy="tensor", dynamic=False, observer="mse", token_outlier_ratio=100)
    with caplog.at_level("INFO", logger="hfcompress"):
        compress(tiny_llama, [stage], calibration_data=CALIB, progress=False)
    assert down.scheme.input_activations.strategy == "token" and down.scheme.input_activations.dynamic
    assert not hasattr(down, "input_scale")
    others = [layer for layer in _layers(tiny_llama) if layer is not down]
    assert all(not layer.scheme.input_activations.dynamic for layer in others)
    assert "'model.layers.1.mlp.down_proj' keeps dynamic per-token scales" in caplog.text
    with torch.no_grad():
        expected = tiny_llama(llama_ids).logits
    hfcompress.save_pretrained(tiny_llama, tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    after = reloaded.model.layers[1].mlp.down_proj
    assert after.scheme == down.scheme
    after.register_forward_pre_hook(massive_first_token)
    with torch.no_grad():
        assert torch.equal(reloaded(llama_ids).logits, expected)


def _kl_to(reference: torch.Tensor, logits: torch.Tensor) -> float:
    ref = torch.log_softmax(reference.float(), dim=-1)
    return float(
        torch.nn.functional.kl_div(torch.log_softmax(logits.float(), -1), ref, log_target=True, reduction="batchmean")
    )


@pytest.mark.parametrize("e2e_weights", [True, False], ids=["input-and-weight-scales", "input-scales"])
def test_end_to_end_steps_bring_static_scales_closer_to_the_unquantized_model(
    tiny_llama, llama_ids, tmp_path, e2e_weights
):
    compress(tiny_llama, [W8], progress=False)
    with torch.no_grad():
        before = tiny_llama(CALIB).logits  # what the stage's steps fit: the model before it
    # Scales that clip a tenth of every input: far from the best, so the steps have work to do.
    plain = ActivationQuantConfig(strategy="tensor", dynamic=False, observer="percentile", percentile=90)
    tuned = dataclasses.replace(plain, e2e_steps=24, e2e_lr=0.02, e2e_weights=e2e_weights)
    other = copy.deepcopy(tiny_llama)
    compress(other, [plain], calibration_data=CALIB, progress=False)
    compress(tiny_llama, [tuned], calibration_data=CALIB, progress=False)
    pairs = list(zip(_layers(other), _layers(tiny_llama), strict=True))
    assert any(not torch.equal(a.input_scale, b.input_scale) for a, b in pairs)
    weight_scales_kept = all(torch.equal(a.scales, b.scales) for a, b in pairs)
    assert weight_scales_kept == (not e2e_weights)
    assert all(torch.equal(a.qweight, b.qweight) for a, b in pairs)  # the codes stay
    with torch.no_grad():
        kl_plain, kl_tuned = _kl_to(before, other(CALIB).logits), _kl_to(before, tiny_llama(CALIB).logits)
    assert kl_tuned < 0.8 * kl_plain
    with torch.no_grad():
        expected = tiny_llama(llama_ids).logits
    hfcompress.save_pretrained(tiny_llama, tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "m")(llama_ids).logits, expected)


@pytest.mark.parametrize("act", ["static-minmax", "static-channel", "dynamic-token"])
def test_the_tuned_stand_in_computes_what_the_layer_computes(tiny_llama, act, monkeypatch):
    from hfcompress.techniques.learned_rounding.scales import _TunedScales

    compress(tiny_llama, [W8, ACTS[act]], calibration_data=CALIB, progress=False)
    layer = tiny_llama.model.layers[0].mlp.down_proj
    x = torch.randn(5, layer.in_features) * layer.in_features**0.5
    static = not ACTS[act].dynamic
    stand_in = _TunedScales(layer, weights=True, inputs=static)
    monkeypatch.setenv(FORCE_REFERENCE_ENV, "1")
    with torch.no_grad():
        torch.testing.assert_close(stand_in.forward(x), layer(x), rtol=1e-5, atol=1e-5)
    if static:  # the input scale's gradient is LSQ's: rounding error inside the range, the clip outside
        out = stand_in.forward(x)
        out.backward(torch.ones_like(out))
        assert stand_in.input_log_factor.grad is not None and stand_in.input_log_factor.grad.abs().sum() > 0
    else:
        with pytest.raises(ValueError, match="only a static input scale can be trained"):
            _TunedScales(layer, inputs=True)


def test_end_to_end_steps_need_static_scales():
    with pytest.raises(RecipeError, match="e2e_steps=8 is invalid"):
        hfcompress.Recipe.from_dict({"stages": [{"technique": "int8_activations", "e2e_steps": 8}]})


NONFINITE = {
    "W8A8-dynamic": [W8, ACTS["dynamic-token"]],
    "W8A8-static": [W8, ACTS["static-minmax"]],
    "W8A8-static-channel": [W8, ACTS["static-channel"]],
    "W4A8-g128": [RTNConfig(bits=4, group_size=128, symmetric=True), ACTS["dynamic-token"]],
}


def _only(path: str, monkeypatch) -> None:
    """Steer 40-row calls of an int8-input layer to one path (on a CPU that has them all)."""
    from hfcompress.quant import cpu_w8a8

    if path != "amx":
        monkeypatch.setattr(cpu_w8a8, "amx_int8_serves", lambda layer, x: False)
    if path in ("int_mm", "torch-quantizer"):
        monkeypatch.setattr(cpu_w8a8, "onednn_available", lambda: False)
    if path == "torch-quantizer":
        monkeypatch.setattr(cpu_w8a8, "_native_quantize", lambda x2, act, static: None)


@pytest.mark.parametrize("path", ["amx", "onednn", "int_mm", "torch-quantizer"])
@pytest.mark.parametrize("recipe", NONFINITE, ids=list(NONFINITE))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_nan_or_inf_input_row_gives_a_nonfinite_output_row_on_every_path(recipe, dtype, path, monkeypatch):
    # An int8 code cannot hold a NaN or an infinity: every path (the C decode call, the row
    # quantizer with AMX, oneDNN or torch._int_mm, the W4A8 path, the reference) turned such a
    # row into a finite guess before; now its output row is not finite, and the other rows
    # are as they were.
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama(hidden_size=256, intermediate_size=512)
    compress(model, NONFINITE[recipe], calibration_data=CALIB, progress=False)
    layer = model.model.layers[0].mlp.down_proj  # K = 512: the AMX kernels' shapes
    _only(path, monkeypatch)
    g = torch.Generator().manual_seed(4)
    for rows in (1, 5, 40):  # the C decode call, then the row quantizer and the matmul kernels
        clean = torch.randn(rows, layer.in_features, generator=g).to(dtype)
        x = clean.clone()
        x[0, 3] = float("nan")
        bad = [0]
        if rows > 2:
            x[2, 7] = float("inf")
            bad.append(2)
        good = [r for r in range(rows) if r not in bad]
        for reference in (False, True):
            with torch.no_grad(), reference_path() if reference else contextlib.nullcontext():
                y, want = layer(x), layer(clean)
            assert not y[bad].isfinite().any(), (rows, reference, select_path(layer, x))
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(y[good], want[good], rtol=tol, atol=tol)
