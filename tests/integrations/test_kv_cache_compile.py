"""The quantized KV cache under ``torch.compile``: a step over stored tokens is one operator, so a
decoder with the cache compiles into a prefill graph and a decode graph (no breaks, no
re-tracing as the cache grows) and decodes what the eager model decodes."""

from __future__ import annotations

import copy
import gc
import warnings

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from hfcompress.integrations.kv_cache import QuantizedKVCache, enable_kv_cache
from hfcompress.quant.dispatch import reference_path

from .test_kv_cache import SPEC, make_model

PROMPT = torch.randint(1, 128, (1, 30), generator=torch.Generator().manual_seed(0))
STEPS = 40  # 30 + 40 tokens: well past the 4 sinks and the 16-token window, so the packed part is read


@pytest.fixture
def model():
    m = make_model().eval()
    enable_kv_cache(m, bits=4, **SPEC)
    return m


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@torch.no_grad()
def _decode(forward, cache, ids=PROMPT, steps=STEPS):
    """Greedy decoding through ``forward``: the tokens and every step's last logits."""
    logits = forward(input_ids=ids, cache=cache).logits[:, -1]
    tokens, seen = [], [logits]
    for _ in range(steps):
        nxt = logits.argmax(-1, keepdim=True)
        tokens.append(nxt)
        logits = forward(input_ids=nxt, cache=cache).logits[:, -1]
        seen.append(logits)
    return torch.cat(tokens, 1), torch.stack(seen)


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_a_compiled_decoder_with_the_cache_decodes_the_eager_tokens_in_two_graphs(model):
    want_tokens, want_logits = _decode(model.forward, QuantizedKVCache(model.config, bits=4, **SPEC))
    compiled = torch.compile(model.forward, backend="aot_eager")
    cache = QuantizedKVCache(model.config, bits=4, **SPEC)
    tokens, logits = _decode(compiled, cache)
    assert cache.layers[0].packed_tokens > 0  # the packed part was stored and read
    assert torch.equal(tokens, want_tokens)
    assert torch.equal(logits, want_logits)  # the operators run the eager step's kernels
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert _graphs() == 2  # the prefill, then one decode graph for every length

    # A second cache runs the same graphs on its own layers: their handles are graph inputs.
    again = QuantizedKVCache(model.config, bits=4, **SPEC)
    tokens2, logits2 = _decode(compiled, again)
    assert torch.equal(tokens2, want_tokens) and torch.equal(logits2, want_logits)
    assert _graphs() == 2
    assert cache.get_seq_length() == again.get_seq_length() == PROMPT.shape[1] + STEPS


def test_the_decode_graph_calls_one_operator_per_layer(model):
    cache = QuantizedKVCache(model.config, bits=4, **SPEC)
    with torch.no_grad():
        model(input_ids=PROMPT, cache=cache)
        explained = torch._dynamo.explain(model.forward)(input_ids=PROMPT[:, :1], cache=cache)
    assert explained.graph_break_count == 0, explained.break_reasons
    op = torch.ops.hfcompress.kv_attend
    calls = [n for g in explained.graphs for n in g.graph.nodes if n.target in (op, op.default)]
    assert len(calls) == model.config.num_hidden_layers


def test_compiled_generate_with_left_padding_equals_eager(model):
    ids = torch.randint(1, 128, (2, 26), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    ids[1, :7], mask[1, :7] = 0, 0  # the second prompt is 7 tokens shorter, padded on the left
    kwargs = dict(attention_mask=mask, max_new_tokens=STEPS, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = model.generate(ids, **kwargs)
        model.forward = torch.compile(model.forward, backend="aot_eager")
        try:
            got = model.generate(ids, **kwargs)
        finally:
            del model.forward
    assert torch.equal(got, want)
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_compiled_chunks_over_a_stored_history_match_eager(model):
    # Multi-token steps after the first (a chunked prefill) go through the operator with a mask.
    ids = torch.randint(1, 128, (2, 120), generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(model.forward, backend="aot_eager")
    eager_cache = QuantizedKVCache(model.config, bits=4, **SPEC)
    compiled_cache = QuantizedKVCache(model.config, bits=4, **SPEC)
    with torch.no_grad():
        for start in range(0, 120, 40):
            chunk = ids[:, start : start + 40]
            want = model(input_ids=chunk, cache=eager_cache).logits
            got = compiled(input_ids=chunk, cache=compiled_cache).logits
            assert torch.equal(got, want)
    assert compiled_cache.layers[0].packed_tokens == eager_cache.layers[0].packed_tokens > 0


def test_the_reference_path_switch_is_read_when_the_graph_runs(model):
    compiled = torch.compile(model.forward, backend="aot_eager")
    _decode(compiled, QuantizedKVCache(model.config, bits=4, **SPEC), steps=3)  # traced outside the switch
    with reference_path():
        want_tokens, want_logits = _decode(model.forward, QuantizedKVCache(model.config, bits=4, **SPEC))
        tokens, logits = _decode(compiled, QuantizedKVCache(model.config, bits=4, **SPEC))
    assert torch.equal(tokens, want_tokens)
    # the eager reference path attends through SDPA, the operator through float32 attention
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-5)


def test_a_copied_cache_is_its_own_and_a_deleted_one_is_a_clear_error(model):
    compiled = torch.compile(model.forward, backend="aot_eager")
    cache = QuantizedKVCache(model.config, bits=4, **SPEC)
    _decode(compiled, cache, steps=25)  # 55 tokens: 32 of them packed
    copied = copy.deepcopy(cache)
    assert int(copied.layers[0]._handle) != int(cache.layers[0]._handle)
    before = [t.clone() for t in cache.layers[0].packed().tensors()] + [cache.layers[0].keys.clone()]
    with torch.no_grad():
        compiled(input_ids=PROMPT[:, :1], cache=copied)
    assert copied.get_seq_length() == cache.get_seq_length() + 1
    after = [*cache.layers[0].packed().tensors(), cache.layers[0].keys]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))  # the original is untouched

    handle = cache.layers[0]._handle
    key = torch.zeros(1, 2, 1, 16)
    del cache, copied
    gc.collect()
    with pytest.raises(RuntimeError, match="no QuantizedKVLayer is registered under handle"):
        torch.ops.hfcompress.kv_attend(torch.zeros(1, 4, 1, 16), key, key, None, handle, 0.25)


@torch.no_grad()
def _forced_logits(forward, cache, ids):
    """Logits of every step, teacher-forced: the prompt's first 30 tokens, then one at a time
    (no argmax, so float rounding cannot change later inputs)."""
    logits = [forward(input_ids=ids[:, :30], cache=cache).logits[:, -1]]
    for t in range(30, ids.shape[1]):
        logits.append(forward(input_ids=ids[:, t : t + 1], cache=cache).logits[:, -1])
    return torch.stack(logits).float()


def _check_inductor(model, device, mode=None, rtol=1e-4, atol=1e-4):
    ids = torch.randint(1, 128, (1, 70), generator=torch.Generator().manual_seed(5)).to(device)
    want = _forced_logits(model.forward, QuantizedKVCache(model.config, bits=4, **SPEC), ids)
    compiled = torch.compile(model.forward, mode=mode)
    for _ in range(2):  # CUDA graphs (where allowed) are recorded first, then replayed
        got = _forced_logits(compiled, QuantizedKVCache(model.config, bits=4, **SPEC), ids)
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)  # inductor fuses the float ops its own way


def test_inductor_compiles_a_decoder_around_the_cache_operators(model):
    _check_inductor(model, "cpu")
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_the_cache_compiles_on_cuda_with_and_without_cuda_graphs(model, mode):
    # On CUDA the operators run the Triton kernels. They change the cache, so they are marked
    # unsafe for CUDA graphs: "reduce-overhead" must leave them out of any graph it replays.
    _check_inductor(model.to("cuda", torch.float16), "cuda", mode, rtol=2e-2, atol=2e-2)


def test_a_step_that_needs_gradients_traces_the_eager_cache(model):
    # the operators have no backward: with gradients the traced code is the eager step's (Dynamo
    # alone, backend "eager": what is checked is which code Dynamo traces)
    ids = torch.randint(1, 128, (1, 70), generator=torch.Generator().manual_seed(6))
    compiled = torch.compile(model.forward, backend="eager")
    grads = []
    for forward in (model.forward, compiled):
        model.zero_grad()
        cache = QuantizedKVCache(model.config, bits=4, **SPEC)
        with torch.no_grad():
            forward(input_ids=ids[:, :60], cache=cache)  # 32 of them packed
        assert cache.layers[0].packed_tokens == 32
        loss = forward(input_ids=ids[:, 60:], cache=cache).logits.float().square().mean()
        with warnings.catch_warnings():  # backward through our operators would warn so
            warnings.filterwarnings("error", message=".*autograd kernel was not registered")
            loss.backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
