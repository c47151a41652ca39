"""hfcompress.quant.native: building and caching the C kernels."""

import pytest


def test_c_kernels_rebuild_when_a_header_they_include_changes(monkeypatch, tmp_path):
    # The build cache is keyed on the source and the local headers it includes with quotes
    # (cpu_bf16.h): an edited header must not load a library built from the old one.
    import ctypes
    import shutil

    from hfcompress.quant import native

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("CC", cc)
    monkeypatch.setattr(native, "cache_dir", lambda: tmp_path / "cache")
    (tmp_path / "value.h").write_text("static int value(void) { return 1; }\n")
    source = tmp_path / "probe.c"
    source.write_text('#include "value.h"\nint probe(void) { return value(); }\n')
    first = native.build(source)
    assert native.build(source) == first  # cached
    (tmp_path / "value.h").write_text("static int value(void) { return 2; }\n")
    second = native.build(source)
    assert second != first and ctypes.CDLL(str(second)).probe() == 2
