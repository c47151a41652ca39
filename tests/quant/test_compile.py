"""Quantized models under ``torch.compile``: each ``QuantLinear`` is one custom op, so a decoder
traces into one graph with no breaks and computes what the eager model does."""

from __future__ import annotations

import copy
import gc
import pickle
from unittest import mock

import pytest
import torch
import torch._dynamo

import hfcompress
from hfcompress.quant import QuantLinear, compiled, dispatch
from hfcompress.techniques.rotation import hadamard
from tests.conftest import make_tiny_bert, make_tiny_llama

W4 = [{"technique": "rtn", "bits": 4, "group_size": 64, "ignore": ["lm_head"]}]
W8A8 = [
    {"technique": "rtn", "bits": 8, "group_size": -1, "symmetric": True, "ignore": ["lm_head"]},
    {"technique": "int8_activations", "strategy": "token", "dynamic": True},
]
W3 = [{"technique": "rtn", "bits": 3, "group_size": 128, "ignore": ["lm_head"]}]
ROTATED_W8A8 = [{"technique": "rotate"}, *W8A8]  # an online Hadamard transform before down_proj


def _model(stages) -> torch.nn.Module:
    # hidden 128: group sizes and K that the C kernels take (the decode kernel, AMX)
    model = make_tiny_llama(hidden_size=128, intermediate_size=256).eval()
    return hfcompress.compress(model, hfcompress.Recipe.from_dict({"stages": stages}), progress=False)


def _paths(model, ids) -> set[str]:
    seen = set()
    for layer in model.modules():
        if isinstance(layer, QuantLinear):
            seen.add(dispatch.select_path(layer, torch.zeros(ids.shape[1], layer.in_features)))
    return seen


@pytest.mark.parametrize("stages", [W4, W8A8, W3, ROTATED_W8A8], ids=["w4", "w8a8", "w3", "rotated-w8a8"])
@pytest.mark.parametrize("rows", [1, 12])
def test_a_compiled_decoder_is_one_graph_and_computes_the_eager_logits(stages, rows):
    model = _model(stages)
    ids = torch.randint(0, 128, (1, rows), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    with torch.no_grad():
        # traced, the rotation's Hadamard transform is its two matmuls, not the C kernel: the
        # eager model runs them too, so that no rounding difference moves an int8 code
        with mock.patch.object(hadamard, "_native_block_hadamard", lambda x, block: None):
            eager = model(ids).logits
        explained = torch._dynamo.explain(model)(ids)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert explained.graph_count == 1
        op = torch.ops.hfcompress.quant_linear
        ops = [n for g in explained.graphs for n in g.graph.nodes if n.target in (op, op.default)]
        assert len(ops) == sum(isinstance(m, QuantLinear) for m in model.modules())
        # aot_eager runs the op's fake implementation while tracing and its real one after
        got = torch.compile(model, backend="aot_eager", fullgraph=True)(ids).logits
    assert got.shape == eager.shape
    assert torch.equal(got, eager)  # the same kernels on the same inputs
    if stages is not W3:  # 3 bits have a kernel only with AVX-512 VBMI
        assert "reference" not in _paths(model, ids)  # the packed kernels ran, not the fallback


def test_a_compiled_w8a8_bert_classifier_is_one_graph_with_the_eager_logits():
    model = make_tiny_bert().eval()
    hfcompress.compress(model, hfcompress.Recipe.from_dict({"stages": W8A8}), progress=False)
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(3))
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(ids).logits
        explained = torch._dynamo.explain(model)(ids)
        got = torch.compile(model, backend="aot_eager", fullgraph=True)(ids).logits
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    assert torch.equal(got, eager)


def test_inductor_compiles_a_quantized_decoder_around_the_op():
    model = _model(W4)
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(ids).logits
        got = torch.compile(model, fullgraph=True)(ids).logits
    # inductor fuses the float ops around the linears differently: float rounding only
    torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-4)


def test_the_op_runs_the_layers_own_dispatch_and_checks_shapes():
    model = _model(W4)
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        assert torch.equal(torch.ops.hfcompress.quant_linear(x, layer._handle, layer.out_features), layer(x))
        bad = torch.compile(lambda t: layer(t), backend="eager")  # with fullgraph: wrapped by Dynamo
        with pytest.raises(ValueError, match="in_features=256"):
            bad(torch.randn(2, 100))


def test_training_and_autocast_keep_the_traced_reference_path():
    # the op has no backward: a call that needs a gradient traces the differentiable path
    model = _model(W4)
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, layer.in_features, requires_grad=True)
    assert not compiled.uses_op(x)  # not compiling
    fn = torch.compile(lambda t: layer(t).sum(), backend="aot_eager", fullgraph=True)
    fn(x).backward()
    expected = torch.autograd.grad(layer(x).sum(), x)[0]
    torch.testing.assert_close(x.grad, expected)
    # under autocast the layer keeps its eager dtype rules (graph breaks around its kernels)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.randn(2, layer.in_features)
        got = torch.compile(lambda t: layer(t), backend="aot_eager")(y)
        assert got.dtype == layer(y).dtype
        torch.testing.assert_close(got, layer(y))


def test_copies_get_their_own_handle_and_a_deleted_layer_is_a_clear_error():
    model = _model(W4)
    layer = model.model.layers[0].self_attn.q_proj
    twin = copy.deepcopy(layer)
    thawed = pickle.loads(pickle.dumps(layer))
    assert len({layer._handle, twin._handle, thawed._handle}) == 3
    with torch.no_grad():
        twin.qweight.zero_()  # the copy's weights are its own: the op must call the copy
        x = torch.randn(1, layer.in_features)
        assert not torch.equal(
            torch.ops.hfcompress.quant_linear(x, twin._handle, layer.out_features),
            torch.ops.hfcompress.quant_linear(x, layer._handle, layer.out_features),
        )
        handle = twin._handle
        del twin
        gc.collect()
        with pytest.raises(RuntimeError, match="no QuantLinear is registered under handle"):
            torch.ops.hfcompress.quant_linear(x, handle, layer.out_features)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_a_quantized_decoder_compiles_on_cuda_with_and_without_cuda_graphs(mode):
    # on CUDA the op runs the Triton kernels; "reduce-overhead" captures them in a CUDA graph
    model = _model(W4).to("cuda", torch.float16)
    ids = torch.randint(0, 128, (1, 1), generator=torch.Generator().manual_seed(2)).cuda()
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(ids).logits
        step = torch.compile(model, fullgraph=True, mode=mode)
        for _ in range(3):  # graphs are recorded on the first calls and replayed after
            got = step(ids).logits
    torch.testing.assert_close(got.float(), eager.float(), rtol=2e-2, atol=2e-2)
