"""The Triton KV-cache kernels against their torch twins (TRITON_INTERPRET=1 on CPU, see conftest),
and the twins against plain attention."""

import pytest
import torch
import torch.nn.functional as F
from hfcompress_triton import kv_ref

# bits, group size, head dim: every bit width; key groups below, at and above the head dim
# (values then use one group per token); a head dim of 16 (4 bytes per token at 2 bits).
CASES = [(4, 64, 64), (2, 16, 64), (8, 32, 32), (4, 128, 64), (2, 32, 16)]
IDS = [f"b{b}-g{g}-d{d}" for b, g, d in CASES]


def _kv(b, h, t, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, h, t, d, generator=g) * 2
    k[..., 3] += 10  # a key outlier channel, as LLM keys have
    v = torch.randn(b, h, t, d, generator=g)
    return k, v


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_round_trip(bits):
    codes = torch.randint(0, 2**bits, (3, 5, 64), dtype=torch.uint8)
    packed = kv_ref.pack_codes(codes, bits)
    assert packed.shape == (3, 5, 64 * bits // 8)
    assert torch.equal(kv_ref.unpack_codes(packed, bits), codes)


@pytest.mark.parametrize("axis", ["channel", "token"])
@pytest.mark.parametrize(("bits", "group", "d"), CASES, ids=IDS)
def test_reference_error_is_at_most_half_a_step(bits, group, d, axis):
    k, v = _kv(2, 2, 128, d)
    x = k if axis == "channel" else v
    packed, scale, zero = kv_ref.kv_quantize_ref(x, bits, group, axis, torch.float32)
    x_hat = kv_ref.kv_dequantize_ref(packed, scale, zero, bits, group, axis)
    step = scale.repeat_interleave(group, 2) if axis == "channel" else scale.repeat_interleave(min(group, d), 3)
    assert ((x_hat - x).abs() <= step / 2 + 1e-5).all()


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("axis", ["channel", "token"])
@pytest.mark.parametrize(("bits", "group", "d"), CASES, ids=IDS)
def test_quantize_kernel_matches_reference(bits, group, d, axis, scale_dtype, device):
    # bfloat16 scales are left to GPU runs: the interpreter casts float32 to bfloat16 by
    # truncation, torch by rounding to nearest.
    pytest.importorskip("triton")
    from hfcompress_triton import kv

    k, v = _kv(2, 2, 128, d)
    x = (k if axis == "channel" else v).to(device)
    got = kv.kv_quantize(x, bits, group, axis, scale_dtype)
    want = kv_ref.kv_quantize_ref(x, bits, group, axis, scale_dtype)
    for name, a, b in zip(("packed", "scale", "zero"), got, want, strict=True):
        assert torch.equal(a, b), name


def _packed(b, hkv, t, d, bits, group, scale_dtype=torch.float16, seed=0):
    k, v = _kv(b, hkv, t, d, seed)
    return (
        *kv_ref.kv_quantize_ref(k, bits, group, "channel", scale_dtype),
        *kv_ref.kv_quantize_ref(v, bits, group, "token", scale_dtype),
    )


def test_reference_attention_maps_query_heads_to_their_kv_head():
    # KV heads made very different: a kernel that mapped query heads to the wrong KV head (or
    # repeated them in the wrong order) could not match SDPA's grouped-query attention.
    b, hq, hkv, t, d = 2, 6, 2, 128, 32
    parts = _packed(b, hkv, t, d, 8, 32, torch.float32)
    parts[1][:, 1] *= 5
    q = torch.randn(b, hq, 1, d)
    out, lse = kv_ref.kv_decode_attention_ref(q, *parts, None, 8, 32, d**-0.5)
    k = kv_ref.kv_dequantize_ref(parts[0], parts[1], parts[2], 8, 32, "channel")
    v = kv_ref.kv_dequantize_ref(parts[3], parts[4], parts[5], 8, 32, "token")
    want = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    wrong = F.scaled_dot_product_attention(q, k.repeat(1, 3, 1, 1), v.repeat(1, 3, 1, 1))
    assert (out - wrong).abs().max() > 0.1
    torch.testing.assert_close(lse, torch.logsumexp(q @ k.repeat_interleave(3, 1).transpose(-1, -2) * d**-0.5, -1))


def _tolerance(kernel: str, device: str) -> dict:
    # float32 sums in another order: a few ulps; the tensor-core kernel's TF32 operands on a GPU
    # (10-bit mantissas) cost about 1e-3
    return {"rtol": 3e-3, "atol": 3e-3} if kernel == "dot" and device == "cuda" else {"rtol": 1e-5, "atol": 1e-5}


@pytest.mark.parametrize("kernel", ["lanes", "dot"])
@pytest.mark.parametrize("splits", [1, 3], ids=["one-split", "three-splits"])
@pytest.mark.parametrize(("bits", "group", "d"), CASES, ids=IDS)
def test_decode_kernel_matches_reference(bits, group, d, splits, kernel, device):
    pytest.importorskip("triton")
    from hfcompress_triton import kv

    if kernel == "dot" and not kv.dot_kernel_fits(bits, group, d):
        pytest.skip("the tensor-core kernel takes 4-bit caches whose groups fit (see dot_kernel_fits)")
    b, hq, hkv, t = 2, 6, 2, 256  # 3 query heads per KV head: not a power of two
    parts = [p.to(device) for p in _packed(b, hkv, t, d, bits, group)]
    q = torch.randn(b, hq, 1, d).to(device)
    bias = torch.zeros(b, t, device=device)
    bias[1, :37] = float("-inf")  # left padding of the second row
    out, lse = kv.kv_decode_attention(q, *parts, bias, bits, group, 0.125, splits=splits, kernel=kernel)
    want_out, want_lse = kv_ref.kv_decode_attention_ref(q, *parts, bias, bits, group, 0.125)
    torch.testing.assert_close(out, want_out, **_tolerance(kernel, device))
    torch.testing.assert_close(lse, want_lse, **_tolerance(kernel, device))


@pytest.mark.parametrize("kernel", ["lanes", "dot"])
def test_decode_merges_more_splits_than_one_merge_chunk(kernel, device):
    """128 splits: the merge kernel walks them 64 at a time with a running maximum."""
    pytest.importorskip("triton")
    from hfcompress_triton import kv

    b, hq, hkv, t, d, group = 1, 2, 1, 4096, 32, 16
    parts = [p.to(device) for p in _packed(b, hkv, t, d, 4, group)]
    q = torch.randn(b, hq, 1, d).to(device)
    bias = torch.zeros(b, t, device=device)
    bias[0, :1500] = float("-inf")  # the first splits are fully masked
    out, lse = kv.kv_decode_attention(q, *parts, bias, 4, group, 0.3, splits=200, kernel=kernel)
    want_out, want_lse = kv_ref.kv_decode_attention_ref(q, *parts, bias, 4, group, 0.3)
    torch.testing.assert_close(out, want_out, **_tolerance(kernel, device))
    torch.testing.assert_close(lse, want_lse, **_tolerance(kernel, device))


def test_decode_kernel_choice():
    pytest.importorskip("triton")
    from hfcompress_triton import kv

    assert kv.dot_kernel_fits(4, 64, 128) and kv.dot_kernel_fits(4, 64, 64) and kv.dot_kernel_fits(4, 32, 32)
    assert not kv.dot_kernel_fits(2, 64, 64)  # 2-bit: four codes a byte
    assert not kv.dot_kernel_fits(4, 32, 128)  # a value group of 32 channels inside a 64-channel half
    assert not kv.dot_kernel_fits(4, 8, 64)  # 8-token key groups: below the tensor cores' 16
    parts = _packed(1, 1, 64, 64, 2, 16)
    with pytest.raises(ValueError, match="kernel must be"):
        kv.kv_decode_attention(torch.randn(1, 1, 1, 64), *parts, None, 2, 16, 0.2, kernel="dot")
    with pytest.raises(ValueError, match="kernel must be"):
        kv.kv_decode_attention(torch.randn(1, 1, 1, 64), *parts, None, 2, 16, 0.2, kernel="fast")


def test_decode_kernel_fully_masked_row_and_strided_views(device):
    pytest.importorskip("triton")
    from hfcompress_triton import kv

    b, hq, hkv, t, d = 2, 4, 2, 128, 32
    full = [p.to(device) for p in _packed(b, hkv, 2 * t, d, 4, 32)]
    # views of the first t tokens of buffers that hold 2t, as the cache passes them
    parts = [p[:, :, : t // 32] if i in (1, 2) else p[:, :, :t] for i, p in enumerate(full)]
    q = torch.randn(b, hq, 1, d).to(device)
    bias = torch.zeros(b, t, device=device)
    bias[0] = float("-inf")
    for kernel in ("lanes", "dot"):
        out, lse = kv.kv_decode_attention(q, *parts, bias, 4, 32, 0.2, splits=2, kernel=kernel)
        want_out, want_lse = kv_ref.kv_decode_attention_ref(q, *parts, bias, 4, 32, 0.2)
        assert torch.isneginf(lse[0]).all() and (out[0] == 0).all()
        torch.testing.assert_close(out, want_out, **_tolerance(kernel, device))
        torch.testing.assert_close(lse[1], want_lse[1], **_tolerance(kernel, device))


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the interpreter's max over the NaN row
@pytest.mark.parametrize("kernel", ["lanes", "dot"])
def test_decode_kernel_keeps_nan_rows_nan(kernel, device):
    # A NaN in one query head gives that head NaN output and log-sum-exp, as the reference does
    # (the merge used to drop the NaN split and report lse = -inf); the other heads are unchanged.
    pytest.importorskip("triton")
    from hfcompress_triton import kv

    b, hq, hkv, t, d = 2, 4, 2, 128, 32
    parts = [p.to(device) for p in _packed(b, hkv, t, d, 4, 32)]
    q = torch.randn(b, hq, 1, d).to(device)
    q[1, 2, 0, 7] = float("nan")
    out, lse = kv.kv_decode_attention(q, *parts, None, 4, 32, 0.2, splits=2, kernel=kernel)
    want_out, want_lse = kv_ref.kv_decode_attention_ref(q, *parts, None, 4, 32, 0.2)
    assert out[1, 2].isnan().all() and lse[1, 2].isnan().all()
    assert not out[0].isnan().any() and not lse[0].isnan().any()
    torch.testing.assert_close(out, want_out, equal_nan=True, **_tolerance(kernel, device))
    torch.testing.assert_close(lse, want_lse, equal_nan=True, **_tolerance(kernel, device))


def test_decode_kernel_refuses_bad_shapes(device):
    pytest.importorskip("triton")
    from hfcompress_triton import kv

    parts = [p.to(device) for p in _packed(1, 2, 64, 32, 4, 32)]
    with pytest.raises(ValueError, match="Hq % Hkv"):
        kv.kv_decode_attention(torch.randn(1, 3, 1, 32, device=device), *parts, None, 4, 32, 0.2)
    with pytest.raises(ValueError, match="power-of-two"):
        kv.kv_quantize(torch.randn(1, 1, 32, 24, device=device), 4, 32, "channel")
