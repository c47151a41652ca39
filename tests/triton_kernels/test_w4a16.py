"""The Triton W4A16 kernels against their torch twins (TRITON_INTERPRET=1 on CPU, see conftest)."""

import pytest
import torch

from hfcompress.quant.affine import quantize_rtn
from hfcompress.quant.packing import pack

triton = pytest.importorskip("triton")
from hfcompress_triton import split_k as splitting  # noqa: E402
from hfcompress_triton import w4a16, w4a16_mma, w4a16_ref  # noqa: E402


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


@pytest.mark.parametrize("split_k", [2, 3, 0], ids=["split2", "split3", "auto"])
@pytest.mark.parametrize("m", [1, 3], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("n,k,group_size", SHAPES, ids=[f"n{n}k{k}g{g}" for n, k, g in SHAPES])
def test_tile_gemv_split_k_matches_reference(n, k, group_size, m, split_k, device):
    """The tile GEMV split over K (each part a run of whole K tiles, the parts summed in the
    workspace) gives the unsplit result up to summation order, on the grouped and the
    per-weight paths, partial tiles and groups included."""
    qweight, scales, zeros, gs = _packed(n, k, group_size, "asym", device)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(device)
    blocks = {"BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": split_k}  # several K tiles even at K = 45
    y = w4a16.w4a16_gemv(x, qweight, scales, zeros, gs, blocks=blocks)
    ref = w4a16_ref.w4a16_gemv_ref(x, qweight, scales, zeros, gs)
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)


def test_split_k_parts_cover_k_without_an_empty_one(monkeypatch):
    """The launch's parts: as asked, at most one per K tile, none left without a tile, and
    automatic ones sized for SPLIT_PROGRAMS_PER_SM programs per multiprocessor."""
    monkeypatch.setattr(splitting, "multiprocessors", lambda device: 132)
    y = torch.empty(1, 4096)
    assert splitting.plan_split(3, 10, 256, y)[:2] == (3, 4)  # tiles 4 + 4 + 2
    assert splitting.plan_split(4, 10, 256, y)[:2] == (4, 3)  # 3 + 3 + 3 + 1
    assert splitting.plan_split(8, 10, 256, y)[:2] == (5, 2)  # 8 parts of 10 tiles: 2 each, 5 parts
    assert splitting.plan_split(20, 10, 256, y)[:2] == (10, 1)
    assert splitting.plan_split(0, 64, 256, y)[:2] == (3, 22)  # 4 x 132 / 256 -> 3 parts
    assert splitting.plan_split(0, 64, 16, y)[:2] == (32, 2)  # 16 programs: 33 parts asked, 2 tiles each
    split, _, ws, cnt = splitting.plan_split(1, 64, 16, y)
    assert split == 1 and ws is y and cnt is y  # unsplit: no workspace


# The tensor-core GEMV (blocks={"MMA": 1}): float16/bfloat16 x of up to 16 rows, integer zeros,
# K tiles inside a group. On CPU the interpreter runs it in float16 (its tl.dot is wrong on
# bfloat16) without the inline PTX; the GPU tests below run both unpack paths in bfloat16.
MMA_SHAPES = [(64, 256, 128), (40, 200, 64), (24, 72, -1), (32, 144, 48)]  # N, K: not multiples of the tiles


def _mma_ref(x, qweight, scales, zeros, gs):
    return w4a16_ref.w4a16_gemv_ref(x.float(), qweight, scales, zeros, gs)


def _close_to(y, ref):
    # float32 accumulation in both; y is rounded once to x's half-precision dtype
    torch.testing.assert_close(y.float(), ref, atol=4e-3 * ref.abs().max().item(), rtol=4e-3)


@pytest.mark.parametrize("split_k", [1, 3], ids=["whole-K", "split3"])
@pytest.mark.parametrize("m", [1, 13, 16], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("kind", ["asym", "sym"])
@pytest.mark.parametrize("n,k,group_size", MMA_SHAPES, ids=[f"n{n}k{k}g{g}" for n, k, g in MMA_SHAPES])
def test_mma_gemv_matches_reference(n, k, group_size, kind, m, split_k, device):
    qweight, scales, zeros, gs = _packed(n, k, group_size, kind, device)
    dtype = torch.float16 if device == "cpu" else torch.bfloat16
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(device, dtype)
    blocks = {"MMA": 1, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": split_k}
    assert w4a16_mma.mma_kernel_fits(x, zeros, gs, blocks["BLOCK_K"])
    y = w4a16.w4a16_gemv(x, qweight, scales, zeros, gs, blocks=blocks)
    assert y.shape == (m, n) and y.dtype == dtype
    _close_to(y, _mma_ref(x, qweight, scales, zeros, gs))


@pytest.mark.parametrize("group_size", [64, 48], ids=["g64", "g48-tile16"])
@pytest.mark.parametrize("permute", [0, 1, 2], ids=["natural", "per-thread-bytes", "low-then-high"])
def test_mma_gemv_column_order_does_not_change_the_result(permute, group_size, device):
    """PERMUTE takes each K tile's columns in the tensor cores' register order (2: all low
    nibbles, then all high ones), x gathered to match; the sum is the same. Group 48 shrinks
    the K tile to 16 columns, where 2 falls back to 1."""
    qweight, scales, zeros, gs = _packed(32, 288, group_size, "asym", device)
    x = torch.randn(2, 288, generator=torch.Generator().manual_seed(5)).to(device, torch.float16)
    blocks = {"MMA": 1, "BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 2, "PERMUTE": permute}
    _close_to(w4a16.w4a16_gemv(x, qweight, scales, zeros, gs, blocks=blocks), _mma_ref(x, qweight, scales, zeros, gs))


@pytest.mark.parametrize("mma", [1, 0], ids=["mma", "tile"])
def test_split_k_leaves_its_workspace_zero(mma, device):
    """The split-K programs add into a float32 workspace and count into int32 counters; the last
    of each output resets both, so a second call (another layer) starts from zeros."""
    splitting.WORKSPACES.clear()
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(0)).to(device, torch.float16)
    blocks = {"MMA": mma, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 4}
    for n, seed in ((48, 1), (32, 2)):  # two layers of different widths share the buffers
        qweight, scales, zeros, gs = _packed(n, 256, 64, "asym", device, seed=seed)
        first = w4a16.w4a16_gemv(x, qweight, scales, zeros, gs, blocks=blocks)
        torch.testing.assert_close(w4a16.w4a16_gemv(x, qweight, scales, zeros, gs, blocks=blocks), first)
        _close_to(first, _mma_ref(x, qweight, scales, zeros, gs))
    ((ws, cnt),) = splitting.WORKSPACES.values()
    assert ws.numel() >= 48 and not ws.any() and not cnt.any()


@pytest.mark.parametrize("blocks", [{}, {"SPLIT_K": 2}, {"MMA": 1, "SPLIT_K": 2}], ids=["tile", "tile-split", "mma"])
def test_gemv_of_no_rows_is_empty(blocks, device):
    """An empty batch gets an empty result (the tile GEMV divided its K tile by 0 rows)."""
    qweight, scales, zeros, gs = _packed(32, 256, 128, "asym", device)
    x = torch.randn(0, 256).to(device, torch.float16)
    assert w4a16.w4a16_gemv(x, qweight, scales, zeros, gs, blocks=blocks).shape == (0, 32)


def test_mma_block_k_shrinks_to_lie_inside_a_group():
    assert w4a16_mma.mma_block_k(4096, 128, 128) == 128
    assert w4a16_mma.mma_block_k(4096, 64, 128) == 64
    assert w4a16_mma.mma_block_k(4096, 48, 128) == 16
    assert w4a16_mma.mma_block_k(4096, 4096, 128) == 128  # one group per row
    assert w4a16_mma.mma_block_k(4096, 72, 128) == 0  # 8: below the tensor cores' 16


@pytest.mark.parametrize(
    "case",
    ["float32 x", "float zeros", "group 72", "17 rows"],
)
def test_mma_gemv_falls_back_to_the_tile_kernel(case, device, monkeypatch):
    """Calls the tensor-core kernel cannot take run the tile kernel instead, with the same result."""
    kind, group, m, dtype = "asym", 64, 1, torch.float16
    if case == "float32 x":
        dtype = torch.float32
    elif case == "float zeros":
        kind = "float"
    elif case == "group 72":
        group = 72
    else:
        m = 17
    qweight, scales, zeros, gs = _packed(24, 144, group, kind, device)
    x = torch.randn(m, 144, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    monkeypatch.setattr(w4a16, "gemv_mma", lambda *a, **k: pytest.fail("the tensor-core kernel ran"))
    y = w4a16.w4a16_gemv(x, qweight, scales, zeros, gs, blocks={"MMA": 1})
    _close_to(y, _mma_ref(x, qweight, scales, zeros, gs))


def test_mma_blocks_come_from_the_call_or_an_mma_module_default(monkeypatch):
    """{"MMA": 1} in a call takes the tensor-core tiles, not the tile kernel's module defaults;
    an MMA module default (what bench_w4a16.py --gemv-blocks sets) applies to plain calls."""
    seen = []
    monkeypatch.setattr(w4a16, "gemv_mma", lambda *a: seen.append(a[-1]) or a[-2])
    qweight, scales, zeros, gs = _packed(16, 256, 128, "asym", "cpu")
    x = torch.randn(1, 256, dtype=torch.float16)
    w4a16.w4a16_gemv(x, qweight, scales, zeros, gs, blocks={"MMA": 1})
    assert seen[-1]["BLOCK_K"] == w4a16_mma.GEMV_MMA_BLOCKS["BLOCK_K"] and seen[-1]["BLOCK_N"] == 64
    monkeypatch.setitem(w4a16.GEMV_BLOCKS, "MMA", 1)
    monkeypatch.setitem(w4a16.GEMV_BLOCKS, "BLOCK_N", 32)
    w4a16.w4a16_gemv(x, qweight, scales, zeros, gs)
    assert seen[-1]["BLOCK_N"] == 32 and len(seen) == 2
    with pytest.raises(ValueError, match=r"unknown blocks keys \['BLOCK_Q'\]"):
        w4a16.w4a16_gemv(x, qweight, scales, zeros, gs, blocks={"MMA": 1, "BLOCK_Q": 8})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("asm", [0, 1], ids=["triton-unpack", "ptx-unpack"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_mma_gemv_on_gpu(dtype, asm):
    """Both unpack paths on the GPU's tensor cores, at the default tiles (automatic split-K)
    and unsplit, against the float32 reference."""
    for m, (n, k, group_size) in ((1, (4096, 4096, 128)), (5, (1000, 1024, 64)), (16, (256, 576, 128))):
        qweight, scales, zeros, gs = _packed(n, k, group_size, "asym", "cuda")
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        ref = _mma_ref(x, qweight, scales, zeros, gs)
        for split in (0, 1):
            blocks = {"MMA": 1, "ASM": asm, "SPLIT_K": split}
            _close_to(w4a16.w4a16_gemv(x, qweight, scales, zeros, gs, blocks=blocks), ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("blocks", [{"MMA": 1, "SPLIT_K": 8}, {"SPLIT_K": 8}], ids=["mma", "tile"])
def test_split_k_gemv_replays_in_a_cuda_graph(blocks):
    """Split-K inside a captured graph: the workspace made during capture is zeroed by the graph,
    and each replay leaves it zero for the next."""
    splitting.WORKSPACES.clear()
    qweight, scales, zeros, gs = _packed(2048, 2048, 128, "asym", "cuda")
    x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    expected = w4a16.w4a16_gemv(x, qweight, scales, zeros, gs, blocks=blocks)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = w4a16.w4a16_gemv(x, qweight, scales, zeros, gs, blocks=blocks)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(y, expected)


def _run_ptx(asm: str, inputs: dict[str, int]) -> dict[str, int]:
    """Run the straight-line PTX of ``_unpack_asm`` (prmt, shr, lop3 on 32-bit registers) in
    Python: its bit logic checked on CPU, where the inline assembly itself cannot run."""
    import re

    regs = dict(inputs)

    def value(token: str) -> int:
        token = token.strip()
        return regs[token] if token in regs else int(token, 0)

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        dst, *src = [a.strip() for a in rest.split(",")]
        if op == "prmt.b32":
            a, b, sel = value(src[0]), value(src[1]), value(src[2])
            pool = a | (b << 32)
            out = 0
            for i in range(4):
                nib = (sel >> (4 * i)) & 0xF
                byte = (pool >> (8 * (nib & 7))) & 0xFF
                if nib & 8:  # sign replication
                    byte = 0xFF if byte & 0x80 else 0
                out |= byte << (8 * i)
        elif op == "shr.u32":
            out = value(src[0]) >> value(src[1])
        elif op == "lop3.b32":
            a, b, c, lut = (value(x) for x in src)
            out = 0
            for bit in range(32):
                index = (((a >> bit) & 1) << 2) | (((b >> bit) & 1) << 1) | ((c >> bit) & 1)
                out |= ((lut >> index) & 1) << bit
        else:
            raise AssertionError(f"unexpected PTX {op}")
        assert re.fullmatch(r"\$\d|t\d|u\d", dst)
        regs[dst] = out & 0xFFFFFFFF
    return regs


@pytest.mark.parametrize("magic", [0x4300, 0x6400], ids=["bf16", "fp16"])
def test_unpack_ptx_matches_the_triton_ops_it_replaces(magic):
    """Register $4 holds elements 0-3 as bytes 0-3; $0 must pack elements 0 and 1 (low half
    first) of ``(byte & 15) | magic``, $1 elements 2 and 3, and $2, $3 the same of
    ``(byte >> 4) | magic``: what the interpreter's Triton ops compute element by element."""
    asm = w4a16_mma._unpack_asm(f"0x{magic:04X}{magic:04X}")
    g = torch.Generator().manual_seed(0)
    words = [*torch.randint(0, 2**32, (300,), generator=g, dtype=torch.int64).tolist(), 0, 0xFFFFFFFF, 0x12345678]
    for word in words:
        regs = _run_ptx(asm, {"$4": word})
        b = [(word >> (8 * i)) & 0xFF for i in range(4)]
        lo = [(x & 15) | magic for x in b]
        hi = [(x >> 4) | magic for x in b]
        assert regs["$0"] == lo[0] | lo[1] << 16 and regs["$1"] == lo[2] | lo[3] << 16
        assert regs["$2"] == hi[0] | hi[1] << 16 and regs["$3"] == hi[2] | hi[3] << 16
    # and the two instantiations the kernel uses are this template
    assert w4a16_mma._UNPACK_BF16.value == w4a16_mma._unpack_asm("0x43004300")
    assert w4a16_mma._UNPACK_F16.value == w4a16_mma._unpack_asm("0x64006400")
