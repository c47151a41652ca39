"""hfcompress.quant.cpu_decode: the CPU decode kernel of 2-, 3-, 4- and 8-bit weight-only layers."""

import pytest
import torch
import torch.nn.functional as F

from hfcompress import matmul_speed
from hfcompress.quant import cpu_decode, cpu_w8a8, dispatch
from hfcompress.quant.affine import quantize_rtn
from hfcompress.quant.linear import QuantLinear
from hfcompress.quant.scheme import QuantScheme
from tests.quant.helpers import fast_and_bf16_errors, quant_layer, rel_err


def _decode_kernel(bits=4):
    """Skip the test unless decode_cpu.c was built with the kernel for ``bits``-bit
    weights; a built width must pass its exactness probe."""
    lib = cpu_decode._native_library()
    if lib is None or not lib.decode_bits_built() & (1 << bits):
        pytest.skip(f"no {bits}-bit decode kernel here (AVX-512 BF16, and VBMI below 4 bits)")
    assert bits in cpu_decode.decode_bits(), f"the {bits}-bit decode kernel is built but failed its probe"


DECODE_CASES = [  # (n, k, group_size, symmetric, float_zero): the kernel's steps and groups are 128 inputs
    (40, 576, 128, False, False),  # SmolLM2's K: a partial last step and group
    (7, 200, -1, True, False),  # per channel; N not a multiple of the kernel's 4 channels; a partial step
    (9, 45, -1, False, True),  # odd K (rows padded to whole runs of 8 codes), float zero points
    (33, 1536, 256, False, False),  # two steps a group
    (24, 320, 64, False, False),  # two groups a step, scaled lane by lane; a partial last step
    (12, 200, 32, True, False),  # four groups a step, a partial last group
]


# 4-bit layers with groups of 32 or 64 stay on torch's int4 op (the probe checks the kernel there)
DECODE_WIDTH_CASES = [(b, *c) for b in (4, 3, 2) for c in DECODE_CASES if not (b == 4 and c[2] in (32, 64))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "bits,n,k,group_size,symmetric,float_zero",
    DECODE_WIDTH_CASES,
    ids=[f"w{c[0]}-n{c[1]}-k{c[2]}-g{c[3]}" for c in DECODE_WIDTH_CASES],
)
def test_cpu_decode_kernel_sums_the_bfloat16_inputs_exactly(bits, n, k, group_size, symmetric, float_zero, dtype,
                                                           monkeypatch):  # fmt: skip
    # Below AMX_MIN_ROWS rows (below AMX_BF16_MIN_ROWS where the AMX kernel serves: switched
    # off here, so that every row count reaches the decode kernel), 2-, 3- and 4-bit
    # weight-only layers run decode_cpu.c's kernel on the layer's own packed codes: float32
    # sums of the exact codes, float32 scales and zero points, so the only rounding is that of
    # the inputs to bfloat16 (and of a bfloat16 output). For 4 bits torch's int4 op, which
    # served these calls before, is not built; 2 and 3 bits had only the reference kernel,
    # which dequantized the weight on every call.
    from hfcompress.quant import cpu_kernels

    _decode_kernel(bits)
    amx_serves = cpu_w8a8.amx_bf16_serves
    monkeypatch.setattr(cpu_w8a8, "amx_bf16_serves", lambda layer, rows: False)
    monkeypatch.setattr(cpu_kernels, "_build_int4", lambda layer: pytest.fail("torch's int4 op was prepared"))
    monkeypatch.setattr(cpu_kernels, "reference_forward", lambda *a: pytest.fail("the reference kernel ran"))
    decoded = []
    decode = cpu_decode.decode_forward
    monkeypatch.setattr(cpu_decode, "decode_forward", lambda *a: decoded.append(1) or decode(*a))
    layer, qw = quant_layer(
        n, k, bits=bits, group_size=group_size, symmetric=symmetric, float_zero=float_zero, bias=True
    )
    layer.to(dtype)
    dense = qw.dequantize().double()
    g = torch.Generator().manual_seed(1)
    wide = (torch.randn(cpu_w8a8.AMX_MIN_ROWS - 1, 2 * k, generator=g) * torch.linspace(0.2, 4, 2 * k)).to(dtype)
    for x in (wide[:1, :k], wide[:3, :k], wide[:, :k], wide[:2, k:].contiguous()):  # row strides 2K and K
        assert dispatch.select_path(layer, x) == ("cpu_int4" if bits == 4 else "cpu_lowbit")
        decoded.clear()
        with torch.no_grad():
            y = layer(x)
        assert decoded and y.dtype == dtype and y.shape == (x.shape[0], n)
        exact = x.bfloat16().double() @ dense.t() + layer.bias.double()
        # float32 sums (1e-6 is 2000x below the bfloat16 inputs' own error); a bfloat16 output
        assert rel_err(y.double(), exact) < (3e-6 if dtype == torch.float32 else 4e-3)
        if bits == 4 and amx_serves(layer, cpu_w8a8.AMX_MIN_ROWS) and x.shape[0] == 1 and dtype == torch.float32:
            # the AMX prefill kernel on the same row: the same sums, in another order
            rows = x.expand(cpu_w8a8.AMX_MIN_ROWS, k).bfloat16().contiguous()
            prefill = cpu_w8a8.amx_bf16_linear(layer, rows, x.dtype)
            torch.testing.assert_close(prefill[:1] + layer.bias, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [3, 2], ids=lambda b: f"w{b}")
def test_cpu_lowbit_kernel_decodes_on_the_kernel_and_prefills_on_amx_or_a_dense_matmul(bits):
    # 2- and 3-bit layers whose groups the decode kernel takes get a CPU kernel of their own
    # (before, every call dequantized the weight: SmolLM2 W3 g128 decoded at 3.2 tokens/s
    # against float32's 29.2); from AMX_MIN_ROWS rows the AMX bfloat16 kernel serves them, or
    # without AMX a matmul of the dequantized weight (before, the reference computation).
    _decode_kernel(bits)
    layer, qw = quant_layer(24, 256, bits=bits, group_size=128, bias=True)
    x = torch.randn(1, 256)
    assert dispatch.select_path(layer, x) == "cpu_lowbit"
    assert dispatch.select_path(quant_layer(24, 256, bits=bits, group_size=48)[0], x) == "reference"
    dense = qw.dequantize()
    with torch.no_grad():
        x = torch.randn(2, 1, 256)  # decoding: the kernel
        y = layer(x)
        assert y.shape == (2, 1, 24)
        assert rel_err(y.double(), x.bfloat16().double() @ dense.double().t() + layer.bias.double()) < 3e-6
        x = torch.randn(1, cpu_w8a8.AMX_MIN_ROWS, 256)  # prefill
        if cpu_w8a8.amx_available():
            exact = x.bfloat16().double() @ dense.double().t() + layer.bias.double()
            assert rel_err(layer(x).double(), exact) < 1e-6
        else:  # in the dtype chosen for this CPU's dense matmul
            dtype = cpu_decode.dense_dtype()
            weight = layer.dequantize(dtype)
            assert torch.equal(layer(x), F.linear(x.to(dtype), weight).float() + layer.bias)


def test_cpu_w4_decode_kernel_applies_the_zero_point_in_float32():
    # The case where torch's int4 op, given (8 - z) * s rounded to bfloat16 at decode sizes,
    # lost the most (zero points at 0): one row now stays below the bfloat16 floor.
    _decode_kernel()
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 512, generator=g).abs() + 0.5
    qw = quantize_rtn(w, bits=4, group_size=128, symmetric=False)
    assert int(qw.zeros.max()) == 0
    layer = QuantLinear.from_quantized(
        qw, QuantScheme.weight_only(num_bits=4, group_size=128, in_features=512, symmetric=False)
    )
    x = torch.randn(1, 512, generator=g) + 1.0
    fast, bf16_floor = fast_and_bf16_errors(layer, x, qw.dequantize().float())
    assert fast < 0.75 * bf16_floor


def test_cpu_decode_kernel_serves_only_what_it_takes():
    _decode_kernel()
    w4g128, _ = quant_layer(16, 256, group_size=128)
    w4g48, _ = quant_layer(16, 256, group_size=48)
    w4g64, _ = quant_layer(16, 256, group_size=64)
    w3g64, _ = quant_layer(16, 256, bits=3, group_size=64)
    w8, _ = quant_layer(16, 256, bits=8, group_size=-1)
    w8g128, _ = quant_layer(16, 256, bits=8, group_size=128)
    x = torch.randn(1, 256)
    assert cpu_decode.decode_forward(w4g128, x) is not None
    assert cpu_decode.decode_forward(w4g128, x.bfloat16()) is not None
    assert cpu_decode.decode_forward(w4g128, torch.randn(cpu_w8a8.AMX_MIN_ROWS, 256)) is None  # prefill
    assert cpu_decode.decode_forward(w4g128, x.half()) is None
    assert cpu_decode.decode_forward(w4g48, x) is None  # a 32-input lane would straddle groups
    assert cpu_decode.decode_forward(w4g64, x) is None  # 4 bits: torch's op is faster at fine groups
    if 3 in cpu_decode.decode_bits():
        assert cpu_decode.decode_forward(w3g64, x) is not None  # 2 and 3 bits: scaled lane by lane
    assert (cpu_decode.decode_forward(w8, x) is not None) == (8 in cpu_decode.decode_bits())  # per channel
    assert cpu_decode.decode_forward(w8g128, x) is None  # 8 bits: one scale per channel only
    for layer in (w4g48, w4g64, w8g128):  # what it refuses still runs, on torch's ops or the reference
        assert rel_err(layer(x), x @ layer.dequantize().t()) < 2e-2


def test_cpu_decode_kernel_is_not_used_where_it_is_unavailable_or_inexact(monkeypatch):
    import ctypes

    real = cpu_decode._native_library()
    widths = cpu_decode.decode_bits()

    class Unbuilt:
        def decode_bits_built(self):
            return 0

    monkeypatch.setattr(cpu_decode, "_native_library", lambda: Unbuilt())
    assert cpu_decode.decode_bits.__wrapped__() == frozenset()
    monkeypatch.setattr(cpu_decode, "_native_library", lambda: None)  # no compiler
    assert cpu_decode.decode_bits.__wrapped__() == frozenset()
    if widths:

        class OffByOneAtThreeBits:  # the real kernel, one output nudged for 3-bit weights
            def __getattr__(self, name):
                return getattr(real, name)

            def decode_linear(self, *args):
                failed = real.decode_linear(*args)
                if args[6] == 3:
                    ctypes.c_float.from_address(args[-3]).value += 1.0
                return failed

        monkeypatch.setattr(cpu_decode, "_native_library", lambda: OffByOneAtThreeBits())
        assert cpu_decode.decode_bits.__wrapped__() == widths - {3}


def test_cpu_decode_kernel_failures_are_named(monkeypatch):
    _decode_kernel()
    layer, _ = quant_layer(16, 256, group_size=128)
    x = torch.randn(1, 256)
    real = cpu_decode._native_library()
    for code, error, message in [(1, MemoryError, "scratch memory"), (2, RuntimeError, "HFCOMPRESS_FORCE_REFERENCE=1")]:

        class Refusing:
            def __getattr__(self, name):
                return getattr(real, name)

            def decode_planned(self, *args, code=code):
                return code

        monkeypatch.setattr(cpu_decode, "_native_library", lambda: Refusing())
        with pytest.raises(error, match=message):
            cpu_decode.decode_forward(layer, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n,k,symmetric", [(40, 576, True), (7, 200, False), (9, 45, False), (33, 1536, True)])
def test_cpu_w8_decode_kernel_multiplies_in_float32(n, k, symmetric, dtype, monkeypatch):
    # 8-bit per-channel layers decode (below AMX_BF16_MIN_ROWS rows, or below AMX_MIN_ROWS
    # without AMX: switched off here) on decode_cpu.c's kernel in float32: no rounding of
    # the inputs, where torch's int8 op, which served these calls before, takes them and its
    # scales in bfloat16 (0.18% on SmolLM2). Odd K, channels past a block of 4, strided rows.
    from hfcompress.quant import cpu_kernels

    _decode_kernel(8)
    monkeypatch.setattr(cpu_w8a8, "amx_bf16_serves", lambda layer, rows: False)
    monkeypatch.setattr(cpu_kernels, "_build_int8", lambda layer: pytest.fail("torch's int8 op was prepared"))
    layer, qw = quant_layer(n, k, bits=8, group_size=-1, symmetric=symmetric, bias=True)
    layer.to(dtype)
    dense = qw.dequantize().double()
    g = torch.Generator().manual_seed(2)
    wide = (torch.randn(cpu_w8a8.AMX_MIN_ROWS - 1, 2 * k, generator=g) * torch.linspace(0.2, 4, 2 * k)).to(dtype)
    for x in (wide[:1, :k], wide[:3, :k], wide[:, :k], wide[:2, k:].contiguous()):
        assert dispatch.select_path(layer, x) == "cpu_int8"
        with torch.no_grad():
            y = layer(x)
        assert y.dtype == dtype and y.shape == (x.shape[0], n)
        exact = x.double() @ dense.t() + layer.bias.double()
        # float32 sums of exact products; a bfloat16 output rounds once
        assert rel_err(y.double(), exact) < (1e-6 if dtype == torch.float32 else 4e-3)


DEQUANTIZE_CASES = [  # (bits, n, k, group_size, symmetric, float_zero)
    (4, 40, 576, 128, False, False),  # SmolLM2's K: a partial last group
    (4, 9, 45, -1, False, True),  # odd K (rows padded to whole runs of 8 codes), float zero points
    (4, 12, 200, 32, True, False),
    (8, 7, 200, -1, True, False),
    (8, 5, 96, 48, False, False),  # 8-bit groups (torch's int8 op takes per channel only)
    (3, 24, 320, 64, False, False),
    (3, 6, 45, 8, False, True),  # the smallest group; odd K
    (2, 33, 256, 128, True, False),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "bits,n,k,group_size,symmetric,float_zero",
    DEQUANTIZE_CASES,
    ids=[f"w{c[0]}-k{c[2]}-g{c[3]}" for c in DEQUANTIZE_CASES],
)
def test_dequantize_dense_is_the_reference_weight_bit_for_bit(bits, n, k, group_size, symmetric, float_zero, dtype):
    # decode_cpu.c's dequantize_weight reads the packed codes and rounds (q - z) * s once, as
    # the reference's float32 dequantize (cast to bfloat16) does: the same bits.
    if cpu_decode._native_library() is None:
        pytest.skip("no C compiler")
    layer, _ = quant_layer(n, k, bits=bits, group_size=group_size, symmetric=symmetric, float_zero=float_zero)
    w = cpu_decode.dequantize_dense(layer, dtype)
    assert w.dtype == dtype and w.shape == (n, k)
    assert torch.equal(w, layer.dequantize(dtype))


def test_dequantize_dense_refuses_other_dtypes():
    layer, _ = quant_layer(8, 64)
    with pytest.raises(ValueError, match=r"bfloat16 or float32, not torch\.float16"):
        cpu_decode.dequantize_dense(layer, torch.float16)


def _dense_path(monkeypatch, dtype):
    if cpu_decode.dense_dtype() is None:
        pytest.skip("no C compiler: calls of many rows keep torch's ops")
    monkeypatch.setattr(cpu_decode, "dense_dtype", lambda: dtype)


@pytest.mark.parametrize("dense", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits,group_size", [(4, 128), (8, -1), (3, 128), (2, 64)])
def test_many_rows_without_amx_multiply_the_dequantized_weight(bits, group_size, dense, monkeypatch):
    # Without AMX, torch's int4 and int8 ops are decoding kernels: at 512 rows of SmolLM2's
    # shapes they took about twice the time of dequantizing to bfloat16 and a bfloat16 matmul
    # (AMD EPYC, AVX-512 BF16), 2.6x that of a float32 one (an Intel Xeon without AMX, whose
    # bfloat16 matmul is slower than float32) and 2.1-2.3x with that Xeon held to AVX2. From
    # DENSE_MIN_ROWS rows (4 and 8 bits; 2 and 3 bits, whose calls took the reference, from
    # AMX_MIN_ROWS where their kernel exists) those calls now run the matmul in the dtype
    # dense_dtype() picks: a bfloat16 model's rounding, or float32's.
    from hfcompress.quant import cpu_kernels

    if bits < 4 and bits not in cpu_decode.decode_bits():
        pytest.skip(f"no {bits}-bit CPU kernel here (AVX-512 BF16 and VBMI): the reference serves these layers")
    _dense_path(monkeypatch, dense)
    monkeypatch.setattr(cpu_w8a8, "amx_bf16_serves", lambda layer, rows: False)
    layer, qw = quant_layer(48, 256, bits=bits, group_size=group_size, symmetric=bits == 8, bias=True)
    weight = layer.dequantize(dense)
    first = cpu_decode.DENSE_MIN_ROWS if bits in (4, 8) else cpu_w8a8.AMX_MIN_ROWS
    ran = []
    dense_forward = cpu_decode.dense_forward

    def counted(*args):
        y = dense_forward(*args)
        ran.extend([] if y is None else [1])
        return y

    monkeypatch.setattr(cpu_decode, "dense_forward", counted)
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(2, first // 2, 256).to(dtype)
            y = layer(x)
            assert ran, "the dense matmul did not run"
            assert y.dtype == dtype and y.shape == (2, first // 2, 48)
            expected = F.linear(x.to(dense), weight).to(dtype) + layer.bias.to(dtype)
            assert torch.equal(y, expected)
            ref = x.float() @ qw.dequantize().float().t()
            if dense == torch.float32 and dtype == torch.float32:
                assert rel_err(y - layer.bias, ref) < 1e-6  # the reference's up to summation order
            else:  # a bfloat16 model's error, within 2x that of rounding only inputs and output
                floor = rel_err((x.bfloat16().float() @ qw.dequantize().float().t()).bfloat16().float(), ref)
                assert rel_err(y.float() - layer.bias, ref) < 2 * floor
        ran.clear()
        # fewer rows: torch's op (4 and 8 bits) or, below AMX_MIN_ROWS, the decode kernel
        x = torch.randn(first - 1, 256)
        if bits in (4, 8):
            built = []
            build = cpu_kernels._build_int4 if bits == 4 else cpu_kernels._build_int8
            monkeypatch.setattr(cpu_kernels, f"_build_int{bits}", lambda lay: built.append(1) or build(lay))
            layer(x)
            assert built and not ran
        else:
            layer(x)
            assert not ran


def test_many_rows_keep_torch_ops_without_the_c_code(monkeypatch):
    # Without a C compiler there is no dense dtype (nothing dequantizes fast): torch's ops.
    from hfcompress.quant import cpu_kernels

    monkeypatch.setattr(cpu_w8a8, "amx_bf16_serves", lambda layer, rows: False)
    monkeypatch.setattr(cpu_decode, "dense_dtype", lambda: None)
    monkeypatch.setattr(cpu_decode, "dequantize_dense", lambda *a: pytest.fail("dequantized for a matmul"))
    layer, _ = quant_layer(48, 256, group_size=128)
    built = []
    build = cpu_kernels._build_int4
    monkeypatch.setattr(cpu_kernels, "_build_int4", lambda lay: built.append(1) or build(lay))
    with torch.no_grad():
        layer(torch.randn(cpu_decode.DENSE_MIN_ROWS * 2, 256))
    assert built


def _fresh_dense_dtype(monkeypatch, speedup):
    if cpu_decode._native_library() is None:
        pytest.skip("no C compiler: no dense path to choose a dtype for")
    monkeypatch.setattr(matmul_speed, "onednn_has", lambda dtype: True)
    monkeypatch.setattr(matmul_speed, "matmul_speedup", lambda dtype: speedup)
    cpu_decode.dense_dtype.cache_clear()
    try:
        return cpu_decode.dense_dtype()
    finally:
        cpu_decode.dense_dtype.cache_clear()


@pytest.mark.parametrize("speedup,dtype", [(2.4, torch.bfloat16), (1.1, torch.float32), (0.6, torch.float32)])
def test_the_dense_matmul_is_bfloat16_only_where_it_is_clearly_faster(speedup, dtype, monkeypatch):
    # oneDNN's bfloat16 matmul took 2.2-2.7x less time than float32 on an AMD EPYC with AVX-512
    # BF16, and 1.6-1.8x more on an Intel Xeon VM with the same flags and no AMX: the choice is
    # measured, and float32 (exact for a float32 model) wins a near tie.
    monkeypatch.delenv(cpu_decode.DENSE_DTYPE_ENV, raising=False)
    assert _fresh_dense_dtype(monkeypatch, speedup) == dtype


def test_the_dense_dtype_can_be_set_and_a_wrong_setting_is_named(monkeypatch):
    monkeypatch.setenv(cpu_decode.DENSE_DTYPE_ENV, "bfloat16")
    assert _fresh_dense_dtype(monkeypatch, 0.5) == torch.bfloat16
    monkeypatch.setenv(cpu_decode.DENSE_DTYPE_ENV, "float32")
    assert _fresh_dense_dtype(monkeypatch, 3.0) == torch.float32
    monkeypatch.setenv(cpu_decode.DENSE_DTYPE_ENV, "fp16")
    with pytest.raises(ValueError, match="HFCOMPRESS_DENSE_DTYPE='fp16': set it to bfloat16 or float32"):
        _fresh_dense_dtype(monkeypatch, 1.0)
