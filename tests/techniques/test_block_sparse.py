"""Block-sparse attention as a stage: each layout changes the model, saves and reloads with the
same logits; padding, generation and gradients; the kernel path inside a model; refusals."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import hfcompress
from hfcompress import CalibrationDataError, RecipeError, compress
from hfcompress.techniques.block_sparse import BlockSparseConfig, disable_block_sparse, enable_block_sparse
from hfcompress.techniques.block_sparse import attention as bsa
from hfcompress.techniques.kv_cache import KVCacheConfig
from tests.conftest import make_tiny_bert, make_tiny_llama

LAYOUTS = ["dynamic", "calibrated", "local", "bigbird", "pooled", "oracle"]


def _ids(batch=2, length=64, vocab=128, seed=1):
    return torch.randint(2, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _config(layout, **kw):
    return BlockSparseConfig(layout=layout, density=kw.pop("density", 0.4), block_size=16, **kw)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_changes_the_model_and_reloads_with_the_same_logits(layout, tmp_path):
    model = make_tiny_llama()
    ids = _ids()
    dense = model(ids).logits
    compress(model, [_config(layout)], calibration_data=_ids(4, seed=3), progress=False)
    logits = model(ids).logits
    assert torch.isfinite(logits).all() and (logits - dense).abs().max() > 1e-3
    # Only the tiles a dense attention computes in the first block are the same: the first
    # block's rows see only the first (kept) key block.
    torch.testing.assert_close(logits[:, :16], dense[:, :16], atol=1e-5, rtol=0)
    hfcompress.save_pretrained(model, tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert reloaded.config._attn_implementation == bsa.ATTENTION
    assert (reloaded(ids).logits - logits).abs().max() <= 1e-5


def test_full_density_is_dense_attention():
    model = make_tiny_llama()
    ids = _ids()
    dense = model(ids).logits
    enable_block_sparse(model, _config("dynamic", density=1.0))
    torch.testing.assert_close(model(ids).logits, dense, atol=1e-5, rtol=0)
    disable_block_sparse(model)
    assert model.config._attn_implementation == "sdpa"


def test_sequences_shorter_than_min_tokens_attend_densely():
    dense, model = make_tiny_llama(), make_tiny_llama()
    enable_block_sparse(model, _config("local", min_tokens=96))
    short, long = _ids(1, 80), _ids(1, 96)
    assert torch.equal(model(short).logits, dense(short).logits)
    assert (model(long).logits - dense(long).logits).abs().max() > 1e-3
    with pytest.raises(RecipeError, match="min_tokens=-1"):
        _config("local", min_tokens=-1)


def test_layout_with_every_tile_kept_through_the_sparse_path_is_dense():
    # density 1.0 takes the dense shortcut; two blocks, the first a sink, keep every tile through
    # the layout and the masked attention, and must give the dense logits.
    model = make_tiny_llama()
    ids = _ids()
    dense = model(ids).logits
    enable_block_sparse(model, BlockSparseConfig(layout="local", density=0.999, block_size=32))
    assert all(s.config.density < 1 for s in bsa.states(model).values())
    sparse = model(ids).logits
    assert all(s.last_density == pytest.approx(1.0) for s in bsa.states(model).values())
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=0)


def test_calibrated_tables_travel_in_the_saved_config(tmp_path):
    model = make_tiny_llama()
    compress(model, [_config("calibrated")], calibration_data=_ids(4, seed=3), progress=False)
    tables = {n: s.table for n, s in bsa.states(model).items()}
    assert len(tables) == 2 and all(t.shape == (4, 1 + 2 * 4 - 1) for t in tables.values())
    hfcompress.save_pretrained(model, tmp_path / "m")
    assert "## Block-sparse attention" in (tmp_path / "m" / "README.md").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    for name, state in bsa.states(reloaded).items():
        assert torch.equal(state.table, tables[name])


def test_encoder_right_padding_leaves_the_real_tokens_as_alone():
    # A fixed layout: a padded sequence in a batch gives its real tokens the same outputs as
    # the sequence alone (the padding mask and the layout combine).
    model = make_tiny_bert(vocab=100)
    enable_block_sparse(model, BlockSparseConfig(layout="local", density=0.5, block_size=16))
    ids = torch.randint(2, 100, (2, 64), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 40:] = 0
    ids[1, 40:] = 0

    def last_hidden(**inputs):
        return model(**inputs, output_hidden_states=True).hidden_states[-1]

    batch = last_hidden(input_ids=ids, attention_mask=mask)
    alone = last_hidden(input_ids=ids[1:, :40])
    torch.testing.assert_close(batch[1:, :40], alone, atol=1e-5, rtol=0)
    # ... and the layout matters: a dense BERT gives other hidden states.
    disable_block_sparse(model)
    assert (last_hidden(input_ids=ids[1:, :40]) - alone).abs().max() > 1e-3


def test_encoder_reloads_sparse(tmp_path):
    model = make_tiny_bert()
    ids = torch.randint(2, 100, (2, 64), generator=torch.Generator().manual_seed(0))
    compress(model, [_config("dynamic")], progress=False)
    logits = model(ids).logits
    hfcompress.save_pretrained(model, tmp_path / "m")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m")
    assert (reloaded(ids).logits - logits).abs().max() <= 1e-5


def test_generate_prefills_sparse_and_decodes_densely():
    model = make_tiny_llama()
    enable_block_sparse(model, _config("dynamic"))
    ids = _ids(1, 48)
    first = model(ids).logits[0, -1].argmax()
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 52) and out[0, 48] == first


@pytest.mark.parametrize("layout", ["local", "dynamic", "pooled"])
def test_gradients_flow_through_the_sparse_attention_under_autocast(layout):
    # Training runs bf16 autocast (the Trainer's bf16=True): the estimators still score in float32.
    model = make_tiny_llama().train()
    enable_block_sparse(model, _config(layout))
    ids = _ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("layout", ["dynamic", "local"])
def test_kernel_path_inside_the_model_equals_the_twin_path(layout, monkeypatch):
    # The Triton kernel (interpreted on CPU) behind the attention function: per-input [B, H]
    # layouts (dynamic) and shared [1, H] ones (local) give the twin's logits.
    model = make_tiny_llama()
    enable_block_sparse(model, _config(layout))
    ids = _ids()
    twin = model(ids).logits
    monkeypatch.setattr(bsa, "_use_kernel", lambda *args: True)
    torch.testing.assert_close(model(ids).logits, twin, atol=1e-4, rtol=0)


def test_config_refuses_bad_values():
    with pytest.raises(RecipeError, match="density=0"):
        BlockSparseConfig(density=0)
    with pytest.raises(RecipeError, match="samples=100"):
        BlockSparseConfig(samples=100, block_size=64)
    with pytest.raises(RecipeError, match="block_size"):
        BlockSparseConfig.from_dict({"block_size": 48})
    assert BlockSparseConfig.from_dict(BlockSparseConfig(layout="local").to_dict()) == BlockSparseConfig(layout="local")


def test_calibration_refuses_an_attention_that_gives_nan():
    model = make_tiny_llama()
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight[3, 5] = float("nan")  # the last layer: one module
    with pytest.raises(hfcompress.ModelError, match=r"model\.layers\.1\.self_attn gave NaN"):
        compress(model, [_config("calibrated")], calibration_data=_ids(4, seed=3), progress=False)


def test_calibrated_layout_needs_calibration_data():
    with pytest.raises(CalibrationDataError, match="block_sparse"):
        compress(make_tiny_llama(), [_config("calibrated")], progress=False)


@pytest.mark.parametrize("kv_first", [False, True])
def test_block_sparse_composes_with_the_quantized_kv_cache(kv_first, tmp_path):
    from hfcompress.integrations.kv_cache import QuantizedKVCache, disable_kv_cache

    kv = KVCacheConfig(bits=4, group_size=32, residual_length=8)
    sparse_only = make_tiny_llama()
    enable_block_sparse(sparse_only, _config("dynamic"))
    ids = _ids(1, 64)
    want = sparse_only(ids).logits
    assert (want - make_tiny_llama()(ids).logits).abs().max() > 1e-3  # sparse changes the logits
    model = make_tiny_llama()
    compress(model, [kv, _config("dynamic")] if kv_first else [_config("dynamic"), kv], progress=False)
    assert model.config._attn_implementation == "hfcompress_kv"
    # A forward without a cache, and a prefill into the quantized cache, are block-sparse.
    torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=1e-5)
    cache = QuantizedKVCache(model.config, spec=kv)
    before = bsa.states(model)["model.layers.0.self_attn"].kept_tiles
    prefill = model(ids, cache=cache, use_cache=True).logits
    torch.testing.assert_close(prefill, want, rtol=0, atol=1e-5)
    assert bsa.states(model)["model.layers.0.self_attn"].kept_tiles > before and cache.get_seq_length() == 64
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert out[0, 64] == want[0, -1].argmax()
    hfcompress.save_pretrained(model, tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert reloaded.config._attn_implementation == "hfcompress_kv" and bsa.sparse_config(reloaded) is not None
    torch.testing.assert_close(reloaded(ids).logits, want, rtol=0, atol=1e-5)
    assert torch.equal(reloaded.generate(ids, max_new_tokens=12, do_sample=False), out)
    # Each switches off alone.
    disable_kv_cache(model)
    assert model.config._attn_implementation == "hfcompress_block_sparse"
    torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=1e-5)
    disable_block_sparse(model)
    assert model.config._attn_implementation == "sdpa"


def test_one_block_sparse_stage_per_model_and_two_inner_functions_do_not_compose():
    from hfcompress.integrations.attention import dense_attention, register_attention, switch_attention

    model = make_tiny_llama()
    with pytest.raises(RecipeError, match="one block_sparse stage is enough"):
        compress(model, [_config("local"), _config("dynamic")], progress=False)
    assert model.config._attn_implementation == "sdpa"
    compress(model, [_config("local")], progress=False)
    with pytest.raises(RecipeError, match="block-sparse already"):
        compress(model, [_config("dynamic")], progress=False)
    # Another function of the same kind (inner: it attends over the call's own keys) is refused.
    register_attention("test_inner", dense_attention)
    with pytest.raises(hfcompress.ModelError, match="cannot run beside it"):
        switch_attention(model, "test_inner", "a test attention")
    other = make_tiny_llama()
    switch_attention(other, "test_inner", "a test attention")
    with pytest.raises(RecipeError, match="already replaced in the same way"):
        compress(other, [_config("local")], progress=False)


def test_kept_density_counts_every_call_and_short_sequences_as_dense():
    model = make_tiny_llama()
    enable_block_sparse(model, _config("local", density=0.5))
    assert bsa.kept_density(model) is None
    model(_ids(1, 64))
    from hfcompress.techniques.block_sparse import layout as L

    want = L.density(bsa._fixed_layout(4, bsa.sparse_config(model), 4, True), causal=True)
    assert bsa.kept_density(model) == pytest.approx(want) and want < 0.75
    model(_ids(1, 16))  # one block: dense, 1 tile of 1 per head and layer
    states = bsa.states(model).values()
    assert bsa.kept_density(model) == pytest.approx((want * 10 + 1) / 11)
    assert all(s.total_tiles == 4 * (10 + 1) for s in states)


def test_dynamic_encoder_padding_leaves_the_real_tokens_as_alone():
    # The estimator sees only the real keys, so a padded sequence keeps the tiles it keeps
    # alone (per-row budgets: 2 key blocks of 3 alone, of 4 padded; no sinks, so nothing is
    # forced but the diagonal).
    model = make_tiny_bert(vocab=100)
    config = BlockSparseConfig(layout="dynamic", density=0.5, block_size=16, scope="row", sink_blocks=0)
    enable_block_sparse(model, config)
    ids = torch.randint(2, 100, (2, 64), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 48:] = 0
    ids[1, 48:] = 0
    batch = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    alone = model(input_ids=ids[1:, :48], output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(batch[1:, :48], alone, atol=1e-5, rtol=0)
    assert all(s.last_density == pytest.approx(6 / 9) for s in bsa.states(model).values())


def test_calibrated_layout_warns_on_inputs_longer_than_its_calibration(caplog):
    model = make_tiny_llama()
    compress(model, [_config("calibrated")], calibration_data=_ids(2, 32, seed=3), progress=False)
    with caplog.at_level("WARNING"):
        model(_ids(1, 64))
    assert "measured on sequences of 2 blocks; this one has 4" in caplog.text


@pytest.mark.parametrize("layout", ["dynamic", "calibrated"])
def test_hybrid_models_make_only_their_full_attention_layers_sparse(layout, tmp_path):
    """Gemma 3 alternating sliding-window and full-attention layers: the windowed layers keep
    their dense attention (layer 0's output equals the dense model's), the full-attention ones
    run sparse, calibrated tables exist for those only, and the model reloads with the same
    logits. A model of windowed layers only, or with layers of another kind, is refused."""
    from tests.conftest import make_tiny_hybrid

    dense = make_tiny_hybrid("gemma3_text", sliding_window=16, sliding_window_pattern=2)
    model = make_tiny_hybrid("gemma3_text", sliding_window=16, sliding_window_pattern=2)
    stage = {"name": "b", "technique": "block_sparse", "layout": layout, "density": 0.5, "block_size": 16}
    calibration = torch.randint(3, 128, (4, 96), generator=torch.Generator().manual_seed(1))
    compress(model, {"stages": [{**stage, "min_tokens": 16}]}, calibration_data=calibration, progress=False)
    states = bsa.states(model)
    assert [s.windowed for s in states.values()] == [True, False, True, False]
    if layout == "calibrated":
        assert [s.table is not None for s in states.values()] == [False, True, False, True]
    ids = torch.randint(3, 128, (2, 96), generator=torch.Generator().manual_seed(0))
    seen = {}
    hooks = [
        m.model.layers[0].self_attn.register_forward_hook(lambda _m, _a, out, key=key: seen.update({key: out[0]}))
        for key, m in (("sparse", model), ("dense", dense))
    ]
    with torch.no_grad():
        logits, dense_logits = model(ids).logits, dense(ids).logits
    for hook in hooks:
        hook.remove()
    assert torch.equal(seen["sparse"], seen["dense"])
    assert [s.last_density for s in states.values()][1::2] == [pytest.approx(0.524, abs=1e-3)] * 2
    assert not torch.allclose(logits, dense_logits, atol=1e-3)
    hfcompress.save_pretrained(model, tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "m")(ids).logits, logits)

    windowed_only = make_tiny_hybrid("gemma3_text", sliding_window=16, sliding_window_pattern=6)
    with pytest.raises(hfcompress.ModelError, match="replaces full attention, and this model has none"):
        enable_block_sparse(windowed_only, density=0.5)
    windowed_only.config.layer_types = ["linear_attention", *windowed_only.config.layer_types[1:]]
    with pytest.raises(hfcompress.ModelError, match=r"also has layer types \['linear_attention'\]"):
        enable_block_sparse(windowed_only, density=0.5)
