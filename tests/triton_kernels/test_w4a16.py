"""The Triton W4A16 kernels against their torch twins (TRITON_INTERPRET=1 on CPU, see conftest)."""

import pytest
import torch

from hfcompress.quant.affine import quantize_rtn
from hfcompress.quant.packing import pack

triton = pytest.importorskip("triton")
from hfcompress_triton import w4a16, w4a16_ref  # noqa: E402


def _packed(n, k, group_size, kind, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    qw = quantize_rtn(w, bits=4, group_size=group_size, symmetric=kind == "sym", float_zero=kind == "float")
    zeros = None if kind == "sym" else qw.zeros.to(device)
    return pack(qw.q, 4).to(device), qw.scales.to(device), zeros, qw.group_size


KINDS = ["asym", "sym", "float"]
# (N, K, group): K=200 ends in a partial group; group 48 does not nest with the GEMV's K tiles
# (its per-weight path), the others take its grouped path with several, one or part of a group
# per tile; odd group 15 and odd K=45 take the per-weight paths of the GEMV and dequantize.
SHAPES = [(64, 128, 64), (40, 200, 64), (24, 72, -1), (32, 150, 48), (16, 600, 512), (16, 45, 15)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,k,group_size", SHAPES, ids=[f"n{n}k{k}g{g}" for n, k, g in SHAPES])
def test_dequantize_is_bit_exact(kind, n, k, group_size, device):
    qweight, scales, zeros, gs = _packed(n, k, group_size, kind, device)
    out = w4a16.w4_dequantize(qweight, scales, zeros, gs, k)
    assert torch.equal(out, w4a16_ref.w4_dequantize_ref(qweight, scales, zeros, gs, k))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_dequantize_to_half_precision_rounds_once(dtype, device):
    if dtype == torch.bfloat16 and device == "cpu":
        pytest.skip("the Triton interpreter truncates to bfloat16 instead of rounding; a GPU run checks it")
    qweight, scales, zeros, gs = _packed(40, 200, 64, "asym", device)
    out = w4a16.w4_dequantize(qweight, scales, zeros, gs, 200, dtype)
    assert out.dtype == dtype
    assert torch.equal(out, w4a16_ref.w4_dequantize_ref(qweight, scales, zeros, gs, 200, dtype))


@pytest.mark.parametrize("m", [1, 2, 13, 67], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,k,group_size", SHAPES, ids=[f"n{n}k{k}g{g}" for n, k, g in SHAPES])
@pytest.mark.parametrize("op", ["gemm", "gemv"])
def test_matmul_matches_reference(op, m, kind, n, k, group_size, device):
    qweight, scales, zeros, gs = _packed(n, k, group_size, kind, device)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(device)
    kernel = getattr(w4a16, f"w4a16_{op}")
    ref = getattr(w4a16_ref, f"w4a16_{op}_ref")(x, qweight, scales, zeros, gs)
    y = kernel(x, qweight, scales, zeros, gs)
    assert y.shape == (m, n) and y.dtype == x.dtype
    # float32 in, float32 accumulation in both: only the summation order differs.
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("op", ["gemm", "gemv"])
def test_float16_activations(op, device):
    qweight, scales, zeros, gs = _packed(32, 128, 64, "asym", device)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(0)).to(device, torch.float16)
    y = getattr(w4a16, f"w4a16_{op}")(x, qweight, scales, zeros, gs)
    ref = getattr(w4a16_ref, f"w4a16_{op}_ref")(x, qweight, scales, zeros, gs)
    assert y.dtype == torch.float16
    # fp16 output rounding (~5e-4 relative) and fp16 weight tiles into tl.dot.
    torch.testing.assert_close(y.float(), ref.float(), atol=2e-2, rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bfloat16_activations_on_gpu():
    qweight, scales, zeros, gs = _packed(256, 576, 128, "asym", "cuda")
    x = torch.randn(7, 576, device="cuda", dtype=torch.bfloat16)
    y = w4a16.w4a16_gemm(x, qweight, scales, zeros, gs)
    ref = w4a16_ref.w4a16_gemm_ref(x, qweight, scales, zeros, gs)
    torch.testing.assert_close(y.float(), ref.float(), atol=1e-1, rtol=2e-2)


def test_launchers_name_bad_shapes():
    qweight, scales, zeros, gs = _packed(16, 64, 32, "asym", "cpu")
    with pytest.raises(ValueError, match=r"qweight must be uint8 \[N, ceil\(K/8\)\*4\]"):
        w4a16.w4a16_gemm(torch.randn(2, 96), qweight, scales, zeros, gs)
    with pytest.raises(ValueError, match="scales must be"):
        w4a16.w4a16_gemv(torch.randn(1, 64), qweight, scales[:, :1], zeros, gs)
    with pytest.raises(ValueError, match="x must be 2-D"):
        w4a16.w4a16_gemm(torch.randn(64), qweight, scales, zeros, gs)
    with pytest.raises(ValueError, match="zeros must be"):
        w4a16.w4a16_gemm(torch.randn(2, 64), qweight, scales, zeros.float(), gs)


@pytest.mark.parametrize(
    "op,blocks",
    [("gemv", {"BLOCK_N": 16, "BLOCK_K": 32}), ("gemm", {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 32})],
    ids=["gemv", "gemm"],
)
def test_block_overrides_change_the_tiling_not_the_result(op, blocks, device):
    qweight, scales, zeros, gs = _packed(40, 200, 64, "asym", device)  # N and K not multiples of the blocks
    x = torch.randn(3, 200, generator=torch.Generator().manual_seed(3)).to(device)
    kernel = getattr(w4a16, f"w4a16_{op}")
    torch.testing.assert_close(
        kernel(x, qweight, scales, zeros, gs, blocks=blocks),
        kernel(x, qweight, scales, zeros, gs),
        atol=1e-4,
        rtol=1e-4,
    )
    with pytest.raises(ValueError, match=r"unknown blocks keys \['BLOCK_Q'\]"):
        kernel(x, qweight, scales, zeros, gs, blocks={"BLOCK_Q": 8})
