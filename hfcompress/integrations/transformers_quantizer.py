"""The one adapter to transformers' quantizer API (``HfQuantizer``) and its loading code.

Registering ``quant_method: "hfcompress"`` lets a plain ``AutoModel*.from_pretrained(dir)``
rebuild our compressed models after ``import hfcompress``, and lets
``from_pretrained(float_dir, quantization_config=HfCompressQuantizationConfig(recipe))``
compress a float checkpoint as it loads (with ``compress()``, once the weights are in).

Loading a compressed checkpoint: before the weights load, the recorded model patches are
re-applied (:mod:`hfcompress.patches`), the checkpoint's safetensors headers are checked
against the layers the config describes, and each recorded
layer is swapped for an empty module of its kind (:mod:`hfcompress.kinds`), so the stored
tensors load by name like any other. After loading, each module checks its tensors. A
truncated, edited or corrupt checkpoint fails with a :class:`CheckpointError` naming the
tensor or layer; so does a checkpoint whose files hold compressed tensors its config does
not describe, even when the ``quantization_config`` was deleted altogether (a guard on
transformers' load report, installed by :func:`register`).

Checkpoint format: version 2 records, per layer, its module kind and its layout (for
``quant_linear``, a :class:`~hfcompress.quant.scheme.QuantScheme`) and the recipe stage that
made it, plus the model patches. Version 3 adds one tensor, the load guard
(:func:`load_guard_key`): an empty ``uint8`` tensor stored as the first compressed layer's
``weight``. Without ``import hfcompress``, transformers does not know ``quant_method:
"hfcompress"`` and only warns; it would then build the float model and leave every compressed
layer randomly initialised. The guard's shape mismatches that float ``weight``, which makes
the load an error instead. Versions 1 (flat ``bits``/``group_size`` layer entries, no kinds)
and 2 are read and upgraded on load.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from hfcompress.data import is_calibration_text, reusable
from hfcompress.errors import CheckpointError, ModelError, RecipeError
from hfcompress.integrity import HASH_KEY, compressed_tensor_hashes, verify_files, verify_on_load
from hfcompress.kinds import CompressedModule, compressed_modules, get_module_kind, registered_module_kinds
from hfcompress.patches import apply_patches, recorded_patches
from hfcompress.quant.linear import QuantLinear
from hfcompress.recipe import Recipe

__all__ = [
    "FORMAT_VERSION",
    "QUANT_METHOD",
    "READABLE_FORMAT_VERSIONS",
    "HfCompressQuantizationConfig",
    "HfCompressQuantizer",
    "attach_quantization_config",
    "load_guard_key",
    "register",
]

logger = logging.getLogger(__name__)

QUANT_METHOD = "hfcompress"
FORMAT_VERSION = 3
READABLE_FORMAT_VERSIONS = (1, 2, 3)
# The load guard's (dtype, shape) in the safetensors header: an empty uint8 tensor (see the
# module docstring).
_GUARD_HEADER = ("U8", (0,))


def load_guard_key(layers: Collection[str]) -> str | None:
    """The key of the load guard for a model with compressed ``layers``: the ``weight`` of the
    first one by name, None without layers. That one replaced a float module: a layer nested
    in another (a low-rank layer's quantized factor, which replaced none) sorts after the
    layer holding it, whose name is a prefix of its own."""
    return f"{min(layers)}.weight" if layers else None


class HfCompressQuantizationConfig(QuantizationConfigMixin):
    """The ``quantization_config`` an hfcompress checkpoint carries in its ``config.json``; or,
    given a recipe (and calibration data for the stages that calibrate), the one to pass to
    ``from_pretrained`` to compress a float checkpoint as it loads
    (``quantization_config=HfCompressQuantizationConfig(recipe=...)``; not stages that train).

    Args:
        recipe: The stages that were applied, as ``Recipe.to_dict()`` gives them; or the stages
            to apply on load, in any form ``compress()`` takes (a Recipe, a YAML path or shipped
            name, one stage mapping, a list of configs or stage mappings).
        layers: For each compressed module, by qualified name: its ``spec()`` (``kind``,
            shapes, scheme, the stage that made it).
        patches: Model patches to re-apply before loading, in order.
        format_version: Layout version of the stored tensors (older versions are upgraded).
        calibration_data, tokenizer, num_calibration_samples, calibration_seq_len, seed: For
            compressing on load, what ``compress()`` takes under these names, for stages that
            calibrate (GPTQ, AWQ, SmoothQuant, static scales), as transformers' ``GPTQConfig``
            takes ``dataset`` and ``tokenizer``. ``tokenizer`` may be a name or folder; for text
            data without one, the checkpoint's own tokenizer is loaded. Not saved: the saved
            config records the stages and the layers they made.
    """

    # Arguments for compressing on load only: to_dict() (what config.json gets) leaves them out.
    _LOADING_ONLY = ("calibration_data", "tokenizer", "num_calibration_samples", "calibration_seq_len", "seed")

    def __init__(
        self,
        recipe: dict[str, Any] | None = None,
        layers: dict[str, dict[str, Any]] | None = None,
        patches: list[dict[str, Any]] | None = None,
        format_version: int = FORMAT_VERSION,
        *,
        calibration_data: Any = None,
        tokenizer: Any = None,
        num_calibration_samples: int = 128,
        calibration_seq_len: int = 512,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("quant_method", None)
        if kwargs:
            raise CheckpointError(f"unknown key(s) {sorted(kwargs)} in the hfcompress quantization_config")
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        if recipe is not None and (not isinstance(recipe, dict) or ("technique" in recipe and "stages" not in recipe)):
            recipe = Recipe.of(recipe).to_dict()  # a dict with "stages" is a saved config's, kept as written
        self.recipe = recipe or {}
        self.layers = layers or {}
        self.patches = patches or []
        self.calibration_data = reusable(calibration_data)  # read for the tokenizer, then by compress()
        self.tokenizer = tokenizer
        self.num_calibration_samples = num_calibration_samples
        self.calibration_seq_len = calibration_seq_len
        self.seed = seed
        self.post_init()

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().to_dict().items() if k not in self._LOADING_ONLY}

    def post_init(self) -> None:
        if self.format_version not in READABLE_FORMAT_VERSIONS:
            raise CheckpointError(
                f"checkpoint format_version={self.format_version!r}; this hfcompress reads "
                f"{list(READABLE_FORMAT_VERSIONS)}. Upgrade hfcompress or re-compress the model"
            )
        if not isinstance(self.layers, dict):
            raise CheckpointError(f"quantization_config.layers must be a mapping, got {type(self.layers).__name__}")
        if not isinstance(self.patches, list) or not all(isinstance(p, dict) and "name" in p for p in self.patches):
            raise CheckpointError(
                f"quantization_config.patches must be a list of {{'name': ...}} records: {self.patches}"
            )
        if self.format_version == 1:
            self.layers = {name: QuantLinear.spec_from_v1(name, spec) for name, spec in self.layers.items()}
        self.format_version = FORMAT_VERSION  # 2 lacks only the load guard, which saving adds
        for name, spec in self.layers.items():
            if not isinstance(spec, dict) or "kind" not in spec:
                raise CheckpointError(f"quantization_config.layers[{name!r}] lacks its 'kind'")
            try:
                get_module_kind(spec["kind"]).validate_spec(name, spec)
            except CheckpointError as exc:
                if repr(name) in str(exc):
                    raise
                raise CheckpointError(f"quantization_config.layers[{name!r}]: {exc}") from None


class HfCompressQuantizer(HfQuantizer):
    """Loads hfcompress checkpoints; and, for a config that holds only a recipe, compresses a
    float checkpoint once its weights have loaded (with ``hfcompress.compress``)."""

    requires_calibration = False  # a float checkpoint loads too, compressed by the config's recipe
    quantization_config: HfCompressQuantizationConfig

    def validate_environment(self, *args, **kwargs):
        if self.pre_quantized:
            return
        # Compressing on load: refused here, before any weight is read, when it cannot work.
        config = self.quantization_config
        if config.layers or config.patches:
            raise CheckpointError(
                "this quantization_config describes the layers of a compressed checkpoint, but the checkpoint being "
                "loaded is a float one; to compress it as it loads pass HfCompressQuantizationConfig(recipe=...)"
            )
        if not config.recipe:
            raise RecipeError(
                "HfCompressQuantizationConfig() passed to from_pretrained needs a recipe: "
                "HfCompressQuantizationConfig(recipe='llama_w8a16_rtn') or recipe=[RTNConfig(...)]"
            )
        for stage in Recipe.from_dict(config.recipe):
            what = f"stage {stage.name!r} ({stage.config.technique})"
            if type(stage.config).needs_training:
                raise RecipeError(
                    f"{what} trains the model and needs a training set, which from_pretrained cannot pass to it; "
                    "load the float model and call hfcompress.compress(model, recipe, train_dataset=...)"
                )
            if stage.config.needs_calibration and config.calibration_data is None:
                raise RecipeError(
                    f"{what} needs calibration data: pass HfCompressQuantizationConfig(recipe, "
                    "calibration_data=...) (text with the checkpoint's tokenizer, or token ids), or load the float "
                    "model and call hfcompress.compress(model, recipe, calibration_data=...)"
                )

    def _process_model_before_weight_loading(self, model, checkpoint_files: Iterable[str] | None = None, **kwargs):
        _guard_resizing()
        if not self.pre_quantized:
            return model  # a float checkpoint: it loads as is, and is compressed afterwards
        config = self.quantization_config
        apply_patches(model, config.patches)
        saved_guard = load_guard_key(config.layers)
        files = list(checkpoint_files) if checkpoint_files is not None else None
        convert = _loaded_name_function(model)
        # The files' tensors, read once, under the names transformers loads them by.
        found = None
        if files is not None:
            found = {(convert(k) if convert else k): v for k, v in _read_headers(files).items()}
        names = _model_names(model, config.layers, list(found) if found is not None else None)
        modules = dict(model.named_modules())
        kept = [new for new in names.values() if new is not None]
        outer = [n for n in kept if not any(n.startswith(f"{o}.") for o in kept)]  # nested ones replace none
        if convert is not None and any(n not in modules for n in outer):
            saved = (getattr(model.config, "architectures", None) or ["the class it was saved from"])[0]
            raise CheckpointError(
                f"this checkpoint was saved from a model with a different head than {type(model).__name__}, and "
                "transformers renames this architecture's keys on load, which hfcompress cannot follow across "
                f"classes yet; load it as {saved} and use its base model or language model"
            )
        if files is not None:
            check_checkpoint(files, config.layers, headers=found, keep=names)
            if verify_on_load():
                verify_files(files)
        self.dropped_layers = sorted(name for name, new_name in names.items() if new_name is None)
        config.layers = _rename_layers(model, config.layers, names)
        for name, spec in config.layers.items():
            try:
                old = model.get_submodule(name)
            except AttributeError:
                raise CheckpointError(
                    f"quantization_config names layer {name!r}, which this model ({type(model).__name__}) lacks"
                ) from None
            kind = get_module_kind(spec["kind"])
            if not isinstance(old, kind.replaces):
                raise CheckpointError(
                    f"layer {name!r} is a {type(old).__name__}; a {kind.kind!r} module replaces "
                    f"{', '.join(c.__name__ for c in kind.replaces)}"
                )
            with torch.device("meta"):
                new = kind.from_spec(spec, old)
            model.set_submodule(name, new)
            # Some models' weight init reaches from a parent into its children's `.weight`
            # (GPT-2's scaled init of c_proj): a compressed module has none, and everything it
            # holds comes from the checkpoint. Mark both as initialised so init skips them.
            parent = model.get_submodule(name.rpartition(".")[0])
            new._is_hf_initialized = True
            if new.shields_parent_init:
                parent._is_hf_initialized = True
        # The compressed module has no `weight`: the guard is not an unexpected key (nor the
        # tensors of a head this model class does not have, which transformers drops).
        ignored = {saved_guard, load_guard_key(config.layers)} - {None}
        ignored = {rf"^{re.escape(key)}$" for key in ignored}
        ignored |= {rf"^{re.escape(name)}\." for name in self.dropped_layers}
        if ignored:
            model._keys_to_ignore_on_load_unexpected = {*(model._keys_to_ignore_on_load_unexpected or ()), *ignored}
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        if not self.pre_quantized:
            return self._compress_loaded(model)
        modules = compressed_modules(model)
        for module in modules.values():
            module.attach(model)
        for name, module in modules.items():
            module.check_loaded(name)
        return model

    def _compress_loaded(self, model):
        from hfcompress.api import compress

        # transformers set this recipe-only config as the model's; compress() records the one
        # its stages leave (the layers they made), with a quantizer that saves them.
        config = self.quantization_config
        tokenizer = _calibration_tokenizer(config.tokenizer, config.calibration_data, model)
        del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        return compress(
            model,
            config.recipe,
            calibration_data=config.calibration_data,
            tokenizer=tokenizer,
            num_calibration_samples=config.num_calibration_samples,
            calibration_seq_len=config.calibration_seq_len,
            seed=config.seed,
        )

    def get_state_dict_and_metadata(self, model):
        # Digests of the compressed tensors go into every safetensors file's metadata, under
        # the names the files will use (transformers renames some keys on save, e.g. Mixtral's
        # `mlp.` back to its original `block_sparse_moe.`).
        from transformers.core_model_loading import revert_weight_conversion

        hashes = compressed_tensor_hashes(model)
        digests = list(hashes.values())
        # Each key travels with a tensor holding its digest's index; renaming keeps the tensors.
        saved = revert_weight_conversion(model, {key: torch.tensor([i]) for i, key in enumerate(hashes)})
        renamed = {key: digests[int(index)] for key, index in saved.items()}
        state_dict = model.state_dict()
        guard = load_guard_key(self.quantization_config.layers)
        if guard is not None:
            state_dict[guard] = torch.zeros(_GUARD_HEADER[1], dtype=torch.uint8)
        return state_dict, {HASH_KEY: json.dumps(renamed, sort_keys=True)}

    def _dequantize(self, model, dtype=None):
        # model.dequantize(): transformers removes the quantization config afterwards.
        from hfcompress.dequantizing import dequantize_model

        return dequantize_model(model, dtype)

    #: Set by an interrupted ``compress()``: why the model is partly compressed (saving is refused).
    interrupted: str | None = None

    def is_serializable(self) -> bool:
        if self.interrupted:
            raise ModelError(
                f"{self.interrupted}, so the model is partly compressed; saving it is refused (no recipe describes "
                "it). Load the float model again and compress that (with checkpoint_dir=..., a layerwise stage "
                "resumes after its last saved block)"
            )
        return True

    @property
    def is_trainable(self) -> bool:
        # Adapters train on our quantized layers (hfcompress.integrations.peft).
        return True

    @property
    def is_qat_trainable(self) -> bool:
        """Whether the model trains without adapters: low-rank layers hold float factors
        (recovery by distillation or fine-tuning trains them)."""
        from hfcompress.techniques.low_rank.layer import LowRankLinear

        return any(spec.get("kind") == LowRankLinear.kind for spec in self.quantization_config.layers.values())


def _calibration_tokenizer(tokenizer: Any, data: Any, model: torch.nn.Module) -> Any:
    """The tokenizer for compressing on load: the given one (loaded when named), else for text
    data the checkpoint's own, else None (token ids need none)."""
    if isinstance(tokenizer, str):
        source = tokenizer
    elif tokenizer is not None or data is None or not is_calibration_text(data):
        return tokenizer
    else:
        source = getattr(model, "name_or_path", None)
        if not source:
            raise RecipeError(
                "calibration text needs a tokenizer: pass HfCompressQuantizationConfig(..., tokenizer=...)"
            )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise RecipeError(
            f"could not load a tokenizer from {source!r} for the calibration text: pass "
            f"HfCompressQuantizationConfig(..., tokenizer=...) (transformers said: {exc})"
        ) from None


_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def _read_headers(checkpoint_files: list[str]) -> dict[str, tuple[str, tuple[int, ...]]]:
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    for file in checkpoint_files:
        if not str(file).endswith(".safetensors"):
            raise CheckpointError(f"{file}: hfcompress checkpoints are safetensors files")
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    found[key] = (sl.get_dtype(), tuple(sl.get_shape()))
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise CheckpointError(f"{file} is not a readable safetensors file ({exc}); re-save the model") from exc
    return found


def _marker_suffixes() -> tuple[str, ...]:
    return tuple(f".{m}" for kind in registered_module_kinds().values() for m in kind.marker_tensors)


def undescribed_compressed_layers(keys: Iterable[str], layers: dict[str, Any]) -> list[str]:
    """Layers whose compressed tensors (``X.qweight``, ...) are among ``keys`` although
    ``layers`` does not describe them."""
    suffixes = _marker_suffixes()
    found = {key[: -len(s)] for key in keys for s in suffixes if key.endswith(s)}
    return sorted(found - set(layers))


def _model_names(
    model: torch.nn.Module, layers: dict[str, Any], keys: list[str] | None = None
) -> dict[str, str | None]:
    """Each checkpoint layer name as ``model`` calls it, None for a layer it does not build.

    transformers loads a checkpoint of a model with a head into its base model
    (``AutoModel.from_pretrained`` on a causal LM or a classifier) by dropping the
    ``base_model_prefix`` from the keys and the head's tensors, and a base model's checkpoint
    into a model with a head by adding the prefix; whether the checkpoint has the prefix, it
    tells from all its ``keys`` (the layer names when the files are not known). The compressed
    layers follow the same rule.
    """
    prefix = getattr(model, "base_model_prefix", "") or ""
    inside = f"{prefix}."
    has_prefix = bool(prefix) and any(key.startswith(inside) for key in (keys if keys is not None else layers))
    expects_prefix = bool(prefix) and isinstance(getattr(model, prefix, None), torch.nn.Module)
    if has_prefix and not expects_prefix:  # a model with a head, loaded as its base model
        return {name: name[len(prefix) + 1 :] if name.startswith(inside) else None for name in layers}
    if expects_prefix and not has_prefix:  # a base model, loaded under a head
        return {name: f"{prefix}.{name}" for name in layers}
    return {name: name for name in layers}


def _rename_layers(
    model: torch.nn.Module, layers: dict[str, dict[str, Any]], names: dict[str, str | None]
) -> dict[str, dict[str, Any]]:
    """``layers`` under the model's names (:func:`_model_names`), without those it lacks; a
    layer tied to one it lacks is an error naming the class to load instead."""
    if all(names[name] == name for name in layers):
        return layers
    renamed = {}
    for name, spec in layers.items():
        if names[name] is None:
            continue
        tied = spec.get("tied_to")
        if tied is not None:
            if names.get(tied) is None:
                raise CheckpointError(
                    f"layer {name!r} reads its packed rows from {tied!r} (an embedding quantized with its tied head), "
                    f"which {type(model).__name__} does not build; load the checkpoint with the class it was saved "
                    "from (e.g. AutoModelForCausalLM) and use its base model (model.model)"
                )
            spec = {**spec, "tied_to": names[tied]}
        renamed[names[name]] = spec
    return renamed


def _loaded_name_function(model) -> Callable[[str], str] | None:
    """The key a checkpoint tensor gets when transformers loads it into ``model`` (its
    conversion mapping's renamings), so file keys compare with the model's module names; None
    when the mapping renames nothing."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    if not renamings and not converters:
        return None
    return lambda key: rename_source_key(key, renamings, converters)[0]


def check_checkpoint(
    checkpoint_files: list[str],
    layers: dict[str, dict[str, Any]],
    headers: dict[str, tuple[str, tuple[int, ...]]] | None = None,
    keep: dict[str, str | None] | None = None,
) -> None:
    """Compare the safetensors headers with the tensors the config promises; raise on any gap,
    and on compressed tensors the config does not describe. ``headers``: the files' tensors as
    :func:`_read_headers` gives them, under the names the model loads them by (read from the
    files when not given); ``keep`` (from :func:`_model_names`) leaves out the layers the
    loading model does not build, and their tensors."""
    found = dict(headers) if headers is not None else _read_headers(checkpoint_files)
    if keep is not None:
        dropped = tuple(f"{name}." for name, new in keep.items() if new is None)
        if dropped:
            layers = {name: spec for name, spec in layers.items() if keep[name] is not None}
            guard = load_guard_key(keep)
            found = {key: v for key, v in found.items() if not key.startswith(dropped) and key != guard}
    where = Path(checkpoint_files[0]).parent if checkpoint_files else "checkpoint"
    guard = load_guard_key(layers)
    if guard in found and found.pop(guard) != _GUARD_HEADER:
        raise CheckpointError(
            f"{where}: tensor {guard!r} should be the empty uint8 load guard that hfcompress writes; the files "
            "were edited. Re-save the compressed model"
        )
    undescribed = undescribed_compressed_layers(found, layers)
    if undescribed:
        raise CheckpointError(
            f"{where}: the files hold compressed tensors for layer(s) {undescribed[:4]} that quantization_config "
            "does not describe; config.json was edited or belongs to another model. Restore the saved config.json"
        )
    for name, spec in layers.items():
        # A layer nested in this one (a quantized factor of a low-rank layer) is described by
        # its own entry: its tensors are checked there.
        nested = tuple(f"{other}." for other in layers if other.startswith(f"{name}."))
        expected = {
            key: value
            for key, value in get_module_kind(spec["kind"]).expected_tensors(name, spec).items()
            if not key.startswith(nested)
        }
        for key, (dtype, shape) in expected.items():
            what = f"{dtype or 'float'} {list(shape)}"
            if key not in found:
                raise CheckpointError(
                    f"{where}: tensor {key!r} ({what}) is missing; the save was interrupted or "
                    "the files were edited. Re-save the compressed model"
                )
            # dtype None: a float tensor in the model's dtype.
            ok = found[key][1] == shape and (found[key][0] == dtype if dtype else found[key][0] in _FLOAT_DTYPES)
            if not ok:
                raise CheckpointError(
                    f"{where}: tensor {key!r} is {found[key][0]} {list(found[key][1])}, expected {what}; "
                    "the checkpoint does not match its quantization_config"
                )
        extra = sorted(
            k
            for k in found
            if k.startswith(f"{name}.") and k not in expected and not k.endswith(".bias") and not k.startswith(nested)
        )
        if extra:
            raise CheckpointError(
                f"{where}: layer {name!r} has tensor(s) {extra} that its quantization_config entry does not describe "
                f"(its scheme: {spec.get('scheme')}); the config was edited. Restore the saved config.json"
            )


def attach_quantization_config(model: torch.nn.Module, recipe: dict[str, Any]) -> None:
    """Record the model's compressed modules, its patches and the applied recipe so
    ``save_pretrained`` writes them and ``from_pretrained`` rebuilds them. A model with no
    compressed module and no patch gets no quantization config (it loads as a plain model)."""
    layers = {name: m.spec() for name, m in compressed_modules(model).items()}
    patches = recorded_patches(model)
    if not layers and not patches:
        return
    previous = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(previous, HfCompressQuantizationConfig):
        recipe = {"stages": previous.recipe.get("stages", []) + recipe.get("stages", [])}
    config = HfCompressQuantizationConfig(recipe=recipe, layers=layers, patches=patches)
    _guard_resizing()
    model.config.quantization_config = config
    model.hf_quantizer = HfCompressQuantizer(config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD


def mark_interrupted(model: torch.nn.Module, recipe: dict[str, Any], message: str) -> None:
    """Record that ``compress()`` stopped part-way (``message`` says where and why): the layers
    compressed so far are described (the model keeps running), and saving it is refused."""
    object.__setattr__(model, INTERRUPTED_ATTR, message)
    try:
        attach_quantization_config(model, recipe)
    except Exception as exc:  # a layer left half-built: the error that stopped compress() comes first
        logger.warning("%s; the layers done so far could not be described (%s)", message, exc)
    quantizer = getattr(model, "hf_quantizer", None)
    if not isinstance(quantizer, HfCompressQuantizer):  # nothing compressed yet: saving is refused all the same
        quantizer = HfCompressQuantizer(HfCompressQuantizationConfig(recipe=recipe), pre_quantized=True)
        model.hf_quantizer = quantizer
    quantizer.interrupted = message


INTERRUPTED_ATTR = "_hfcompress_interrupted"


def _guard_plain_loads() -> None:
    """Make a load whose files hold packed tensors that its config does not describe (the
    ``quantization_config`` deleted or overwritten) an error instead of a model with randomly
    initialised layers.

    transformers reports such tensors only as "unexpected keys" in a warning. Its report
    function is wrapped: the check runs on the same load info, after the report, so nothing
    else about loading changes. Importing ``transformers.modeling_utils`` here would cost a
    second and import Triton, so its bound name is patched only if it is already imported
    (otherwise it binds the wrapper when it is).
    """
    import sys

    from transformers.utils import loading_report

    original = loading_report.log_state_dict_report
    if getattr(original, "_hfcompress_guard", False):
        return

    @functools.wraps(original)
    def report(model, pretrained_model_name_or_path, ignore_mismatched_sizes, loading_info, logger=None):
        try:  # raises itself on the load guard's size mismatch: ours is the clearer error
            original(model, pretrained_model_name_or_path, ignore_mismatched_sizes, loading_info, logger)
        finally:
            _refuse_undescribed(pretrained_model_name_or_path, loading_info)

    report._hfcompress_guard = True
    loading_report.log_state_dict_report = report
    modeling_utils = sys.modules.get("transformers.modeling_utils")
    if modeling_utils is not None:
        modeling_utils.log_state_dict_report = report


def _guard_resizing() -> None:
    """Make ``resize_token_embeddings`` on a model whose token embedding or LM head is compressed
    an error before anything changes. transformers resized the float embedding first and then
    failed on the packed head ("no attribute 'weight'"), leaving a model whose embedding and head
    disagree. Patched once, when the first compressed model is made or loaded (by then
    ``transformers.modeling_utils`` is imported)."""
    from transformers import PreTrainedModel

    original = PreTrainedModel.resize_token_embeddings
    if getattr(original, "_hfcompress_guard", False):
        return

    @functools.wraps(original)
    def resize_token_embeddings(self, *args, **kwargs):
        ends = {"token embedding": self.get_input_embeddings(), "LM head": self.get_output_embeddings()}
        for name, module in ends.items():
            if isinstance(module, CompressedModule):
                raise ModelError(
                    f"the {name} ({type(module).__name__}) holds packed integers, which cannot be resized; resize "
                    "the float model's embeddings before compressing it, or call model.dequantize() first"
                )
        return original(self, *args, **kwargs)

    resize_token_embeddings._hfcompress_guard = True
    PreTrainedModel.resize_token_embeddings = resize_token_embeddings


def _refuse_undescribed(pretrained_model_name_or_path, loading_info) -> None:
    undescribed = undescribed_compressed_layers(loading_info.unexpected_keys, {})
    if undescribed:
        raise CheckpointError(
            f"{pretrained_model_name_or_path}: the files hold packed quantized tensors for layer(s) "
            f"{undescribed[:4]} that config.json does not describe (its quantization_config was deleted or "
            "overwritten); loading would give randomly initialised layers. Restore the saved config.json"
        )


def register() -> None:
    """Register the config and quantizer with transformers, and the plain-load guard (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(HfCompressQuantizationConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(HfCompressQuantizer)
    _guard_plain_loads()
