"""hfcompress.quant.cpu_w8a8: the CPU int8 matmuls (oneDNN, torch._int_mm, the C W8A8 kernel) and the
AMX kernels, each against the reference kernel or the path it replaces."""

import os
from pathlib import Path

import pytest
import torch

from hfcompress.quant import dispatch
from hfcompress.quant.linear import QuantLinear
from hfcompress.quant.scheme import QuantScheme
from tests.quant.helpers import quant_layer, rel_err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "int_mm"])
@pytest.mark.parametrize("strategy,dynamic", [("token", True), ("tensor", False)])
def test_both_cpu_int8_matmuls_match_the_reference(strategy, dynamic, onednn, dtype, monkeypatch):
    from hfcompress.quant import cpu_w8a8
    from hfcompress.quant.scheme import QuantArgs

    if onednn and not cpu_w8a8.onednn_works():
        pytest.skip("this torch build or CPU has no oneDNN int8 linear")
    monkeypatch.setattr(cpu_w8a8, "onednn_available", lambda: onednn)
    act = QuantArgs(num_bits=8, symmetric=True, strategy=strategy, dynamic=dynamic, observer=None, zp_dtype=None)
    _, qw = quant_layer(40, 96, bits=8, group_size=-1, symmetric=True)
    weights = QuantScheme.weight_only(num_bits=8, group_size=-1, in_features=96, symmetric=True).weights
    layer = QuantLinear.from_quantized(qw, QuantScheme(weights=weights, input_activations=act), bias=torch.randn(40))
    layer.to(dtype)  # the bias follows the model's dtype
    if not dynamic:
        layer.input_scale.fill_(0.03)
    x = (torch.randn(3, 37, 96) * torch.linspace(0.2, 4, 96)).to(dtype)  # 111 rows: the prefill path
    y, ref = layer(x), dispatch.reference_forward(layer, x)
    assert y.dtype == dtype
    # float32: exact integer sums, the scales applied in another order. bfloat16: the output
    # (and, per token, the row scale) rounded to bfloat16 on the kernel's side, the
    # reference's bfloat16 weight and matmul on the other.
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert rel_err(y.float(), ref.float()) < tol


def test_onednn_is_used_only_where_it_is_not_far_slower_than_int_mm(monkeypatch):
    # On a 2-core AMD EPYC VM oneDNN's int8 linear ran 1000x slower than torch._int_mm: the
    # one-off timing must catch that, and keep oneDNN where the two are close.
    from hfcompress.quant import cpu_w8a8

    if not cpu_w8a8.onednn_works():
        pytest.skip("this torch build or CPU has no oneDNN int8 linear")
    for onednn_s, int_mm_s, chosen in [(1.0, 0.001, False), (0.003, 0.001, True), (0.001, 0.002, True)]:
        seconds = iter([onednn_s, int_mm_s])
        monkeypatch.setattr(cpu_w8a8, "best_seconds", lambda _fn, seconds=seconds: next(seconds))
        assert cpu_w8a8.onednn_available.__wrapped__() is chosen


class _FakeOneDNN:
    """Stands in for ``torch.ops.onednn``: exact int8 sums, or the sums of AVX2's
    ``vpmaddubsw`` path (activations shifted to unsigned, pairs of products saturating at
    16 bits, the shift taken off after), as oneDNN computes them on CPUs without VNNI."""

    def __init__(self, saturate: bool):
        self.saturate = saturate

    def qlinear_prepack(self, w, _scales):
        return w

    def qlinear_pointwise(self, x, _xs, _xz, w, _ws, _wz, _bias, _os, _oz, _dtype, *_post):
        if not self.saturate:
            return x.double() @ w.double().t()
        # vpmaddubsw: unsigned activations (x + 128) times signed weights, pairs summed in int16
        u = x.double() + 128
        pairs = (u[:, None, :] * w.double()[None, :, :]).view(x.shape[0], w.shape[0], -1, 2).sum(-1)
        return pairs.clamp(-(2**15), 2**15 - 1).sum(-1) - 128 * w.double().sum(-1)


@pytest.mark.parametrize("saturate", [False, True])
def test_onednn_is_used_only_where_its_int8_sums_are_exact(saturate, monkeypatch):
    # On an AVX2-only EPYC VM oneDNN's int8 linear gave a tenth of a layer's outputs off by up
    # to 20: the one-off probe must refuse it there, whatever its speed.
    from hfcompress.quant import cpu_w8a8

    monkeypatch.setattr(torch.ops, "onednn", _FakeOneDNN(saturate))
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    assert cpu_w8a8.onednn_works.__wrapped__() is not saturate


def test_layers_reading_one_tensor_quantize_it_once(tiny_llama, llama_ids, monkeypatch):
    from hfcompress import ActivationQuantConfig, RTNConfig, compress
    from hfcompress.quant import cpu_w8a8

    compress(tiny_llama, [RTNConfig(bits=8, group_size=-1, symmetric=True), ActivationQuantConfig()], progress=False)
    calls = []
    torch_path, c_path = cpu_w8a8.quantize_activations, cpu_w8a8._native_quantize

    def c_counted(*args):
        result = c_path(*args)  # None where the C quantization declines and torch's runs
        calls.extend([1] if result is not None else [])
        return result

    monkeypatch.setattr(cpu_w8a8, "quantize_activations", lambda *a: calls.append(1) or torch_path(*a))
    monkeypatch.setattr(cpu_w8a8, "_native_quantize", c_counted)
    with torch.no_grad():
        fast = tiny_llama(llama_ids).logits
    assert len(calls) == 2 * 4  # per block: q/k/v once, o, gate/up once, down
    with torch.inference_mode():  # no version counters: nothing is reused, same result
        calls.clear()
        assert torch.equal(tiny_llama(llama_ids).logits, fast)
    assert len(calls) == 2 * 7


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bits,symmetric", [(8, True), (8, False), (4, False)], ids=["W8-sym", "W8-asym", "W4-asym"])
@pytest.mark.parametrize("strategy,dynamic", [("token", True), ("tensor", False)], ids=["dynamic", "static"])
def test_cpu_w8a8_c_kernel_equals_the_torch_path(strategy, dynamic, bits, symmetric, dtype, monkeypatch):
    # The C kernel serves fewer than ONEDNN_MIN_ROWS rows; it does torch's float operations in
    # torch's order on exact int32 sums, so the two paths agree bit for bit. From 16 rows on
    # it quantizes the rows (then oneDNN or torch._int_mm multiplies), also bit for bit.
    from hfcompress.quant import cpu_w8a8
    from hfcompress.quant.scheme import QuantArgs

    if cpu_w8a8._native_library() is None:
        pytest.skip("no C compiler: the torch._int_mm path serves decoding")
    act = QuantArgs(num_bits=8, symmetric=True, strategy=strategy, dynamic=dynamic, observer=None, zp_dtype=None)
    n, k = 37, 97  # odd N and K
    _, qw = quant_layer(n, k, bits=bits, group_size=-1, symmetric=symmetric)
    weights = QuantScheme.weight_only(num_bits=bits, group_size=-1, in_features=k, symmetric=symmetric).weights
    layer = QuantLinear.from_quantized(qw, QuantScheme(weights=weights, input_activations=act), bias=torch.randn(n))
    layer.to(dtype)
    if not dynamic:
        layer.input_scale.fill_(0.03)
    g = torch.Generator().manual_seed(1)
    for shape in [(1, 1, k), (1, k), (13, k), (3, 5, k), (40, k), (2, 20, k)]:
        x = (torch.randn(shape, generator=g) * torch.linspace(0.2, 4, k)).to(dtype)
        x[..., 7] = 0.0
        with torch.no_grad():
            fast = layer(x)
            with monkeypatch.context() as m:
                m.setattr(cpu_w8a8, "_native_library", lambda: None)
                slow = layer(x.clone())  # a new tensor: not the quantization cached for x
        assert fast.dtype == dtype and fast.shape == (*shape[:-1], n)
        assert torch.equal(fast, slow)
    # A row holding a NaN comes out NaN (in bfloat16 too, where the kernel rounds the output).
    x = torch.randn(3, k, generator=g).to(dtype)
    x[1, 5] = float("nan")
    with torch.no_grad():
        fast = layer(x)
        with monkeypatch.context() as m:
            m.setattr(cpu_w8a8, "_native_library", lambda: None)
            slow = layer(x.clone())
    assert fast[1].isnan().all() and not fast[[0, 2]].isnan().any()
    torch.testing.assert_close(fast, slow, rtol=0, atol=0, equal_nan=True)
    # A strided input (a column slice) is read correctly.
    wide = torch.randn(2, 2 * k, generator=g).to(dtype)
    with torch.no_grad():
        torch.testing.assert_close(layer(wide[:, :k]), layer(wide[:, :k].contiguous()), rtol=0, atol=0)


def test_cpu_w8a8_c_kernel_reads_the_current_static_scale(monkeypatch):
    # The kernel's fixed arguments are prepared once per layer (one array for ctypes); the
    # static input scale is read through its address at every call, so a scale changed in place
    # (load_state_dict) or replaced by a new tensor is the one used.
    from hfcompress.quant import cpu_w8a8
    from hfcompress.quant.scheme import QuantArgs

    if cpu_w8a8._native_library() is None:
        pytest.skip("no C compiler: the torch._int_mm path serves decoding")
    act = QuantArgs(num_bits=8, symmetric=True, strategy="tensor", dynamic=False, observer=None, zp_dtype=None)
    _, qw = quant_layer(24, 64, bits=8, group_size=-1, symmetric=True)
    weights = QuantScheme.weight_only(num_bits=8, group_size=-1, in_features=64, symmetric=True).weights
    layer = QuantLinear.from_quantized(qw, QuantScheme(weights=weights, input_activations=act))
    x = torch.randn(1, 64) * 3

    def torch_path():
        with monkeypatch.context() as m:
            m.setattr(cpu_w8a8, "_native_library", lambda: None)
            return layer(x.clone())

    with torch.no_grad():
        outs = []
        for change in (
            lambda: layer.input_scale.fill_(0.02),
            lambda: layer.load_state_dict({**layer.state_dict(), "input_scale": torch.tensor([0.05])}),
            lambda: setattr(layer, "input_scale", torch.tensor([0.08])),
        ):
            layer(x)  # the plan is built (or kept)
            change()
            fast = layer(x.clone())
            assert torch.equal(fast, torch_path())
            outs.append(fast)
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])


def test_cpu_w8a8_c_kernel_dot_paths_agree(tmp_path):
    """w8a8_cpu.c has three int8 dot products (AVX-512 VNNI on q + 128, AVX2 pair
    multiply-adds, plain C), chosen at compile time by the CPU it is built on; built for each
    instruction set this CPU has, all give the plain build's result."""
    import ctypes
    import shutil
    import subprocess

    from hfcompress.quant import cpu_w8a8, native

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    flags = {"plain": [], "native": ["-march=native"]}
    if " avx2" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False:
        flags["avx2"] = ["-mavx2"]  # only where it can run: an AVX2 build would crash elsewhere
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    g = torch.Generator().manual_seed(0)
    inputs = {  # K below, at and across the 64- and 16-byte vectors
        k: (torch.randn(3, k, generator=g) * 3, torch.randint(-128, 128, (41, k), generator=g, dtype=torch.int8))
        for k in (5, 64, 97, 130)
    }
    scales, corr = torch.rand(41), torch.randn(41)
    outs = {}
    for name, extra in flags.items():
        lib_path = tmp_path / f"w8a8-{name}.so"
        flags_ = [f for f in native.FLAGS if not f.startswith("-march")] + extra
        built = subprocess.run(
            [cc, *flags_, str(cpu_w8a8._NATIVE_SOURCE), "-o", str(lib_path), "-lm"], capture_output=True
        )
        if built.returncode != 0:
            continue  # this compiler or CPU lacks the instruction set
        lib = ctypes.CDLL(str(lib_path))
        lib.w8a8_linear.argtypes = [ptr, ctypes.c_int, i64, i64, i64, ptr, ptr, i64, ptr, ptr, ptr, ctypes.c_int,
                                    ctypes.c_float, ptr, ctypes.c_int, ctypes.c_int]  # fmt: skip
        for k, (x, w) in inputs.items():
            out = torch.empty(3, 41)
            w_sum = w.sum(1, dtype=torch.int32)
            failed = lib.w8a8_linear(x.data_ptr(), 2, 3, k, k, w.data_ptr(), w_sum.data_ptr(), 41, scales.data_ptr(),
                                     corr.data_ptr(), None, 1, 0.0, out.data_ptr(), 2, 1)  # fmt: skip
            assert failed == 0
            outs.setdefault(k, {})[name] = out
    assert all("plain" in by_name for by_name in outs.values())
    for by_name in outs.values():
        for out in by_name.values():
            assert torch.equal(out, by_name["plain"])


def test_cpu_w8a8_decode_falls_back_when_the_kernel_cannot_build(monkeypatch, tmp_path, caplog):
    from hfcompress.quant import cpu_w8a8, native
    from hfcompress.quant.scheme import QuantArgs

    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setattr(native, "cache_dir", lambda: tmp_path)
    cpu_w8a8._native_library.cache_clear()
    try:
        act = QuantArgs(num_bits=8, symmetric=True, strategy="token", dynamic=True, observer=None, zp_dtype=None)
        _, qw = quant_layer(16, 32, bits=8, group_size=-1, symmetric=True)
        weights = QuantScheme.weight_only(num_bits=8, group_size=-1, in_features=32, symmetric=True).weights
        layer = QuantLinear.from_quantized(qw, QuantScheme(weights=weights, input_activations=act))
        x = torch.randn(1, 32)
        torch.testing.assert_close(layer(x), dispatch.reference_forward(layer, x), rtol=1e-5, atol=1e-4)
        assert "W8A8 decode kernel" in caplog.text and "torch._int_mm" in caplog.text
        assert not list(tmp_path.rglob("*.so"))
    finally:
        cpu_w8a8._native_library.cache_clear()


def _w8a8_layer(n, k, *, bits, symmetric, strategy, dynamic, dtype, bias=True):
    from hfcompress.quant.scheme import QuantArgs

    act = QuantArgs(num_bits=8, symmetric=True, strategy=strategy, dynamic=dynamic, observer=None, zp_dtype=None)
    _, qw = quant_layer(n, k, bits=bits, group_size=-1, symmetric=symmetric)
    weights = QuantScheme.weight_only(num_bits=bits, group_size=-1, in_features=k, symmetric=symmetric).weights
    b = torch.randn(n) if bias else None
    layer = QuantLinear.from_quantized(qw, QuantScheme(weights=weights, input_activations=act), bias=b)
    layer.to(dtype)
    if not dynamic:
        layer.input_scale.fill_(0.03)
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bits,bias", [(8, True), (8, False), (4, True)], ids=["W8-bias", "W8", "W4-bias"])
@pytest.mark.parametrize("strategy,dynamic", [("token", True), ("tensor", False)], ids=["dynamic", "static"])
def test_cpu_w8a8_amx_kernel_equals_the_int_mm_path(strategy, dynamic, bits, bias, dtype, monkeypatch):
    # The AMX kernel takes the prefill's symmetric layers whose K is a multiple of 64. Its sums
    # are exact and its epilogue is torch's float operations in torch's order, so it equals
    # the torch._int_mm path bit for bit: row tails (T not a multiple of 32) and channels
    # past a multiple of 32 included.
    from hfcompress.quant import cpu_w8a8

    if not cpu_w8a8.amx_available():
        pytest.skip("no AMX-INT8 on this CPU (or no compiler with it)")
    n, k = 72, 192
    layer = _w8a8_layer(n, k, bits=bits, symmetric=True, strategy=strategy, dynamic=dynamic, dtype=dtype, bias=bias)
    amx_calls = []
    real_amx = cpu_w8a8.amx_int8_forward
    monkeypatch.setattr(cpu_w8a8, "amx_int8_forward", lambda *a: amx_calls.append(1) or real_amx(*a))
    g = torch.Generator().manual_seed(1)
    for shape in [(16, k), (37, k), (2, 33, k), (67, k), (128, k)]:
        x = (torch.randn(shape, generator=g) * torch.linspace(0.2, 4, k)).to(dtype)
        with torch.no_grad():
            fast = layer(x)
            with monkeypatch.context() as m:
                m.setattr(cpu_w8a8, "amx_available", lambda: False)
                m.setattr(cpu_w8a8, "onednn_available", lambda: False)
                slow = layer(x.clone())
        assert fast.dtype == dtype and fast.shape == (*shape[:-1], n)
        assert torch.equal(fast, slow)
    assert len(amx_calls) == 5


def test_cpu_w8a8_amx_kernel_serves_only_what_it_computes_exactly(monkeypatch):
    # Asymmetric weights (a zero-point term), K not a multiple of 64 and float16 inputs go to
    # the other int8 matmuls; decoding's few rows to the C dot-product kernel.
    from hfcompress.quant import cpu_w8a8

    if not cpu_w8a8.amx_available():
        pytest.skip("no AMX-INT8 on this CPU (or no compiler with it)")
    amx_calls = []
    real_amx = cpu_w8a8.amx_int8_forward
    monkeypatch.setattr(cpu_w8a8, "amx_int8_forward", lambda *a: amx_calls.append(1) or real_amx(*a))
    cases = [  # (k, symmetric, dtype, rows, served by AMX)
        (128, True, torch.float32, 40, True),
        (128, False, torch.float32, 40, False),
        (96, True, torch.float32, 40, False),
        (128, True, torch.float16, 40, False),
        (128, True, torch.float32, 3, False),
    ]
    for k, symmetric, dtype, rows, served in cases:
        layer = _w8a8_layer(24, k, bits=8, symmetric=symmetric, strategy="token", dynamic=True, dtype=dtype)
        x = torch.randn(rows, k).to(dtype)
        amx_calls.clear()
        with torch.no_grad():
            y = layer(x)
        assert bool(amx_calls) is served, (k, symmetric, dtype, rows)
        assert rel_err(y.float(), dispatch.reference_forward(layer, x).float()) < 1e-2


def test_cpu_w8a8_amx_is_not_used_where_it_is_unavailable_or_inexact(monkeypatch, caplog):
    from hfcompress.quant import cpu_w8a8

    class NoAMX:
        def w8a8_amx_init(self):
            return 0

    monkeypatch.setattr(cpu_w8a8, "_native_library", lambda: NoAMX())
    assert cpu_w8a8.amx_available.__wrapped__() is False
    monkeypatch.undo()
    monkeypatch.setenv(cpu_w8a8.NO_AMX_ENV, "1")  # the user's switch, checked before anything runs
    monkeypatch.setattr(cpu_w8a8, "_native_library", lambda: pytest.fail("probed despite HFCOMPRESS_NO_AMX"))
    assert cpu_w8a8.amx_available.__wrapped__() is False
    monkeypatch.undo()
    if not cpu_w8a8.amx_available():
        pytest.skip("no AMX-INT8 on this CPU (or no compiler with it)")
    real_int_mm = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: real_int_mm(a, b) + 1)  # a reference it cannot equal
    with caplog.at_level("INFO", logger="hfcompress.quant.cpu_w8a8"):
        assert cpu_w8a8.amx_available.__wrapped__() is False
    assert "did not reproduce torch._int_mm" in caplog.text


def test_cpu_amx_kernels_built_and_granted_pass_their_probe():
    # The AMX tests skip where amx_available() is False; a kernel built here, with the tile
    # state granted, that fails its exactness probe must fail the suite instead.
    from hfcompress.quant import cpu_w8a8

    lib = cpu_w8a8._native_library()
    if os.environ.get(cpu_w8a8.NO_AMX_ENV, "") not in ("", "0") or lib is None or not lib.w8a8_amx_init():
        pytest.skip("no AMX kernel built here, or no tile state granted")
    assert cpu_w8a8.amx_available.__wrapped__(), "the AMX kernels are built here but failed their probe"


@pytest.mark.parametrize("step", [64, 32], ids=["int8-tiles", "bf16-tiles"])
def test_cpu_amx_pack_is_the_tile_layout(step):
    """Runs on any CPU with a C compiler (packing is plain C). For k steps of ``step`` inputs
    (64: the int8 kernel, 32: the bfloat16 one), with ``per = step / 16`` consecutive inputs a
    channel in a tile row: channel n, input k sits at block (n // 16, k // step), row
    (k % step) // per, element per * (n % 16) + k % per; channels past N (to a multiple of 32)
    are zero. 4-bit codes go two to a byte: of each 32 positions, the first 16 in the low
    nibbles, plus 8."""
    from hfcompress.quant import cpu_w8a8

    if cpu_w8a8._native_library() is None:
        pytest.skip("no C compiler")
    n, k, per = 40, 3 * step, step // 16
    w = torch.randint(-128, 128, (n, k), generator=torch.Generator().manual_seed(0), dtype=torch.int8)

    def layout(codes):
        padded = torch.cat([codes, torch.zeros(64 - n, k, dtype=torch.int8)])
        return padded.view(4, 16, 3, 16, per).permute(0, 2, 3, 1, 4).reshape(-1)

    assert torch.equal(cpu_w8a8._amx_pack(w, step), layout(w))
    w4 = w // 16  # [-8, 7]
    packed4 = cpu_w8a8._amx_pack(w4, step, nibbles=True)
    halves = (layout(w4) + 8).reshape(-1, 2, 16).to(torch.int16)
    assert torch.equal(packed4.view(torch.uint8).to(torch.int16), (halves[:, 0] | (halves[:, 1] << 4)).reshape(-1))


AMX_WEIGHT_ONLY = [  # (bits, group_size, K): per channel, groups (the last one partial for W4 g64)
    (8, -1, 96),
    (4, -1, 96),
    (4, 64, 160),
    (4, 32, 96),
    (3, 128, 320),  # 2 and 3 bits: signed codes in the 4-bit pack's nibbles
    (2, -1, 96),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits,group_size,k", AMX_WEIGHT_ONLY, ids=[f"w{b}-g{g}-k{k}" for b, g, k in AMX_WEIGHT_ONLY])
def test_cpu_weight_only_prefill_on_amx_sums_the_bfloat16_inputs_exactly(bits, group_size, k, symmetric, dtype,
                                                                        monkeypatch):  # fmt: skip
    # From AMX_BF16_MIN_ROWS rows (prefill, and batched decoding), weight-only layers run the
    # AMX bfloat16 kernel: float32 sums of the exact codes, float32 scales per group, so the
    # only rounding is that of the inputs to bfloat16 (and of a bfloat16 or float16 output),
    # where torch's decode ops also round the scales and their output to bfloat16. Up to 16
    # rows it multiplies one row tile, from 17 two.
    from hfcompress.quant import cpu_w8a8

    if not cpu_w8a8.amx_available():
        pytest.skip("no AMX on this CPU (or no compiler with it)")
    n = 40  # channels past a multiple of 32
    layer, qw = quant_layer(n, k, bits=bits, group_size=group_size, symmetric=symmetric, bias=True)
    layer.to(dtype)
    calls = []
    real = cpu_w8a8.amx_bf16_linear
    monkeypatch.setattr(cpu_w8a8, "amx_bf16_linear", lambda *a: calls.append(1) or real(*a))
    dense = qw.dequantize().double()
    g = torch.Generator().manual_seed(1)
    least = cpu_w8a8.AMX_BF16_MIN_ROWS
    for rows, served in [(least - 1, False), (least, True), (15, True), (16, True), (17, True), (37, True),
                         (130, True)]:  # fmt: skip
        x = (torch.randn(rows, k, generator=g) * torch.linspace(0.2, 4, k)).to(dtype)
        calls.clear()
        with torch.no_grad():
            y = layer(x)
        assert bool(calls) is served and y.dtype == dtype and y.shape == (rows, n)
        exact = x.bfloat16().double() @ dense.t() + layer.bias.double()
        tol = 1e-6 if dtype == torch.float32 else 4e-3  # float32 sums; else the output's rounding
        assert rel_err(y.double(), exact) < (tol if served else 2e-2)


def test_cpu_w8a16_amx_needs_k_a_multiple_of_32(monkeypatch):
    from hfcompress.quant import cpu_w8a8

    if not cpu_w8a8.amx_available():
        pytest.skip("no AMX on this CPU (or no compiler with it)")
    monkeypatch.setattr(cpu_w8a8, "amx_bf16_linear", lambda *a: pytest.fail("AMX kernel called"))
    layer, qw = quant_layer(16, 200, bits=8, group_size=-1, symmetric=True)
    x = torch.randn(64, 200)
    assert rel_err(layer(x), x @ qw.dequantize().t()) < 2e-2


W4A8_AMX = [(4, 128, 320, False), (4, 64, 192, True), (4, 128, 256, False)]  # (bits, group, K, symmetric)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("strategy,dynamic", [("token", True), ("tensor", False)], ids=["dynamic", "static"])
@pytest.mark.parametrize("bits,group_size,k,symmetric", W4A8_AMX, ids=[f"w{b}-g{g}-k{k}" for b, g, k, _ in W4A8_AMX])
def test_grouped_w4a8_prefill_on_amx_is_the_reference_in_exact_int8(bits, group_size, k, symmetric, strategy,
                                                                    dynamic, dtype, monkeypatch):  # fmt: skip
    # Grouped weights with int8 inputs (W4A8 g128) take the AMX int8 kernel from AMX_MIN_ROWS
    # rows: exact int32 sums per group, then each group's scale and zero point in float32, so
    # the result is the reference's fq(x) @ dequantize(W)^T up to float32 rounding (bfloat16:
    # the output's). Fewer rows keep cpu_int4_a8's bfloat16 path.
    from hfcompress.quant import cpu_w8a8
    from hfcompress.quant.scheme import QuantArgs

    if not cpu_w8a8.amx_available():
        pytest.skip("no AMX on this CPU (or no compiler with it)")
    act = QuantArgs(num_bits=8, symmetric=True, strategy=strategy, dynamic=dynamic, observer=None, zp_dtype=None)
    n = 40
    _, qw = quant_layer(n, k, bits=bits, group_size=group_size, symmetric=symmetric)
    weights = QuantScheme.weight_only(num_bits=bits, group_size=group_size, in_features=k, symmetric=symmetric).weights
    layer = QuantLinear.from_quantized(qw, QuantScheme(weights=weights, input_activations=act), bias=torch.randn(n))
    layer.to(dtype)
    if not dynamic:
        layer.input_scale.fill_(0.03)
    calls = []
    real = cpu_w8a8.amx_int8_forward
    monkeypatch.setattr(cpu_w8a8, "amx_int8_forward", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(2)
    for rows, served in [(cpu_w8a8.AMX_MIN_ROWS - 1, False), (16, True), (2 * 37, True)]:
        x = (torch.randn(rows, k, generator=g) * torch.linspace(0.2, 4, k)).to(dtype)
        calls.clear()
        with torch.no_grad():
            y = layer(x)
            fq = dispatch.fake_quantize_inputs(layer, x.float())  # the int8 grid, in float32
            ref = fq.double() @ qw.dequantize().double().t() + layer.bias.double()
        assert bool(calls) is served and y.dtype == dtype and y.shape == (rows, n)
        if served:
            assert rel_err(y.double(), ref) < (1e-6 if dtype == torch.float32 else 4e-3)


def test_grouped_w4a8_amx_needs_k_and_groups_multiples_of_64(monkeypatch):
    from hfcompress.quant import cpu_w8a8
    from hfcompress.quant.scheme import QuantArgs

    if not cpu_w8a8.amx_available():
        pytest.skip("no AMX on this CPU (or no compiler with it)")
    monkeypatch.setattr(cpu_w8a8, "amx_int8_forward", lambda *a: pytest.fail("AMX int8 kernel called"))
    act = QuantArgs(num_bits=8, symmetric=True, strategy="token", dynamic=True, observer=None, zp_dtype=None)
    for group_size, k in [(32, 128), (64, 160)]:  # group not a multiple of 64; K not one
        _, qw = quant_layer(24, k, bits=4, group_size=group_size)
        weights = QuantScheme.weight_only(num_bits=4, group_size=group_size, in_features=k, symmetric=False).weights
        layer = QuantLinear.from_quantized(qw, QuantScheme(weights=weights, input_activations=act))
        x = torch.randn(32, k)
        assert rel_err(layer(x), dispatch.reference_forward(layer, x)) < 2e-2


def _w4a8_layer(n, k, group_size, symmetric, strategy="token", dynamic=True, bias=True, seed=0):
    from hfcompress.quant.scheme import QuantArgs

    act = QuantArgs(num_bits=8, symmetric=True, strategy=strategy, dynamic=dynamic, observer=None, zp_dtype=None)
    _, qw = quant_layer(n, k, bits=4, group_size=group_size, symmetric=symmetric, seed=seed)
    weights = QuantScheme.weight_only(num_bits=4, group_size=group_size, in_features=k, symmetric=symmetric).weights
    b = torch.randn(n, generator=torch.Generator().manual_seed(seed)) if bias else None
    layer = QuantLinear.from_quantized(qw, QuantScheme(weights=weights, input_activations=act), bias=b)
    if not dynamic:
        layer.input_scale.fill_(0.03)
    return layer, qw


@pytest.mark.parametrize("bits,group_size", [(8, -1), (4, -1), (4, 128)], ids=["w8a8", "w4a8", "w4a8-g128"])
def test_a_dynamic_per_tensor_scale_spans_all_the_rows_of_a_few_row_call(bits, group_size):
    # The one-C-call paths of a few rows quantize each row with its own scale; a dynamic
    # per-tensor scheme takes one scale over the whole input, so a row 10^4 times smaller than
    # another rounds to zero, as in the reference, whatever the number of rows. (The W8A8 call
    # of fewer than 16 rows once gave such a row its own scale.)
    from hfcompress.quant.scheme import QuantArgs

    act = QuantArgs(num_bits=8, symmetric=True, strategy="tensor", dynamic=True, observer=None, zp_dtype=None)
    _, qw = quant_layer(40, 256, bits=bits, group_size=group_size, symmetric=True)
    weights = QuantScheme.weight_only(num_bits=bits, group_size=group_size, in_features=256, symmetric=True).weights
    layer = QuantLinear.from_quantized(qw, QuantScheme(weights=weights, input_activations=act))
    x = torch.randn(3, 256) * torch.tensor([[0.01], [1.0], [100.0]])
    y, ref = layer(x), dispatch.reference_forward(layer, x)
    assert not ref[0].any() and not y[0].any()
    assert rel_err(y, ref) < 1e-5


def test_vnni_pack_puts_each_run_of_8_inputs_of_16_channels_in_64_bytes():
    from hfcompress.quant.cpu_w8a8 import _vnni_pack

    n, k = 40, 24  # channels padded to 64: 4 blocks of 16; 3 runs of 8 inputs
    codes = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    packed = _vnni_pack(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == 64 * k // 2
    for block, run, channel, j in [(0, 0, 0, 0), (1, 2, 7, 3), (2, 1, 7, 1), (0, 2, 15, 2)]:
        byte = int(packed[(block * (k // 8) + run) * 64 + channel * 4 + j])
        c = block * 16 + channel
        assert byte & 15 == codes[c, 8 * run + j] and byte >> 4 == codes[c, 8 * run + 4 + j]
    blocks = packed.view(4, k // 8, 16, 4)  # [block of 16 channels, run, channel, byte]
    assert not blocks[2, :, 8:].any() and not blocks[3].any()  # channels 40-63: padding


def test_the_vnni_kernel_is_there_where_the_cpu_has_avx512_vnni():
    # vnni_available() is False where the probe's exact sums fail: on a CPU with the instructions
    # (and a compiler) that would be a silent fallback to the slower path.
    import shutil

    from hfcompress.quant import cpu_w8a8

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if not all(f" {flag}" in flags for flag in ("avx512f", "avx512bw", "avx512_vnni")):
        pytest.skip("no AVX-512 VNNI on this CPU")
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler")
    assert cpu_w8a8.vnni_available()


W4A8_VNNI = [(128, 320, False), (64, 200, True), (128, 576, False), (32, 96, False)]  # (group, K, symmetric)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("strategy,dynamic", [("token", True), ("tensor", False)], ids=["dynamic", "static"])
@pytest.mark.parametrize("group_size,k,symmetric", W4A8_VNNI, ids=[f"g{g}-k{k}" for g, k, _ in W4A8_VNNI])
def test_grouped_w4a8_without_amx_is_the_reference_in_exact_int8(group_size, k, symmetric, strategy, dynamic, dtype,
                                                                 monkeypatch):  # fmt: skip
    # Without AMX, grouped W4A8 layers take the VNNI kernel at every row count: exact int32 sums
    # per group, then the AMX kernel's float32 epilogue, so the result is the reference's
    # fq(x) @ dequantize(W)^T + bias up to float32 rounding (bfloat16: the output's). A row
    # holding a NaN or an infinity gives a NaN row (its scale is NaN), the others are untouched.
    from hfcompress.quant import cpu_w8a8

    if not cpu_w8a8.vnni_available():
        pytest.skip("no AVX-512 VNNI on this CPU (or no compiler with it)")
    monkeypatch.setattr(cpu_w8a8, "amx_available", lambda: False)
    n = 40  # padded channels in the last tile of 32
    layer, qw = _w4a8_layer(n, k, group_size, symmetric, strategy, dynamic)
    layer.to(dtype)
    calls = []
    real = cpu_w8a8.vnni_int8_forward
    monkeypatch.setattr(cpu_w8a8, "vnni_int8_forward", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(2)
    for shape in [(1, k), (3, k), (2, 7, k), (37, k)]:  # row tails of the 4-row tiles
        x = (torch.randn(shape, generator=g) * torch.linspace(0.2, 4, k)).to(dtype)
        calls.clear()
        with torch.no_grad():
            y = layer(x)
            fq = dispatch.fake_quantize_inputs(layer, x.float())  # the int8 grid, in float32
            ref = fq.double() @ qw.dequantize().double().t() + layer.bias.double()
        assert calls and y.dtype == dtype and y.shape == (*shape[:-1], n)
        assert rel_err(y.double(), ref) < (1e-6 if dtype == torch.float32 else 4e-3)
    x = torch.randn(5, k, generator=g).to(dtype)
    x[3, 1] = float("nan")
    y = layer(x)
    assert y[3].isnan().all() and not y[[0, 1, 2, 4]].isnan().any()
    assert layer(torch.empty(0, k, dtype=dtype)).shape == (0, n)
    wide = torch.randn(3, 2 * k, generator=g).to(dtype)  # a column slice: strided rows
    if not dynamic:
        layer.input_scale.fill_(0.05)  # changed in place: the one-call path reads it at each call
    with torch.no_grad():
        y = layer(wide[:, :k])
        ref = dispatch.fake_quantize_inputs(layer, wide[:, :k].float()).double() @ qw.dequantize().double().t()
    assert rel_err(y.double(), ref + layer.bias.double()) < (1e-6 if dtype == torch.float32 else 4e-3)


def test_grouped_w4a8_takes_the_vnni_kernel_only_where_it_fits(monkeypatch):
    # Group sizes the int4 op does not tile, one scale per channel (torch._int_mm's case) and
    # float16 inputs stay on their former paths, with the reference's result.
    from hfcompress.quant import cpu_w8a8

    if not cpu_w8a8.vnni_available():
        pytest.skip("no AVX-512 VNNI on this CPU (or no compiler with it)")
    monkeypatch.setattr(cpu_w8a8, "amx_available", lambda: False)
    monkeypatch.setattr(cpu_w8a8, "vnni_int8_forward", lambda *a: pytest.fail("VNNI kernel called"))
    for group_size, k, dtype in [(36, 72, torch.float32), (-1, 64, torch.float32), (64, 128, torch.float16)]:
        layer, _ = _w4a8_layer(24, k, group_size, False)
        layer.to(dtype)
        x = torch.randn(20, k).to(dtype)
        assert rel_err(layer(x).float(), dispatch.reference_forward(layer, x).float()) < 2e-2
    # On AMX CPUs (not timed there) the calls the AMX kernel leaves keep the float path.
    layer, _ = _w4a8_layer(24, 128, 64, False)
    assert cpu_w8a8.vnni_int8_serves(layer, torch.randn(1, 128))
    monkeypatch.setattr(cpu_w8a8, "amx_available", lambda: True)
    assert not cpu_w8a8.vnni_int8_serves(layer, torch.randn(1, 128))


def test_grouped_w4a8_vnni_and_amx_kernels_agree_bit_for_bit(monkeypatch):
    # Where both kernels are here (a CPU with AMX): the same exact sums and float32 epilogue.
    from hfcompress.quant import cpu_w8a8

    if not (cpu_w8a8.vnni_available() and cpu_w8a8.amx_available()):
        pytest.skip("needs both the AMX and the VNNI kernel")
    layer, _ = _w4a8_layer(40, 320, 64, False)
    x = torch.randn(37, 320) * torch.linspace(0.2, 4, 320)
    assert torch.equal(cpu_w8a8.vnni_int8_forward(layer, x), cpu_w8a8.amx_int8_forward(layer, x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("strategy,dynamic", [("token", True), ("tensor", False), ("channel", False)])
def test_w4a8_decode_inputs_are_the_references_fake_quantization(strategy, dynamic, dtype, monkeypatch):
    # cpu_int4_a8's calls that neither AMX nor the VNNI kernel takes (float16 inputs, CPUs without
    # AVX-512 VNNI, group sizes below 32) put the inputs on their int8 grid: for per-token and
    # static per-tensor scales in one C pass (w8a8_fake_quantize_rows), once for the layers
    # reading one tensor; bit for bit fq(x), rows holding a NaN or an infinity included.
    from hfcompress.quant import cpu_w8a8
    from hfcompress.quant.scheme import QuantArgs

    lib = cpu_w8a8._native_library()
    native = lib is not None and lib.w8a8_quantize_is_vectorized() and strategy != "channel"
    calls = []
    if native:
        c_fake_quantize = lib.w8a8_fake_quantize_rows
        monkeypatch.setattr(lib, "w8a8_fake_quantize_rows", lambda *a: calls.append(1) or c_fake_quantize(*a))

    act = QuantArgs(num_bits=8, symmetric=True, strategy=strategy, dynamic=dynamic, observer=None, zp_dtype=None)
    k = 96
    _, qw = quant_layer(24, k, bits=4, group_size=32)
    weights = QuantScheme.weight_only(num_bits=4, group_size=32, in_features=k, symmetric=False).weights
    layer = QuantLinear.from_quantized(qw, QuantScheme(weights=weights, input_activations=act)).to(dtype)
    if not dynamic:
        layer.input_scale.copy_(torch.rand(layer.input_scale.shape) * 0.05 + 0.01)
    g = torch.Generator().manual_seed(3)

    def same(a, b):  # bit for bit, NaN where NaN
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)

    for shape in [(1, k), (1, 1, k), (13, k), (2, 40, k)]:
        x = (torch.randn(shape, generator=g) * torch.linspace(0.2, 4, k)).to(dtype)
        x.view(-1, k)[-1, 5] = float("nan") if len(shape) == 3 else float("inf")
        fast = cpu_w8a8.fake_quantized_input(layer, x)
        assert fast.dtype == dtype and fast.shape == x.shape
        # the finite rows: fq(x); the last row's scale is NaN, so the whole row is (the
        # reference keeps the infinity itself: either way the layer's output row is NaN)
        rows, reference = fast.view(-1, k), dispatch.fake_quantize_inputs(layer, x).view(-1, k)
        same(rows[:-1], reference[:-1])
        assert rows[-1].isnan().all()
        assert cpu_w8a8.fake_quantized_input(layer, x) is fast  # the next layer reading x
        x.view(-1, k)[-1, 5] = 0.0
        x.mul_(0.5)  # changed in place: quantized again
        same(cpu_w8a8.fake_quantized_input(layer, x), dispatch.fake_quantize_inputs(layer, x))
    wide = (torch.randn(3, 2 * k, generator=g) * 2).to(dtype)  # a strided input (a column slice)
    same(cpu_w8a8.fake_quantized_input(layer, wide[:, :k]), dispatch.fake_quantize_inputs(layer, wide[:, :k]))
    assert len(calls) == (9 if native else 0)
    x = torch.randn(2, k).to(dtype)
    assert dispatch.select_path(layer, x) == "cpu_int4_a8"
    assert rel_err(layer(x).float(), dispatch.reference_forward(layer, x).float()) < 2e-2


AMX_MODEL_SCHEMES = {  # name: (RTN fields, int8 inputs, the AMX entry point that must run)
    "W4A16 g64": (dict(bits=4, group_size=64, symmetric=False), False, "amx_bf16_linear"),
    "W8A16": (dict(bits=8, group_size=-1, symmetric=True), False, "amx_bf16_linear"),
    "W8A8": (dict(bits=8, group_size=-1, symmetric=True), True, "amx_int8_forward"),
    "W4A8 g64": (dict(bits=4, group_size=64, symmetric=False), True, "amx_int8_forward"),
}


@pytest.mark.parametrize("scheme", list(AMX_MODEL_SCHEMES))
def test_a_compressed_llama_prefills_on_amx_as_the_reference_does(scheme, monkeypatch):
    # A whole model (hidden 128, intermediate 256: the AMX kernels' multiples) on 2 x 12 = 24
    # rows per call: every quantized layer runs an AMX kernel, and the logits are the float32
    # reference kernel's up to the bfloat16 inputs (weight-only) or float rounding (A8; where
    # a rounding difference moves an input across a code boundary, the next layer sees one
    # code step more: a few 1e-4 here, where a wrong group scale or zero point costs 1e-1).
    from hfcompress import ActivationQuantConfig, RTNConfig, compress
    from hfcompress.quant import cpu_w8a8
    from tests.conftest import make_tiny_llama

    if not cpu_w8a8.amx_available():
        pytest.skip("no AMX on this CPU (or no compiler with it)")
    fields, acts, entry = AMX_MODEL_SCHEMES[scheme]
    model = make_tiny_llama(hidden_size=128, intermediate_size=256)
    compress(model, [RTNConfig(**fields), *([ActivationQuantConfig()] if acts else [])], progress=False)
    calls = []
    real = getattr(cpu_w8a8, entry)
    monkeypatch.setattr(cpu_w8a8, entry, lambda *a: calls.append(1) or real(*a))
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fast = model(ids).logits
        with dispatch.reference_path():
            ref = model(ids).logits
    assert len(calls) == 2 * 7  # every projection of both blocks
    assert rel_err(fast, ref) < (1e-2 if not acts else 1e-3)
