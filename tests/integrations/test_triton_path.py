"""On a CUDA GPU: compressed models run their 4-bit layers through the W4A16 Triton kernels,
before saving and after ``from_pretrained``, and GPTQ runs with a CUDA compute device."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import hfcompress
from hfcompress import GPTQConfig, QuantLinear, compress
from hfcompress.quant import triton_bridge
from hfcompress.quant.dispatch import FORCE_REFERENCE_ENV
from tests.conftest import make_tiny_bert, make_tiny_llama

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

LLAMA_CALIB = torch.randint(0, 128, (16, 24), generator=torch.Generator().manual_seed(5))
BERT_CALIB = torch.randint(1, 100, (16, 24), generator=torch.Generator().manual_seed(5))


def _logits(model, ids):
    # Inference, as generate() runs it: a forward whose input needs a gradient takes the
    # differentiable reference path instead of the kernels (dispatch.quant_linear_forward).
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts of the Triton launches made through the bridge."""
    from hfcompress_triton import w4a16

    calls = {"w4a16_gemv": 0, "w4a16_gemm": 0, "w4_dequantize": 0}
    for op in calls:
        original = getattr(w4a16, op)

        def counted(*args, _op=op, _original=original, **kwargs):
            calls[_op] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(w4a16, op, counted)
    return calls


def _gptq_llama(path):
    """A tiny Llama GPTQ-quantized on the GPU (act-order, groups), saved to ``path``; returns it on CUDA."""
    model = make_tiny_llama(seed=2)
    compress(
        model,
        [GPTQConfig(bits=4, group_size=16, act_order=True)],
        calibration_data=LLAMA_CALIB,
        device="cuda",
        progress=False,
    )
    hfcompress.save_pretrained(model, path)
    return model.cuda()


@pytest.mark.parametrize("load", ["device_map", "to_cuda"])
def test_reloaded_gptq_llama_runs_the_kernels_with_the_same_logits(tmp_path, kernel_calls, load):
    assert triton_bridge.available()
    model = _gptq_llama(tmp_path / "m")
    kernel_calls.update(dict.fromkeys(kernel_calls, 0))  # GPTQ itself ran the quantized blocks on the GPU
    prefill = LLAMA_CALIB[:2].cuda()  # M = 48 rows: dequantize, then cuBLAS
    step = LLAMA_CALIB[:1, :1].cuda()  # M = 1 row: the GEMV
    before = (_logits(model, prefill), _logits(model, step))
    # every 4-bit Linear, once each
    assert kernel_calls == {"w4_dequantize": 14, "w4a16_gemv": 14, "w4a16_gemm": 0}

    if load == "device_map":
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", device_map="cuda")
    else:
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").cuda()
    layer = reloaded.model.layers[1].mlp.down_proj
    assert isinstance(layer, QuantLinear) and layer.qweight.is_cuda
    after = (_logits(reloaded, prefill), _logits(reloaded, step))
    assert kernel_calls == {"w4_dequantize": 28, "w4a16_gemv": 28, "w4a16_gemm": 0}
    # The same kernels on the same tensors: only nondeterminism could differ, and there is none.
    for b, a in zip(before, after, strict=True):
        assert (a - b).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_kernels_agree_with_the_reference_path(tmp_path, monkeypatch, kernel_calls, dtype):
    _gptq_llama(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=dtype, device_map="cuda")
    ids = LLAMA_CALIB[:4].cuda()
    kernel_calls.update(dict.fromkeys(kernel_calls, 0))
    kernels = _logits(model, ids).float()
    assert kernel_calls["w4_dequantize"] == 14  # the kernels ran, not the reference twice
    monkeypatch.setenv(FORCE_REFERENCE_ENV, "1")
    reference = _logits(model, ids).float()
    # Both round the same dequantized half-precision weights; they differ in summation order and
    # in where the product is rounded, a few half-precision ulps per layer.
    cosine = torch.nn.functional.cosine_similarity(kernels.flatten(), reference.flatten(), dim=0).item()
    assert cosine > 0.999
    assert (kernels - reference).abs().max().item() <= 0.05 * reference.abs().max().item()


def test_reloaded_gptq_bert_runs_the_kernels_with_the_same_logits(tmp_path, kernel_calls):
    model = make_tiny_bert(seed=1)
    compress(
        model,
        [GPTQConfig(bits=4, group_size=32, ignore=("classifier",))],
        calibration_data=BERT_CALIB,
        device="cuda",
        progress=False,
    )
    model.save_pretrained(tmp_path / "b")
    kernel_calls.update(dict.fromkeys(kernel_calls, 0))
    ids = BERT_CALIB[:3].cuda()
    before = _logits(model.cuda(), ids)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "b", device_map="cuda")
    after = _logits(reloaded, ids)
    assert kernel_calls["w4_dequantize"] == 2 * 2 * 6  # two runs x two layers x six Linears
    assert (after - before).abs().max().item() <= 1e-5


def test_gptq_on_cuda_matches_gptq_on_cpu():
    float_model = make_tiny_llama(seed=6, layers=3)
    reference = float_model(LLAMA_CALIB).logits
    config = [GPTQConfig(bits=4, group_size=16, act_order=True)]
    on_cpu, on_gpu = copy.deepcopy(float_model), copy.deepcopy(float_model)
    compress(on_cpu, config, calibration_data=LLAMA_CALIB, progress=False)
    compress(on_gpu, config, calibration_data=LLAMA_CALIB, device="cuda", progress=False)
    # Only one block at a time went to the GPU; the model stays where it was.
    assert next(on_gpu.parameters()).device.type == "cpu"
    cpu_layers = {n: m for n, m in on_cpu.named_modules() if isinstance(m, QuantLinear)}
    gpu_layers = {n: m for n, m in on_gpu.named_modules() if isinstance(m, QuantLinear)}
    assert cpu_layers.keys() == gpu_layers.keys() and len(cpu_layers) == 21
    same = sum((cpu_layers[n].codes() == gpu_layers[n].codes()).sum().item() for n in cpu_layers)
    total = sum(m.codes().numel() for m in cpu_layers.values())
    # Float rounding differs between the devices' matmuls and Cholesky factorizations; a code
    # lying on a rounding boundary may flip, and GPTQ carries the flip into later columns.
    assert same / total > 0.95, f"only {same / total:.4f} of the codes agree"
    cpu_mse = (on_cpu(LLAMA_CALIB).logits - reference).pow(2).mean().item()
    gpu_mse = (on_gpu(LLAMA_CALIB).logits - reference).pow(2).mean().item()
    assert gpu_mse < 1.2 * cpu_mse, (gpu_mse, cpu_mse)
