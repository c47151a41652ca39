"""The quantized KV cache inside transformers: generate, beams, padding, the packed part's life."""

import contextlib
import copy
import warnings

import pytest
import torch
from transformers import DynamicCache, LlamaForCausalLM

from hfcompress.errors import ModelError
from hfcompress.integrations import kv_attention, kv_cache
from hfcompress.integrations.kv_cache import QuantizedKVCache, disable_kv_cache, enable_kv_cache, kv_config
from hfcompress.quant import kv_cpu
from hfcompress.quant.dispatch import reference_path

from ..conftest import make_tiny_bert, make_tiny_causal, make_tiny_hybrid, make_tiny_llama

# Small groups and window, so that a few dozen tokens go well past the residual window.
SPEC = dict(group_size=16, residual_length=16, sink_tokens=4)


def make_model(seed: int = 0) -> LlamaForCausalLM:
    """The tiny Llama with head dim 16 (4 query heads on 2 KV heads) and 512 positions."""
    return make_tiny_llama(seed, tie=False, hidden_size=64, max_position_embeddings=512, pad_token_id=0)


@pytest.fixture
def model():
    m = make_model()
    enable_kv_cache(m, bits=4, **SPEC)
    return m


def _prompts(n=5, length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 128, (1, length + 3 * i), generator=g) for i in range(n)]


@torch.no_grad()
def _generate(model, ids, cache=None, **kw):
    kw.setdefault("max_new_tokens", 60)
    kw.setdefault("do_sample", False)
    return model.generate(ids, cache=cache, pad_token_id=0, **kw)


def test_kv8_greedy_equals_the_float_cache(model):
    for ids in _prompts():
        want = _generate(model, ids, DynamicCache(config=model.config))
        got = _generate(model, ids, QuantizedKVCache(model.config, bits=8, **SPEC))
        assert torch.equal(got, want)


@pytest.mark.parametrize("bits", [2, 4])
def test_fused_attention_equals_the_reference_path(model, bits):
    for ids in _prompts():
        got = _generate(model, ids, QuantizedKVCache(model.config, bits=bits, **SPEC))
        with reference_path():
            want = _generate(model, ids, QuantizedKVCache(model.config, bits=bits, **SPEC))
        assert torch.equal(got, want)


def test_chunked_forward_logits_match_the_reference_path(model):
    ids = torch.randint(1, 128, (2, 200), generator=torch.Generator().manual_seed(1))
    fused, ref = QuantizedKVCache(model.config, bits=4, **SPEC), QuantizedKVCache(model.config, bits=4, **SPEC)
    with torch.no_grad():
        for start in range(0, 200, 50):
            a = model(ids[:, start : start + 50], cache=fused).logits
            with reference_path():
                b = model(ids[:, start : start + 50], cache=ref).logits
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # float32 sums in another order
    assert fused.layers[0].packed_tokens == 176  # 200 - 4 sinks - a window of 20 (16 + a partial group)


def test_tokens_are_quantized_once_as_they_leave_the_window(model, monkeypatch):
    quantized = []
    real = kv_cache._quantize

    def spy(x, bits, group_size, axis, scale_dtype):
        quantized.append(x.shape[-2])
        return real(x, bits, group_size, axis, scale_dtype)

    monkeypatch.setattr(kv_cache, "_quantize", spy)
    cache = QuantizedKVCache(model.config, bits=4, **SPEC)
    ids = torch.randint(1, 128, (1, 100), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model(ids[:, :40], cache=cache)
        layer = cache.layers[0]
        first = layer.packed().k_packed[:, :, :16].clone()
        for t in range(40, 100):
            model(ids[:, t : t + 1], cache=cache)
            assert 16 <= layer.keys.shape[-2] < 32  # the window: residual_length to + group - 1
    # every token quantized exactly once (keys and values: two calls per group per layer)
    assert sum(quantized) == 2 * len(cache.layers) * layer.packed_tokens
    assert layer.packed_tokens == 100 - 4 - layer.keys.shape[-2]
    assert torch.equal(layer.packed().k_packed[:, :, :16], first)  # old codes never rewritten


@pytest.mark.skipif(not kv_cpu.available(), reason="no C compiler: the torch path serves instead")
def test_the_kernel_arguments_of_a_packed_part_are_made_once(model, monkeypatch):
    """The CPU kernel's checked arguments are made once per view of a layer's packed part and
    kept with it until the part grows; every step between reuses them."""
    made, views = [], []
    real_of, real_of_view = kv_cpu.PackedArgs.of.__func__, kv_cpu.PackedArgs.of_view.__func__
    monkeypatch.setattr(kv_cpu.PackedArgs, "of", classmethod(lambda cls, *a: made.append(1) or real_of(cls, *a)))
    monkeypatch.setattr(
        kv_cpu.PackedArgs, "of_view", classmethod(lambda cls, view: views.append(view) or real_of_view(cls, view))
    )
    cache = QuantizedKVCache(model.config, bits=4, **SPEC)
    ids = torch.randint(1, 128, (1, 100), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for t in range(0, 100, 4):
            model(ids[:, t : t + 4], cache=cache)
    # Steps of 4 tokens: the packed part is empty until 4 sinks and a window of 32 are full (the
    # first 9 steps), then holds 16, 32, 48 and 64 tokens for 4 steps each.
    assert len(views) == 16 * len(cache.layers)
    assert len(made) == len({id(v) for v in views}) == 4 * len(cache.layers)


def test_sink_tokens_stay_in_full_precision(model):
    cache = QuantizedKVCache(model.config, bits=2, **SPEC)
    reference = DynamicCache(config=model.config)
    ids = torch.randint(1, 128, (1, 80), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model(ids, cache=cache)
        model(ids, cache=reference)
    assert torch.equal(cache.layers[1].sink_keys, reference.layers[1].keys[:, :, :4])
    assert torch.equal(cache.layers[1].keys, reference.layers[1].keys[:, :, -cache.layers[1].keys.shape[-2] :])


def test_left_padded_batch(model):
    long, short = torch.randint(1, 128, (1, 30)), torch.randint(1, 128, (1, 22))
    batch = torch.cat([long, torch.cat([torch.zeros(1, 8, dtype=torch.long), short], 1)])
    mask = (batch != 0).long()
    mask[0] = 1
    kw = dict(attention_mask=mask, max_new_tokens=50)
    with torch.no_grad():
        got = _generate(model, batch, QuantizedKVCache(model.config, bits=8, **SPEC), **kw)
        want = _generate(model, batch, DynamicCache(config=model.config), **kw)
        fused = _generate(model, batch, QuantizedKVCache(model.config, bits=4, **SPEC), **kw)
        with reference_path():
            ref = _generate(model, batch, QuantizedKVCache(model.config, bits=4, **SPEC), **kw)
    assert torch.equal(got, want)
    assert torch.equal(fused, ref)


@pytest.mark.skipif(not kv_cpu.available(), reason="no C compiler: the torch path serves instead")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("chunk", [40, 8], ids=["whole-step", "kernel"])
def test_padded_chunks_over_a_packed_history_match_the_reference_path(chunk, dtype, monkeypatch):
    """A left-padded batch fed in chunks after the packed part exists: chunks of 16 queries
    or more attend through SDPA over the whole step (the packed part dequantized in C), shorter
    ones through the C kernel; both give the reference path's logits on the real tokens, and
    the padded rows, which see no key, no NaN."""
    model = make_model().to(dtype)
    enable_kv_cache(model, bits=4, **SPEC)
    whole = []
    real = kv_cache.QuantizedKVLayer.whole_step
    monkeypatch.setattr(kv_cache.QuantizedKVLayer, "whole_step", lambda self, n: whole.append(n) or real(self, n))
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(1, 128, (2, 120), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :50] = 0  # row 1 left-padded past the first chunk
    fused, ref = QuantizedKVCache(model.config, bits=4, **SPEC), QuantizedKVCache(model.config, bits=4, **SPEC)
    with torch.no_grad():
        model(ids[:, :40], attention_mask=mask[:, :40], cache=fused)
        with reference_path():
            model(ids[:, :40], attention_mask=mask[:, :40], cache=ref)
        for start in range(40, 120, chunk):
            end = start + chunk
            a = model(ids[:, start:end], attention_mask=mask[:, :end], cache=fused).logits
            with reference_path():
                b = model(ids[:, start:end], attention_mask=mask[:, :end], cache=ref).logits
            assert not a.isnan().any()
            real_rows = mask[:, start:end].bool()
            tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=0.05, atol=0.05)
            torch.testing.assert_close(a[real_rows], b[real_rows], **tol)
    assert fused.layers[0].packed_tokens > 0
    assert whole == ([] if chunk < kv_attention.DEQUANTIZE_QUERIES else [chunk] * 2 * len(fused.layers))


@pytest.mark.skipif(not kv_cpu.available(), reason="no C compiler: the torch path serves instead")
def test_the_whole_step_dequantizes_like_the_reference_history(model, monkeypatch):
    """whole_step's keys and values: the reference history (the packed part dequantized in
    torch) and the staged step, bit for bit; None for a dtype the C code does not write."""
    cache = QuantizedKVCache(model.config, bits=4, **SPEC)
    ids = torch.randint(1, 128, (2, 90), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        model(ids, cache=cache)
    layer = cache.layers[1]
    step = torch.randn(2, 2, 3, 16), torch.randn(2, 2, 3, 16)
    layer._stage(*step)
    keys, values = layer.whole_step(3)
    want_k, want_v = layer.history()
    assert torch.equal(keys, torch.cat([want_k, step[0]], -2)) and torch.equal(values, torch.cat([want_v, step[1]], -2))
    monkeypatch.setattr(layer, "dtype", torch.float16)
    assert layer.whole_step(3) is None


def test_beam_search(model):
    ids = _prompts(1)[0]
    kw = dict(num_beams=3, max_new_tokens=50)
    want = _generate(model, ids, DynamicCache(config=model.config), **kw)
    assert torch.equal(_generate(model, ids, QuantizedKVCache(model.config, bits=8, **SPEC), **kw), want)
    fused = _generate(model, ids, QuantizedKVCache(model.config, bits=4, **SPEC), **kw)
    with reference_path():
        ref = _generate(model, ids, QuantizedKVCache(model.config, bits=4, **SPEC), **kw)
    assert torch.equal(fused, ref)


def test_sampling(model):
    ids = _prompts(1)[0]
    outs = []
    for ctx in (torch.no_grad, reference_path):
        torch.manual_seed(7)
        with ctx():
            outs.append(_generate(model, ids, QuantizedKVCache(model.config, bits=4, **SPEC), do_sample=True, top_k=20))
    assert torch.equal(*outs)


def test_generate_builds_our_cache_by_default_and_disable_restores(model):
    ids = _prompts(1)[0]
    out = model.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    assert isinstance(cache, QuantizedKVCache) and cache.spec == kv_config(model)
    assert cache.layers[0].packed_tokens > 0
    user = DynamicCache(config=model.config)
    _generate(model, ids, user, max_new_tokens=5)
    assert user.get_seq_length() > 0  # a cache the caller passes is used as given
    disable_kv_cache(model)
    assert kv_config(model) is None and model.config._attn_implementation != kv_cache.ATTENTION
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    assert type(getattr(out, "cache", None) or out.past_key_values) is DynamicCache


@torch.no_grad()
def test_a_hand_written_decoding_loop_gets_our_cache(model):
    # model(ids, use_cache=True) with no cache built transformers' float DynamicCache, so a
    # hand-written greedy loop stored every token in full precision, silently.
    ids = _prompts(1)[0]
    want = _generate(model, ids, max_new_tokens=40)
    out = model(ids, use_cache=True)
    assert isinstance(out.past_key_values, QuantizedKVCache) and out.past_key_values.spec == kv_config(model)
    torch.testing.assert_close(out.logits, model(ids, use_cache=False).logits)  # the prompt attends in float
    tokens = [out.logits[:, -1].argmax(-1, keepdim=True)]
    for _ in range(39):
        out = model(tokens[-1], past_key_values=out.past_key_values)  # the older keyword, positions from the cache
        tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
    assert out.past_key_values.layers[0].packed_tokens > 0
    assert torch.equal(torch.cat([ids, *tokens], dim=1), want)
    # a cache the caller passes, a forward without use_cache, and training-mode forwards are left alone
    user = DynamicCache(config=model.config)
    assert model(ids, cache=user).past_key_values is user
    assert model(ids, use_cache=False).past_key_values is None
    model.train()
    assert type(model(ids, use_cache=True).past_key_values) is DynamicCache
    model.eval()
    disable_kv_cache(model)
    assert type(model(ids, use_cache=True).past_key_values) is DynamicCache


@pytest.mark.parametrize("named", ["static"])  # "offloaded" works the same way, on CUDA only
def test_a_cache_named_by_the_caller_is_honoured_with_a_warning(model, named):
    # cache_implementation= is an explicit request: generate builds that cache, and says that
    # this call does not store its keys and values packed. The tokens are the plain model's.
    ids = _prompts(1)[0]
    plain = make_model()
    want = plain.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0, cache_implementation=named)
    with pytest.warns(UserWarning, match=rf"cache_implementation='{named}'.* not this model's 4-bit KV cache"):
        out = model.generate(
            ids,
            max_new_tokens=20,
            do_sample=False,
            pad_token_id=0,
            cache_implementation=named,
            return_dict_in_generate=True,
        )
    cache = getattr(out, "cache", None) or out.past_key_values
    assert not isinstance(cache, QuantizedKVCache)
    assert torch.equal(out.sequences, want)
    # "dynamic", transformers' default by name, still gets ours, without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = model.generate(
            ids,
            max_new_tokens=5,
            do_sample=False,
            pad_token_id=0,
            cache_implementation="dynamic",
            return_dict_in_generate=True,
        )
    assert isinstance(getattr(out, "cache", None) or out.past_key_values, QuantizedKVCache)


def test_without_our_attention_the_cache_still_gives_the_same_tokens():
    plain = make_model()  # sdpa attention: each step reads the dequantized history
    fused = make_model()
    enable_kv_cache(fused, bits=4, **SPEC)
    for ids in _prompts(2):
        a = _generate(plain, ids, QuantizedKVCache(plain.config, bits=4, **SPEC))
        b = _generate(fused, ids, QuantizedKVCache(fused.config, bits=4, **SPEC))
        assert torch.equal(a, b)


@pytest.mark.skipif(not kv_cpu.available(), reason="no C compiler: the torch path serves instead")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_without_our_attention_the_history_is_dequantized_in_c_exactly(dtype, monkeypatch):
    """A model on plain SDPA gets the whole history from update(): dequantized by the C code
    (whole_step) outside the reference path, with the same logits as the torch history gives."""
    plain = make_model().to(dtype)
    calls = []
    real = kv_cache.QuantizedKVLayer.whole_step

    def spy(self, n):
        whole = real(self, n)
        calls.append(whole is not None)
        return whole

    monkeypatch.setattr(kv_cache.QuantizedKVLayer, "whole_step", spy)
    ids = torch.randint(1, 128, (2, 100), generator=torch.Generator().manual_seed(6))
    fast, ref = QuantizedKVCache(plain.config, bits=4, **SPEC), QuantizedKVCache(plain.config, bits=4, **SPEC)
    with torch.no_grad():
        for start, end in ((0, 60), *((t, t + 1) for t in range(60, 70)), (70, 100)):
            a = plain(ids[:, start:end], cache=fast).logits
            with reference_path():
                b = plain(ids[:, start:end], cache=ref).logits
            assert torch.equal(a, b)
    # the prompt found nothing packed; the 11 steps after it took the C path
    assert calls == [False] * len(fast.layers) + [True] * 11 * len(fast.layers)


def test_bytes_account_for_codes_scales_sinks_and_window(model):
    cache = QuantizedKVCache(model.config, bits=4, **SPEC)
    with torch.no_grad():
        model(torch.randint(1, 128, (1, 100)), cache=cache)
    layer = cache.layers[0]
    b, h, d = 1, 2, 16
    n_packed, n_full = layer.packed_tokens, 4 + layer.keys.shape[-2]
    codes = 2 * n_packed * b * h * d // 2  # keys and values, two codes per byte
    scales = 2 * (n_packed // 16) * b * h * d * 2 + 2 * n_packed * b * h * 1 * 2  # keys per channel, values per token
    full = 2 * n_full * b * h * d * 4  # float32 model
    assert layer.nbytes() == codes + scales + full
    assert cache.nbytes() == 2 * layer.nbytes() and cache.allocated_bytes() >= cache.nbytes()


def test_a_long_prompt_leaves_no_full_precision_copy_behind(model):
    # The full-precision buffer grows to hold a prompt while it is packed; afterwards it gives
    # that memory back: holding sinks, window and a step, not the prompt's length.
    cache = QuantizedKVCache(model.config, bits=4, **SPEC)
    ids = torch.randint(1, 128, (1, 400))
    with torch.no_grad():
        model(ids[:, :390], cache=cache)
        model(ids[:, 390:], cache=cache)  # and a step after it
    layer = cache.layers[0]
    steady = 4 + 16 + 2 * 16  # sinks, window, two groups
    assert all(buf.shape[-2] <= 2 * steady for buf in layer._dense)  # it held 390 tokens
    assert layer.packed_tokens + 4 + layer.keys.shape[-2] == 400  # every token kept, once


def test_a_step_that_needs_gradients_keeps_them(model):
    # The CPU kernel has no backward: a step with gradients on takes the torch path, so the
    # query projection gets the gradient the dequantized history gives (it got none, silently).
    import copy

    prefilled = QuantizedKVCache(model.config, bits=4, **SPEC)
    with torch.no_grad():
        model(torch.randint(1, 128, (1, 100), generator=torch.Generator().manual_seed(0)), cache=prefilled)
    assert prefilled.layers[0].packed_tokens > 0
    q_proj = model.model.layers[0].self_attn.q_proj
    for n in (1, 3):
        step = torch.randint(1, 128, (1, n), generator=torch.Generator().manual_seed(n))
        grads = []
        for ctx in (contextlib.nullcontext, reference_path):
            model.zero_grad()
            with ctx():
                model(step, cache=copy.deepcopy(prefilled)).logits.sum().backward()
            grads.append(q_proj.weight.grad.clone())
        assert grads[0].abs().sum() > 0
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


def test_refuses_models_it_cannot_serve():
    with pytest.raises(ModelError, match="does not generate"):
        enable_kv_cache(make_tiny_bert())
    config = make_model().config
    config.layer_types = ["sliding_attention", "sliding_attention"]
    with pytest.raises(ModelError, match="quantizes full-attention layers, and this model has none"):
        QuantizedKVCache(config)
    config.layer_types = ["linear_attention", "full_attention"]
    with pytest.raises(ModelError, match=r"also has layer types \['linear_attention'\]"):
        QuantizedKVCache(config)


HYBRIDS = {
    "gemma3": ("gemma3_text", dict(sliding_window=16, sliding_window_pattern=2)),
    "qwen2-sliding": ("qwen2", dict(use_sliding_window=True, sliding_window=16, max_window_layers=1)),
    "llama4-chunked": ("llama4_text", dict(num_local_experts=4, attention_chunk_size=16, intermediate_size_mlp=96)),
}


@pytest.mark.parametrize("name", HYBRIDS)
def test_hybrid_models_quantize_their_full_attention_layers(name):
    """Gemma 3, Qwen 2 with sliding windows, Llama 4: the full-attention layers' caches are
    packed, the windowed layers keep transformers' own float caches (bounded by the window),
    and at 8 bits greedy decoding of a left-padded batch past the window gives the float
    cache's tokens."""
    model_type, extra = HYBRIDS[name]
    model = make_tiny_hybrid(model_type, **extra)
    enable_kv_cache(model, bits=8, group_size=16, residual_length=8, sink_tokens=0)
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    kw = dict(attention_mask=mask, max_new_tokens=40, do_sample=False, return_dict_in_generate=True)
    with torch.no_grad():
        want = model.generate(ids, cache=DynamicCache(config=model.config), **kw)
        got = model.generate(ids, **kw)
    assert torch.equal(got.sequences, want.sequences)
    cache = got.past_key_values
    full = [t == "full_attention" for t in model.config.layer_types]
    assert [isinstance(layer, kv_cache.QuantizedKVLayer) for layer in cache.layers] == full
    for layer, is_full in zip(cache.layers, full, strict=True):
        if is_full:
            assert layer.packed_tokens >= 64  # 80 tokens less the window
        else:
            assert layer.keys.shape[-2] < 80  # the window's float tokens only
    assert cache.nbytes() > 0


def test_a_checkpoints_default_cache_implementation_gives_way_to_ours(tmp_path):
    """A checkpoint whose generation_config names cache_implementation="static" (a fixed-size
    float cache, for compiled decoding): generate built it and never ours. The KV stage takes
    its place as the default (also after a reload); disable_kv_cache gives it back."""
    from transformers import AutoModelForCausalLM

    import hfcompress

    model = make_tiny_hybrid("gemma3_text", sliding_window=16, sliding_window_pattern=2)
    model.generation_config.cache_implementation = "static"
    stage = {"technique": "kv_cache", "bits": 4, "group_size": 16, "residual_length": 16}
    hfcompress.compress(model, [stage], progress=False)
    ids = torch.randint(3, 128, (1, 60), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=10, do_sample=False, return_dict_in_generate=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "named cache" warning: nothing was named in the call
        out = model.generate(ids, **kw)
    assert any(isinstance(layer, kv_cache.QuantizedKVLayer) for layer in out.past_key_values.layers)
    hfcompress.save_pretrained(model, tmp_path / "m", card=False)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    again = reloaded.generate(ids, **kw)
    assert any(isinstance(layer, kv_cache.QuantizedKVLayer) for layer in again.past_key_values.layers)
    assert torch.equal(again.sequences, out.sequences)
    disable_kv_cache(model)
    assert model.generation_config.cache_implementation == "static"


def test_a_hybrid_model_with_every_technique_reloads_and_decodes_the_same(tmp_path):
    """Gemma 3 with GPTQ W4A8, block-sparse prefills and the 4-bit cache on its full-attention
    layers: saved, reloaded, and greedy decoding past the window gives the same tokens."""
    from transformers import AutoModelForCausalLM

    import hfcompress

    model = make_tiny_hybrid("gemma3_text", sliding_window=16, sliding_window_pattern=2)
    stages = [
        {"name": "w", "technique": "gptq", "bits": 4, "group_size": 16, "ignore": ["lm_head"]},
        {"name": "a", "technique": "int8_activations"},
        {"name": "b", "technique": "block_sparse", "density": 0.5, "block_size": 16, "min_tokens": 64},
        {"name": "k", "technique": "kv_cache", "bits": 4, "group_size": 16, "residual_length": 16},
    ]
    calibration = torch.randint(3, 128, (4, 64), generator=torch.Generator().manual_seed(0))
    hfcompress.compress(model, {"stages": stages}, calibration_data=calibration, progress=False)
    hfcompress.save_pretrained(model, tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    ids = torch.randint(3, 128, (1, 100), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=20, do_sample=False, return_dict_in_generate=True)
    with torch.no_grad():
        want, got = model.generate(ids, **kw), reloaded.generate(ids, **kw)
    assert torch.equal(got.sequences, want.sequences)
    assert [type(layer).__name__ for layer in got.past_key_values.layers] == [
        "DynamicSlidingWindowLayer", "QuantizedKVLayer", "DynamicSlidingWindowLayer", "QuantizedKVLayer"
    ]  # fmt: skip


def test_multi_head_latent_attention_is_refused():
    """DeepSeek-V3's keys (24 channels here) and values (16) differ in shape: generate crashed
    inside the cache with a shape error."""
    mla = dict(kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
               n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1,
               n_group=1, topk_group=1, num_key_value_heads=4)  # fmt: skip
    model = make_tiny_causal("deepseek_v3", **mla)
    with pytest.raises(ModelError, match="multi-head latent attention"):
        enable_kv_cache(model, bits=8)
    ids = torch.randint(3, 128, (1, 20))
    with pytest.raises(ModelError, match="keys and values of one shape"), torch.no_grad():
        model.generate(ids, cache=QuantizedKVCache(model.config, bits=8, group_size=32), max_new_tokens=2)


def test_models_whose_attention_is_not_sdpa_are_refused():
    """Gemma 2 soft-caps its attention logits and runs eagerly: our attention (SDPA's) would
    drop the cap in decoding steps, silently."""
    model = make_tiny_hybrid("gemma2", sliding_window=16)
    with pytest.raises(ModelError, match="Gemma2ForCausalLM's attention is not SDPA's"):
        enable_kv_cache(model, bits=4)


def test_refuses_a_group_that_does_not_fit_the_head_dim(tiny_llama):
    # head dim 20: groups of 16 channels do not tile it; 32 (one group per token) does
    with pytest.raises(ModelError, match="head dim 20"):
        enable_kv_cache(tiny_llama, group_size=16)
    with pytest.raises(ModelError, match="head dim 20"):
        QuantizedKVCache(tiny_llama.config, group_size=16)
    enable_kv_cache(tiny_llama, group_size=32, residual_length=8, sink_tokens=2)
    ids = torch.randint(1, 128, (1, 40))
    with torch.no_grad():
        got = tiny_llama.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0)
        with reference_path():
            want = tiny_llama.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_path_on_gpu_equals_the_reference_path():
    model = make_model().cuda()
    enable_kv_cache(model, bits=4, **SPEC)
    for ids in _prompts(3):
        ids = ids.cuda()
        got = _generate(model, ids, QuantizedKVCache(model.config, bits=4, **SPEC))
        with reference_path():
            want = _generate(model, ids, QuantizedKVCache(model.config, bits=4, **SPEC))
        assert torch.equal(got, want)


def test_a_deep_copy_keeps_the_cache_on_its_own_config(model):
    import copy

    clone = copy.deepcopy(model)
    ids = _prompts(1)[0]
    out = clone.generate(ids, max_new_tokens=30, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    assert isinstance(cache, QuantizedKVCache) and cache._config is clone.config
    assert torch.equal(out.sequences, _generate(model, ids, max_new_tokens=30))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_for_the_full_precision_only_steps_equals_attend_dense(dtype):
    # Before anything is packed a step's keys are all full precision, and SDPA serves it: the
    # same float32 output as attend_dense, a fully masked row 0 (not NaN), and gradients.
    from hfcompress.quant.kv import attend_dense

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 16, generator=g).to(dtype).requires_grad_()
    k, v = (torch.randn(2, 2, 9, 16, generator=g).to(dtype) for _ in range(2))
    bias = kv_attention._bias(None, 2, 5, 9, q.device)
    bias[1, 0] = float("-inf")  # a padded query row sees no key
    for b in (None, bias):
        want = attend_dense(q, k, v, b, 0.25).out
        got = kv_attention._attend_sdpa(q, k, v, b, 0.25)
        assert got.dtype == torch.float32 and not got.isnan().any()
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    assert got[1, :, 0].abs().max() == 0
    (grad_got,) = torch.autograd.grad(got.sum(), q)
    (grad_want,) = torch.autograd.grad(want.sum(), q)
    torch.testing.assert_close(grad_got, grad_want, atol=2e-6, rtol=1e-5)
    q_nan = q.detach().clone()
    q_nan[0, 1, 2, 3] = float("nan")  # a NaN in the inputs stays NaN in its row (it was set to 0)
    out = kv_attention._attend_sdpa(q_nan, k, v, bias, 0.25)
    assert out[0, 1, 2].isnan().all() and out[1, :, 0].abs().max() == 0


@pytest.mark.parametrize(
    "drop",
    [0, 5, 24, 30, 40, 58],
    ids=["none", "in-window", "whole-window", "into-a-group", "a-whole-group", "into-the-sinks"],
)
def test_crop_keeps_exactly_the_first_tokens_and_decoding_goes_on(model, drop):
    """Assisted and prompt-lookup decoding drop rejected draft tokens with ``crop``: the kept
    tokens read back as they did before (a cut packed group's survivors return to the window
    as their dequantized values, which is what was read for them), and decoding goes on as on
    the reference path."""
    ids = torch.randint(1, 128, (1, 60), generator=torch.Generator().manual_seed(4))
    cache = QuantizedKVCache(model.config, bits=4, **SPEC)
    with torch.no_grad():
        model(ids[:, :50], cache=cache)
        for t in range(50, 60):  # and decoding steps
            model(ids[:, t : t + 1], cache=cache)
    layer = cache.layers[0]
    layer.commit()
    assert (layer._sinks, layer.packed_tokens, layer._window) == (4, 32, 24)
    keys, values = (t.clone() for t in layer.history())
    cache.crop(-drop)
    assert cache.get_seq_length() == 60 - drop
    k2, v2 = layer.history()
    assert torch.equal(k2, keys[..., : 60 - drop, :]) and torch.equal(v2, values[..., : 60 - drop, :])
    # decoding on from the cropped cache: the fused path equals the reference path
    more = torch.randint(1, 128, (1, 30), generator=torch.Generator().manual_seed(5))
    twin = copy.deepcopy(cache)
    with torch.no_grad():
        got = [model(more[:, t : t + 1], cache=cache).logits for t in range(30)]
        with reference_path():
            want = [model(more[:, t : t + 1], cache=twin).logits for t in range(30)]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert cache.get_seq_length() == 90 - drop and layer.packed_tokens + layer._sinks + layer._window == 90 - drop


@pytest.mark.parametrize("assistant", ["prompt_lookup", "assistant_model"])
def test_assisted_decoding(model, assistant):
    """transformers refused it (a cache that cannot be cropped). With an 8-bit cache it gives
    what the float cache gives; with a 4-bit one, what the reference path gives."""
    g = torch.Generator().manual_seed(6)
    phrase = torch.randint(1, 128, (1, 12), generator=g)
    ids = torch.cat([phrase, torch.randint(1, 128, (1, 5), generator=g), phrase, phrase[:, :4]], 1)  # repeats
    kw = dict(max_new_tokens=40)
    if assistant == "prompt_lookup":
        kw["prompt_lookup_num_tokens"] = 6
    else:
        kw["assistant_model"] = make_model(seed=1)
    want = _generate(model, ids, DynamicCache(config=model.config), **kw)
    assert torch.equal(_generate(model, ids, QuantizedKVCache(model.config, bits=8, **SPEC), **kw), want)
    fused = _generate(model, ids, QuantizedKVCache(model.config, bits=4, **SPEC), **kw)
    with reference_path():
        assert torch.equal(_generate(model, ids, QuantizedKVCache(model.config, bits=4, **SPEC), **kw), fused)
