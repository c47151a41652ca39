"""Attention over a cache in parts (hfcompress.quant.kv) and the CPU decode kernel (kv_cpu)."""

import itertools

import pytest
import torch
from hfcompress_triton.kv_ref import kv_decode_attention_ref, kv_dequantize_ref, kv_quantize_ref

from hfcompress.quant import kv_cpu, native
from hfcompress.quant.kv import PackedKV, attend_dense, attend_packed, merge


def _attention(q, k, v, bias, scale):
    r = q.shape[1] // k.shape[1]
    s = q @ k.repeat_interleave(r, 1).transpose(-1, -2) * scale + bias[:, None]
    return torch.softmax(s, -1) @ v.repeat_interleave(r, 1)


def test_parts_merge_to_attention_over_the_whole_sequence():
    g = torch.Generator().manual_seed(0)
    b, hq, hkv, nq, t, d = 2, 6, 2, 5, 40, 16
    q = torch.randn(b, hq, nq, d, generator=g)
    k, v = torch.randn(b, hkv, t, d, generator=g), torch.randn(b, hkv, t, d, generator=g)
    bias = torch.zeros(b, nq, t)
    bias[0, :, :7] = float("-inf")  # padding
    bias[1, :, 10:20] = float("-inf")  # a part fully masked for row 1
    cuts = [0, 10, 20, 33, t]
    parts = [attend_dense(q, k[:, :, a:z], v[:, :, a:z], bias[..., a:z], 0.25) for a, z in itertools.pairwise(cuts)]
    merged = merge(parts)
    torch.testing.assert_close(merged.out, _attention(q, k, v, bias, 0.25), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        merged.lse,
        torch.logsumexp(q @ k.repeat_interleave(3, 1).transpose(-1, -2) * 0.25 + bias[:, None], -1),
        rtol=1e-5,
        atol=1e-5,
    )


def test_gradients_through_merged_parts_with_fully_masked_rows_are_finite():
    # A padded query row that sees no key (in one part, or in all) weighs nothing: its output and
    # its gradients are 0, not NaN, and the other rows get the gradients of plain attention.
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 3, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 2, 12, 8, generator=g, requires_grad=True) for _ in range(2))
    bias = torch.zeros(2, 3, 12)
    bias[0, 1] = float("-inf")  # sees no key at all
    bias[1, 2, :5] = float("-inf")  # sees no key of the first part
    got = merge([attend_dense(q, k[:, :, a:z], v[:, :, a:z], bias[..., a:z], 0.5) for a, z in ((0, 5), (5, 12))])
    assert got.out[0, :, 1].abs().max() == 0 and got.lse[0, :, 1].isneginf().all()
    live = torch.ones(2, 1, 3, 1)
    live[0, :, 1] = 0
    grads = torch.autograd.grad((got.out * live).square().sum(), (q, k, v))
    seen = bias.clone()
    seen[0, 1] = 0  # plain softmax makes NaNs of that row, which its 0 weight in the loss cannot undo
    want = torch.autograd.grad((_attention(q, k, v, seen, 0.5) * live).square().sum(), (q, k, v))
    for a, b in zip(grads, want, strict=True):
        assert a.isfinite().all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_chunked_packed_attention_equals_dequantize_then_attend(bits):
    g = torch.Generator().manual_seed(1)
    b, hq, hkv, nq, t, d, group = 1, 4, 2, 3, 256, 32, 32
    k, v = torch.randn(b, hkv, t, d, generator=g), torch.randn(b, hkv, t, d, generator=g)
    packed = PackedKV(
        *kv_quantize_ref(k, bits, group, "channel"), *kv_quantize_ref(v, bits, group, "token"), bits, group
    )
    q = torch.randn(b, hq, nq, d, generator=g)
    bias = torch.zeros(b, nq, t)
    bias[..., :5] = float("-inf")
    kd, vd = packed.dequantize()
    got = attend_packed(q, packed, bias, 0.3, chunk_tokens=64)  # 4 chunks
    torch.testing.assert_close(got.out, _attention(q, kd, vd, bias, 0.3), rtol=1e-5, atol=1e-6)


needs_compiler = pytest.mark.skipif(not kv_cpu.available(), reason="no C compiler: the torch path serves instead")


@needs_compiler
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize(
    ("bits", "group", "d"),
    [(4, 64, 64), (2, 16, 64), (8, 32, 32), (4, 128, 64), (4, 16, 64), (4, 8, 24)],
    ids=["b4-g64", "b2-g16", "b8-g32-d32", "b4-g128", "b4-g16", "b4-g8-d24-plain-loops"],
)
def test_cpu_kernel_matches_reference(bits, group, d, scale_dtype):
    g = torch.Generator().manual_seed(2)
    b, hq, hkv, t = 2, 6, 2, 256
    k, v = torch.randn(b, hkv, t, d, generator=g) * 3, torch.randn(b, hkv, t, d, generator=g)
    parts = (
        *kv_quantize_ref(k, bits, group, "channel", scale_dtype),
        *kv_quantize_ref(v, bits, group, "token", scale_dtype),
    )
    q = torch.randn(b, hq, 1, d, generator=g)
    bias = torch.zeros(b, t)
    bias[1, :37] = float("-inf")
    out, lse = kv_cpu.kv_decode_attention_cpu(q, *parts, bias, bits, group, 0.125)
    want_out, want_lse = kv_decode_attention_ref(q, *parts, bias, bits, group, 0.125)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)  # float32 sums in another order
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)


def _cpu_has(*flags: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            line = next(line for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return set(flags) <= set(line.split())


@needs_compiler
def test_cpu_kernel_takes_its_vector_path_for_the_caches_shapes_on_avx2():
    shapes = [(4, 64, 64), (2, 64, 16), (8, 64, 64), (4, 128, 64), (4, 32, 32)]  # (bits, head dim, group)
    if _cpu_has("avx2", "fma"):
        assert all(kv_cpu.vector_path(*shape) for shape in shapes)
    assert not kv_cpu.vector_path(4, 24, 8)  # 12-byte rows: the plain loops


@needs_compiler
@pytest.mark.parametrize(
    ("bits", "group", "d", "r", "td"),
    [(4, 64, 64, 3, 13), (4, 64, 128, 5, 0), (2, 16, 64, 8, 1), (8, 32, 32, 1, 8), (4, 16, 16, 4, 21)],
    ids=["b4-d64-r3", "b4-d128-r5-two-value-groups", "b2-r8", "b8-d32-r1", "b4-d16-r4"],
)
def test_cpu_kernel_vector_path_shapes_equal_the_merged_parts(bits, group, d, r, td):
    # Query heads per KV head beyond the 4 the value sums keep in registers, two value groups
    # per head, a dense part that is not a multiple of the 8 tokens scored at once.
    g = torch.Generator().manual_seed(6)
    b, hkv, t = 2, 2, 3 * group
    k, v = torch.randn(b, hkv, t, d, generator=g) * 2, torch.randn(b, hkv, t, d, generator=g)
    parts = (*kv_quantize_ref(k, bits, group, "channel"), *kv_quantize_ref(v, bits, group, "token"))
    dk, dv = torch.randn(b, hkv, td, d, generator=g), torch.randn(b, hkv, td, d, generator=g)
    q = torch.randn(b, hkv * r, 1, d, generator=g)
    bias, dense_bias = torch.zeros(b, t), torch.zeros(b, td)
    bias[1, : group + 3] = float("-inf")
    dense = (dk, dv, dense_bias) if td else (None, None, None)
    out, lse = kv_cpu.kv_decode_attention_cpu(q, *parts, bias, bits, group, 0.3, *dense)
    want = [attend_packed(q, PackedKV(*parts, bits, group), bias[:, None], 0.3)]
    if td:
        want.append(attend_dense(q, dk, dv, dense_bias[:, None], 0.3))
    torch.testing.assert_close(out, merge(want).out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, merge(want).lse, rtol=1e-5, atol=1e-5)


@needs_compiler
def test_cpu_kernel_softmax_underflow_and_nan():
    # Scores hundreds apart: most weights underflow to 0 (the vector exp flushes below -87.3,
    # as expf does); a NaN in the query stays NaN in its row's output, not a finite value.
    g = torch.Generator().manual_seed(7)
    b, hkv, t, d, group = 1, 1, 128, 64, 64
    k, v = torch.randn(b, hkv, t, d, generator=g) * 20, torch.randn(b, hkv, t, d, generator=g)
    parts = (*kv_quantize_ref(k, 4, group, "channel"), *kv_quantize_ref(v, 4, group, "token"))
    q = torch.randn(b, 2, 1, d, generator=g) * 20
    q[0, 1, 0, 5] = float("nan")
    out, lse = kv_cpu.kv_decode_attention_cpu(q, *parts, None, 4, group, 1.0)
    want_out, want_lse = kv_decode_attention_ref(q, *parts, None, 4, group, 1.0)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert out[0, 1].isnan().all() and lse[0, 1].isnan().all()  # the reference's too (it gave 0)


@needs_compiler
def test_cpu_kernel_reads_bfloat16_and_writes_the_requested_dtype():
    # A bfloat16 model's query and dense part go in as they are and the output comes out in
    # bfloat16, rounded once from the float32 sums: the float32 result of the same values, rounded.
    g = torch.Generator().manual_seed(8)
    b, hkv, t, td, d, group = 2, 3, 128, 11, 64, 64
    k, v = torch.randn(b, hkv, t, d, generator=g), torch.randn(b, hkv, t, d, generator=g)
    parts = (*kv_quantize_ref(k, 4, group, "channel"), *kv_quantize_ref(v, 4, group, "token"))
    q = torch.randn(b, 3 * hkv, 1, d, generator=g).bfloat16()
    dk, dv = torch.randn(b, hkv, td, d, generator=g).bfloat16(), torch.randn(b, hkv, td, d, generator=g).bfloat16()
    args = (*parts, None, 4, group, 0.125, dk, dv, None)
    want, want_lse = kv_cpu.kv_decode_attention_cpu(q.float(), *args[:-3], dk.float(), dv.float(), None)
    got, lse = kv_cpu.kv_decode_attention_cpu(q, *args, out_dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16 and want.dtype == torch.float32
    torch.testing.assert_close(got, want.bfloat16(), rtol=0, atol=0)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=0)
    as_float, _ = kv_cpu.kv_decode_attention_cpu(q, *args)  # the default output: float32
    torch.testing.assert_close(as_float, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        kv_cpu.kv_decode_attention_cpu(q, *args, out_dtype=torch.float16)


@needs_compiler
def test_cpu_kernel_reads_views_of_buffers_with_spare_capacity_and_masked_rows():
    g = torch.Generator().manual_seed(3)
    b, hq, hkv, t, d, group = 2, 4, 2, 128, 32, 32
    k, v = torch.randn(b, hkv, 2 * t, d, generator=g), torch.randn(b, hkv, 2 * t, d, generator=g)
    full = (*kv_quantize_ref(k, 4, group, "channel"), *kv_quantize_ref(v, 4, group, "token"))
    parts = [p[:, :, : t // group] if i in (1, 2) else p[:, :, :t] for i, p in enumerate(full)]
    assert not parts[0].is_contiguous()
    q = torch.randn(b, hq, 1, d, generator=g)
    bias = torch.zeros(b, t)
    bias[0] = float("-inf")
    out, lse = kv_cpu.kv_decode_attention_cpu(q, *parts, bias, 4, group, 0.2)
    want_out, _ = kv_decode_attention_ref(q, *[p.contiguous() for p in parts], bias, 4, group, 0.2)
    assert torch.isneginf(lse[0]).all() and (out[0] == 0).all()
    torch.testing.assert_close(out[1], want_out[1], rtol=1e-5, atol=1e-5)


@needs_compiler
@pytest.mark.parametrize("n_queries", [2, 7, 40], ids=lambda n: f"Q{n}")
def test_cpu_kernel_takes_several_query_tokens_with_a_causal_dense_part(n_queries):
    # A chunk of a prompt (or a chat's next turn) over a cache: every query sees the packed
    # keys alike (padding only), and the dense part (sinks, window, the chunk itself) with a
    # causal bias of its own. 40 queries of 3 heads exceed one call's 64 rows: two calls.
    g = torch.Generator().manual_seed(9)
    b, hq, hkv, t, d, group, window = 2, 6, 2, 192, 64, 64, 11
    td = window + n_queries
    k, v = torch.randn(b, hkv, t, d, generator=g) * 2, torch.randn(b, hkv, t, d, generator=g)
    parts = (*kv_quantize_ref(k, 4, group, "channel"), *kv_quantize_ref(v, 4, group, "token"))
    dk, dv = torch.randn(b, hkv, td, d, generator=g), torch.randn(b, hkv, td, d, generator=g)
    q = torch.randn(b, hq, n_queries, d, generator=g)
    bias = torch.zeros(b, t)
    bias[1, :70] = float("-inf")  # left padding of row 1
    causal = torch.ones(n_queries, td, dtype=torch.bool).tril(diagonal=window)
    dense_bias = torch.zeros(b, n_queries, td).masked_fill(~causal, float("-inf"))
    out, lse = kv_cpu.kv_decode_attention_cpu(q, *parts, bias, 4, group, 0.2, dk, dv, dense_bias)
    packed = PackedKV(*parts, 4, group)
    want = merge([attend_packed(q, packed, bias[:, None], 0.2), attend_dense(q, dk, dv, dense_bias, 0.2)])
    assert out.shape == (b, hq, n_queries, d) and lse.shape == (b, hq, n_queries)
    torch.testing.assert_close(out, want.out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want.lse, rtol=1e-5, atol=1e-5)
    q16, dk16, dv16 = q.bfloat16(), dk.bfloat16(), dv.bfloat16()
    out16, _ = kv_cpu.kv_decode_attention_cpu(q16, *parts, bias, 4, group, 0.2, dk16, dv16, dense_bias, torch.bfloat16)
    want16, _ = kv_cpu.kv_decode_attention_cpu(
        q16.float(), *parts, bias, 4, group, 0.2, dk16.float(), dv16.float(), dense_bias
    )
    torch.testing.assert_close(out16, want16.bfloat16(), rtol=0, atol=0)


@needs_compiler
def test_cpu_kernel_refuses_more_query_heads_per_kv_head_than_it_holds():
    parts = (
        *kv_quantize_ref(torch.randn(1, 1, 32, 16), 4, 32, "channel"),
        *kv_quantize_ref(torch.randn(1, 1, 32, 16), 4, 32, "token"),
    )
    with pytest.raises(ValueError, match="at most 64 query heads per KV head"):
        kv_cpu.kv_decode_attention_cpu(torch.randn(1, 65, 1, 16), *parts, None, 4, 32, 0.2)


DEQUANTIZE_CASES = [
    (4, 64, 64, torch.bfloat16),
    (2, 16, 64, torch.float16),
    (8, 32, 128, torch.float32),
    (4, 128, 64, torch.bfloat16),
]


@needs_compiler
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "bits,group,d,scale_dtype", DEQUANTIZE_CASES, ids=["kv4-bf16", "kv2-fp16", "kv8-d128-fp32", "kv4-g128"]
)
def test_cpu_dequantize_is_the_reference_bit_for_bit(bits, group, d, scale_dtype, out_dtype):
    """kv_dequantize writes kv_dequantize_ref's values exactly (float32 products and sums rounded
    separately, one rounding to the output dtype), into a view of a larger buffer, and nothing
    past the packed tokens."""
    g = torch.Generator().manual_seed(bits)
    k, v = torch.randn(2, 3, 256, d, generator=g) * 3, torch.randn(2, 3, 256, d, generator=g)
    parts = (
        *kv_quantize_ref(k, bits, group, "channel", scale_dtype),
        *kv_quantize_ref(v, bits, group, "token", scale_dtype),
    )
    args = kv_cpu.PackedArgs.of(*parts, bits, group)
    buf = torch.full((2, 2, 3, 300, d), float("nan"), dtype=out_dtype)
    args.dequantize_into(buf[0, :, :, 10:], buf[1, :, :, 10:])  # a view at an offset, spare room after
    want_k = kv_dequantize_ref(*parts[:3], bits, group, "channel", out_dtype)
    want_v = kv_dequantize_ref(*parts[3:], bits, group, "token", out_dtype)
    assert torch.equal(buf[0, :, :, 10:266], want_k) and torch.equal(buf[1, :, :, 10:266], want_v)
    assert buf[:, :, :, :10].isnan().all() and buf[:, :, :, 266:].isnan().all()


@needs_compiler
def test_cpu_dequantize_refuses_what_it_cannot_write():
    parts = (
        *kv_quantize_ref(torch.randn(1, 2, 64, 16), 4, 32, "channel"),
        *kv_quantize_ref(torch.randn(1, 2, 64, 16), 4, 32, "token"),
    )
    args = kv_cpu.PackedArgs.of(*parts, 4, 32)
    for out in (torch.empty(1, 2, 64, 16, dtype=torch.float16), torch.empty(1, 2, 63, 16), torch.empty(1, 3, 64, 16)):
        with pytest.raises(ValueError, match="cannot dequantize 1 x 2 heads of 64 packed tokens"):
            args.dequantize_into(out, out.clone())


@needs_compiler
def test_cpu_kernel_refuses_a_query_batch_the_cache_does_not_hold():
    """The kernel reads as many batch rows of the packed part as q has: more would read past it."""
    parts = (
        *kv_quantize_ref(torch.randn(1, 1, 32, 16), 4, 32, "channel"),
        *kv_quantize_ref(torch.randn(1, 1, 32, 16), 4, 32, "token"),
    )
    with pytest.raises(ValueError, match=r"one batch: q \(2, 2, 1, 16\), 1 rows of 1 KV heads"):
        kv_cpu.kv_decode_attention_cpu(torch.randn(2, 2, 1, 16), *parts, None, 4, 32, 0.2)
    dense = torch.randn(2, 1, 5, 16)
    with pytest.raises(ValueError, match="dense keys"):
        kv_cpu.kv_decode_attention_cpu(torch.randn(1, 2, 1, 16), *parts, None, 4, 32, 0.2, dense, dense)


@needs_compiler
def test_cpu_kernel_refuses_a_partial_key_group():
    parts = (
        *kv_quantize_ref(torch.randn(1, 1, 64, 16), 4, 32, "channel"),
        *kv_quantize_ref(torch.randn(1, 1, 64, 16), 4, 32, "token"),
    )
    cut = [p[:, :, :1] if i in (1, 2) else p[:, :, :40] for i, p in enumerate(parts)]  # 40 tokens, groups of 32
    with pytest.raises(ValueError, match="whole groups"):
        kv_cpu.kv_decode_attention_cpu(torch.randn(1, 2, 1, 16), *cut, None, 4, 32, 0.2)


def test_cpu_kernel_build_failure_falls_back(monkeypatch, caplog, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setattr(native, "cache_dir", lambda: tmp_path)
    kv_cpu._library.cache_clear()
    try:
        with pytest.raises(OSError):
            native.build(kv_cpu._SOURCE)
        assert kv_cpu._library() is None
        assert "torch path" in caplog.text
        assert not list(tmp_path.rglob("*.so"))  # nothing half-built left behind
    finally:
        kv_cpu._library.cache_clear()


@needs_compiler
def test_cpu_kernel_with_a_dense_part_equals_the_merged_parts():
    g = torch.Generator().manual_seed(4)
    b, hq, hkv, t, td, d, group = 2, 6, 2, 128, 19, 32, 32
    k, v = torch.randn(b, hkv, t, d, generator=g), torch.randn(b, hkv, t, d, generator=g)
    parts = (*kv_quantize_ref(k, 4, group, "channel"), *kv_quantize_ref(v, 4, group, "token"))
    dk, dv = torch.randn(b, hkv, td, d, generator=g), torch.randn(b, hkv, td, d, generator=g)
    q = torch.randn(b, hq, 1, d, generator=g)
    bias, dense_bias = torch.zeros(b, t), torch.zeros(b, td)
    bias[1] = float("-inf")  # row 1 sees only dense tokens
    dense_bias[0, :4] = float("-inf")
    out, lse = kv_cpu.kv_decode_attention_cpu(q, *parts, bias, 4, group, 0.2, dk, dv, dense_bias)
    packed = PackedKV(*parts, 4, group)
    want = merge([attend_packed(q, packed, bias[:, None], 0.2), attend_dense(q, dk, dv, dense_bias[:, None], 0.2)])
    torch.testing.assert_close(out, want.out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want.lse, rtol=1e-5, atol=1e-5)


@needs_compiler
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_cpu_kernel_splits_a_long_packed_part_and_merges_exactly(threads):
    # 1216 packed tokens (19 groups of 64) are split over whole groups (the last split shorter)
    # so that few KV heads still keep every thread busy; the splits merge to one softmax, a
    # split that a row cannot see included, and a row that sees nothing at all.
    g = torch.Generator().manual_seed(5)
    b, hq, hkv, t, td, d, group = 3, 6, 2, 1216, 7, 64, 64
    k, v = torch.randn(b, hkv, t, d, generator=g) * 2, torch.randn(b, hkv, t, d, generator=g)
    parts = (*kv_quantize_ref(k, 4, group, "channel"), *kv_quantize_ref(v, 4, group, "token"))
    dk, dv = torch.randn(b, hkv, td, d, generator=g), torch.randn(b, hkv, td, d, generator=g)
    q = torch.randn(b, hq, 1, d, generator=g)
    bias, dense_bias = torch.zeros(b, t), torch.zeros(b, td)
    bias[1, :700] = float("-inf")  # left padding over the first splits
    bias[2], dense_bias[2] = float("-inf"), float("-inf")  # sees no key
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, lse = kv_cpu.kv_decode_attention_cpu(q, *parts, bias, 4, group, 0.2, dk, dv, dense_bias)
    finally:
        torch.set_num_threads(before)
    packed = PackedKV(*parts, 4, group)
    want = merge([attend_packed(q, packed, bias[:, None], 0.2), attend_dense(q, dk, dv, dense_bias[:, None], 0.2)])
    torch.testing.assert_close(out[:2], want.out[:2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse[:2], want.lse[:2], rtol=1e-5, atol=1e-5)
    assert (out[2] == 0).all() and lse[2].isneginf().all()
