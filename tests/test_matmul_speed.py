import pytest
import torch

from hfcompress import layerwise, matmul_speed


def test_the_speedup_is_a_measured_ratio_of_float32_time_to_the_half_dtypes():
    timed = [d for d in (torch.bfloat16, torch.float16) if matmul_speed.onednn_has(d)]
    if not timed:
        pytest.skip("oneDNN has neither half dtype here (they are not timed)")
    for dtype in timed:
        speedup = matmul_speed.matmul_speedup(dtype, rounds=1)
        assert 1e-3 < speedup < 1e3


def test_the_speedup_is_measured_outside_an_autocast(monkeypatch):
    # Inside a bfloat16 autocast the float32 matmul would run in bfloat16: a ratio near 1.
    dtypes = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda a, b: dtypes.append(linear(a, b).dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        matmul_speed.matmul_speedup.__wrapped__(torch.bfloat16, rounds=1)
    assert set(dtypes) == {torch.float32, torch.bfloat16}


def test_the_speedup_is_measured_on_the_cpu_whatever_the_default_device(monkeypatch):
    devices = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda a, b: devices.append(linear(a, b).device))
    with torch.device("meta"):
        matmul_speed.matmul_speedup.__wrapped__(torch.bfloat16, rounds=1)
    assert set(devices) == {torch.device("cpu")}


@pytest.mark.parametrize("speedup,pays", [(2.4, True), (1.25, True), (1.1, False), (0.6, False)])
def test_a_half_dtype_pays_only_where_it_is_clearly_faster(speedup, pays, monkeypatch):
    # AVX-512 BF16 on both: bfloat16 took 2.2-2.7x less time than float32 on an AMD EPYC VM and
    # 1.6-1.8x more on an Intel Xeon VM without AMX. In a near tie float32, the more precise, wins.
    monkeypatch.setattr(matmul_speed, "onednn_has", lambda dtype: True)
    monkeypatch.setattr(matmul_speed, "matmul_speedup", lambda dtype: speedup)
    assert matmul_speed.half_matmul_pays(torch.bfloat16) is pays


def test_a_half_dtype_without_a_onednn_path_is_not_timed(monkeypatch):
    # There a bfloat16 matmul runs tens of times slower than float32: timing it would take seconds.
    monkeypatch.setattr(matmul_speed, "onednn_has", lambda dtype: False)
    monkeypatch.setattr(matmul_speed, "matmul_speedup", lambda dtype: pytest.fail("timed"))
    assert not matmul_speed.half_matmul_pays(torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_cpu_computes_in_a_half_dtype_only_where_onednn_has_it_and_it_pays(dtype, monkeypatch):
    native = layerwise.native_bfloat16 if dtype == torch.bfloat16 else layerwise.native_float16
    has = {}
    monkeypatch.setattr(matmul_speed, "onednn_has", lambda d: has[d])
    for onednn, speedup, expected in ((True, 2.0, True), (True, 0.6, False), (False, 2.0, False)):
        has[dtype] = onednn
        monkeypatch.setattr(matmul_speed, "matmul_speedup", lambda d, s=speedup: s)
        native.cache_clear()
        try:
            assert native("cpu") is expected
        finally:
            native.cache_clear()


def test_a_slow_bfloat16_setting_warns_once_with_the_measured_ratio(monkeypatch, caplog):
    monkeypatch.setattr(layerwise, "native_bfloat16", lambda device_type: False)
    monkeypatch.setattr(layerwise, "onednn_has", lambda dtype: True)
    monkeypatch.setattr(layerwise, "matmul_speedup", lambda dtype: 0.62)
    monkeypatch.setattr(layerwise, "_WARNED_BF16", set())
    with caplog.at_level("WARNING", logger="hfcompress.layerwise"):
        assert layerwise.autocast_dtype("bfloat16", "cpu") is None
        assert layerwise.autocast_dtype("bfloat16", "cpu") is None
    (record,) = caplog.records
    assert "compute_dtype: bfloat16 asked for" in record.message
    assert "a bfloat16 matmul is 0.62x as fast as float32's" in record.message
    assert "Set compute_dtype: float32 to silence this" in record.message
