"""The one verb: ``compress(model, recipe)``; and an atomic ``save_pretrained``."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableSet
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hfcompress.errors import ModelError, RecipeError
from hfcompress.experts import PATCH as EXPERTS_PATCH
from hfcompress.experts import fuse_experts_back, unfuse_experts
from hfcompress.integrations.transformers_quantizer import (
    INTERRUPTED_ATTR,
    HfCompressQuantizationConfig,
    attach_quantization_config,
    mark_interrupted,
)
from hfcompress.kinds import compressed_modules, is_linear_like
from hfcompress.layerwise import autocast_dtype, autocast_for, compute_device, offloads
from hfcompress.modes import evaluating
from hfcompress.modifier import CompressionContext, ModelView
from hfcompress.patches import record_patch, recorded_patches
from hfcompress.recipe import Recipe, Stage
from hfcompress.registry import technique_for_config
from hfcompress.saving import check_folder, save_atomically
from hfcompress.upcast import float32_while

__all__ = ["compress", "save_pretrained"]

logger = logging.getLogger(__name__)


def _after_earlier_calls(recipe: Recipe, model: nn.Module) -> Recipe:
    """``recipe`` with the stage names that the model's recorded recipe already uses (an
    earlier ``compress()`` call, or a compressed checkpoint) suffixed ``_2``, ``_3``, ...: the
    recorded recipe appends this one, and must stay a recipe that ``compress`` accepts (the
    model card prints it to reproduce the model)."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if not isinstance(config, HfCompressQuantizationConfig):
        return recipe
    earlier = {s.get("name") for s in config.recipe.get("stages", [])}
    taken = earlier | {s.name for s in recipe}
    stages = []
    for stage in recipe:
        name = stage.name
        if name in earlier:
            k = 2
            while f"{name}_{k}" in taken:
                k += 1
            name = f"{name}_{k}"
            taken.add(name)
            logger.info("stage %r is named %r: the model's recorded recipe has one named so", stage.name, name)
        stages.append(Stage(name=name, config=stage.config))
    return Recipe(stages)


def _usable_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` as a torch.device, or a ModelError when this torch cannot run on it (a CPU
    build, or no GPU of that index), before any stage starts."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ModelError(f"device={device!r} is not a torch device ({exc}); pass e.g. 'cpu' or 'cuda:0'") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        found = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA"
        raise ModelError(f"device={device!r}, but this torch ({torch.__version__}) sees {found}; pass device='cpu'")
    return dev


def compress(
    model: nn.Module,
    recipe: Recipe | str | os.PathLike | Any,
    *,
    tokenizer: Any = None,
    calibration_data: Any = None,
    train_dataset: Any = None,
    eval_dataset: Any = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    num_calibration_samples: int = 128,
    calibration_seq_len: int = 512,
    seed: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
) -> nn.Module:
    """Compress ``model`` in place with ``recipe`` and return it.

    Every stage is checked, in order, against the model as the stages before it will leave
    it, and against the given data, before any stage runs: an invalid recipe, or a stage the
    earlier ones leave with nothing to do, leaves the model untouched. Afterwards the model carries a
    ``quantization_config`` that ``save_pretrained`` writes and ``from_pretrained`` reads back.
    Called under ``torch.inference_mode()`` it gives the model it gives under ``torch.no_grad()``;
    on a model whose weights were made in inference mode, a stage that takes gradients (learned
    rounding, tuned static scales, a sensitivity budget, distillation) is refused up front.
    A float16 model on a CPU without a fast float16 matrix multiply (bfloat16 on an AVX2-only
    one) is cast to float32 for the stages that calibrate or train and back afterwards, where
    memory allows (:mod:`hfcompress.upcast`).
    A model compressed before (an earlier call, or a compressed checkpoint) can take stages
    that add to its layers (``int8_activations``, ``kv_cache``); its recorded recipe gets this
    one's stages appended, a stage name it already holds suffixed ``_2`` (``_3``, ...).
    A stage that fails or is interrupted part-way leaves the layers it finished compressed; that
    model runs, but saving it and compressing it again are refused (load the float model again;
    with ``checkpoint_dir`` a layerwise stage resumes).

    Args:
        model: A transformers model (or any ``nn.Module``).
        recipe: A :class:`Recipe`, a recipe YAML file (a path, or a shipped recipe's name), a
            mapping (a recipe with ``stages``, or one stage: ``{"technique": "rtn", "bits": 4}``),
            or technique configs and stage mappings (a list, or one config).
        tokenizer: Tokenizer for text calibration data.
        calibration_data: Calibration samples, for stages that need them: text (a list of
            strings, a file, ``"wikitext2:valid"``, a Dataset's ``text`` column), cut into
            windows; or token ids of one length (a ``[num_samples, seq_len]`` tensor, a list of
            id tensors or of unpadded tokenizer outputs, a Dataset's ``input_ids`` column); a
            DataLoader or a generator of either is read once into a list.
        train_dataset: Training set, for stages that train.
        eval_dataset: Evaluation set, for stages that train.
        device: Compute device for layerwise stages; None uses the model's first parameter's.
        progress: Show progress bars.
        num_calibration_samples: Windows of ``calibration_seq_len`` tokens drawn (seeded) from
            text calibration data; token-id tensors are used as given. The defaults, 128
            windows of 512 tokens, follow GPTQ's setup (128 samples) at the shorter window
            llm-compressor's examples use.
        calibration_seq_len: Tokens per calibration window.
        seed: Seed of the calibration draw.
        checkpoint_dir: Layerwise stages save each finished block here, and a ``pkd`` stage its
            training checkpoints; a run killed mid-way and started again with the same
            arguments resumes after the last saved block (or training checkpoint).

    Returns:
        The same ``model`` object, compressed.
    """
    recipe = Recipe.of(recipe)
    if not isinstance(model, nn.Module):
        raise RecipeError(f"compress() needs a torch.nn.Module, got {type(model).__name__}")
    _refuse_adapters(model)
    _refuse_weights_without_values(model)
    _refuse_interrupted(model)
    recipe = _after_earlier_calls(recipe, model)
    context = CompressionContext(
        tokenizer=tokenizer,
        calibration_data=calibration_data,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        device=_usable_device(device),
        progress=progress,
        num_calibration_samples=num_calibration_samples,
        calibration_seq_len=calibration_seq_len,
        seed=seed,
        checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir is not None else None,
    )
    if checkpoint_dir is not None:
        check_folder(checkpoint_dir, flag="checkpoint_dir")  # before any stage runs, not after block 1
    modifiers = [technique_for_config(s.config).modifier_cls(s.config, s.name) for s in recipe]
    # Under torch.inference_mode() the stages run as under torch.no_grad(), so that the tensors
    # they make (packed weights, scales) are normal ones and the stages that train take
    # gradients; but on a model whose weights were made in inference mode, in it (only there can
    # those weights be written in place), and refused by the stages that take gradients.
    frozen = any(p.is_inference() for p in model.parameters())
    grad = torch.is_grad_enabled()  # before inference_mode(False), which turns it on
    # The stages run in eval mode: calibration (Hessians, activation ranges, smoothing scales)
    # and tuning read the model's function, not a dropout sample of it.
    with evaluating(model) as before:
        with torch.inference_mode(frozen), torch.set_grad_enabled(grad and not frozen):
            _run_stages(model, modifiers, context, frozen)
    _new_modules_follow_their_parent(model, before)
    if hasattr(model, "config"):
        attach_quantization_config(model, recipe.to_dict())
    return model


def _refuse_adapters(model: nn.Module) -> None:
    """Refuse a model with peft adapters in it: the stages would compress the adapters' own
    small Linear layers (or wrap the layers the adapters wrap) and leave a model that neither
    peft nor a checkpoint can put back together."""
    peft = sys.modules.get("peft.tuners.tuners_utils")  # no adapters can exist before peft is imported
    if peft is None:
        return
    names = [name for name, m in model.named_modules() if isinstance(m, peft.BaseTunerLayer)]
    if names:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise ModelError(
            f"the model carries peft adapters ({shown}); compress the base model first and attach adapters "
            "afterwards (QLoRA: compress(), then get_peft_model), or merge a trained adapter into the float "
            "weights with merge_and_unload() and compress the merged model"
        )


def _refuse_interrupted(model: nn.Module) -> None:
    """Refuse a model an earlier ``compress()`` call left part-way: stages that change weights in
    place (smoothing, rotation, scaling) would apply twice to the blocks already done."""
    message = model.__dict__.get(INTERRUPTED_ATTR)
    if message:
        raise ModelError(
            f"{message}, so this model is partly compressed; load the float model again and compress that "
            "(with checkpoint_dir=..., a layerwise stage resumes after its last saved block)"
        )


def _refuse_weights_without_values(model: nn.Module) -> None:
    """Refuse a model with tensors on the meta device that no accelerate offload hook can load
    (built under ``init_empty_weights``, or half-loaded): the stages cannot read them. The
    weight stages said so at the first such layer; calibrating stages failed deep inside."""
    hooked = [name for name, m in model.named_modules() if offloads(m)]
    tensors = [*model.named_parameters(), *model.named_buffers()]
    empty = next(
        (n for n, t in tensors if t.is_meta and not any(h == "" or n.startswith(f"{h}.") for h in hooked)), None
    )
    if empty is not None:
        raise ModelError(
            f"tensor {empty!r} is on the meta device (the model was built without its weights, e.g. under "
            "init_empty_weights) and no offload hook can load it; load the model with from_pretrained (with "
            "device_map/offload_folder for one larger than memory)"
        )


def _runs_in_model_dtype(config, model: nn.Module, device: torch.device) -> bool:
    """Whether a stage runs forward or backward passes in the model's own dtype: it calibrates
    or trains, and not under a bfloat16 autocast that is fast on ``device`` (which a float16
    model does not get: :func:`hfcompress.layerwise.autocast_for`)."""
    if not (config.needs_calibration or config.needs_training):
        return False
    return autocast_for(model, autocast_dtype(getattr(config, "compute_dtype", "float32"), device)) is None


def _run_stages(model: nn.Module, modifiers: list, context: CompressionContext, frozen: bool) -> None:
    """Check every stage, then apply them in order (:func:`compress`; ``frozen``: the model's
    weights are inference tensors)."""
    # Fused MoE experts are split into per-expert Linear layers (views: nothing is copied and
    # the forward is the same) so that stages can target them; put back if no stage does.
    split = unfuse_experts(model)
    try:
        view = ModelView(model)
        for i, modifier in enumerate(modifiers):
            modifier.check(model, context, view)
            modifier.check_later_stages(modifiers[i + 1 :])
        if frozen:
            _refuse_gradients(modifiers)
        used = _split_experts_in_use(split, view)
        # The view holds every module as it was: kept, it would keep each layer a stage replaces
        # alive, float weights and all, until compress() returns.
        del view
    except BaseException:
        fuse_experts_back(model, split)
        raise
    fuse_experts_back(model, {name: m for name, m in split.items() if name not in used})
    device = compute_device(model, context.device)
    if used:
        record_patch(model, EXPERTS_PATCH, {"modules": used})
    # A float16 model on most CPUs (bfloat16 on AVX2-only ones) calibrates several times faster
    # cast to float32, and comes back in its own dtype.
    slow = [m.stage for m in modifiers if _runs_in_model_dtype(m.config, model, device)]
    with float32_while(model, device, slow):
        _apply_stages(model, modifiers, context)


def _apply_stages(model: nn.Module, modifiers: list, context: CompressionContext) -> None:
    """Apply the checked stages in order; one that fails marks the model interrupted."""
    for i, modifier in enumerate(modifiers):
        for later in modifiers[i + 1 :]:
            later.before_stage(model, modifier.stage)
        logger.info("applying stage %r (%s)", modifier.stage, modifier.config.technique)
        try:
            modifier.apply(model, context)
        except BaseException as exc:  # Ctrl-C, out of memory, a failure in block 17 of 30
            # The layers done so far stay compressed (the model runs), but no recipe describes the
            # model: saving it (a checkpoint that looks whole) and compressing it again are refused.
            done = Recipe([Stage(name=m.stage, config=m.config) for m in modifiers[: i + 1]])
            mark_interrupted(
                model,
                done.to_dict(),
                f"compress() was interrupted in stage {modifier.stage!r} ({modifier.config.technique}) by "
                f"{type(exc).__name__}",
            )
            raise


def _new_modules_follow_their_parent(model: nn.Module, before: MutableSet[nn.Module]) -> None:
    """Modules the stages put in (made in training mode, as every new module is) take the
    train/eval mode of the module they sit in: a model compressed in eval mode stays in it."""
    for parent in model.modules():
        for child in parent.children():
            if child not in before and child.training != parent.training:
                child.train(parent.training)


def _refuse_gradients(modifiers: list) -> None:
    """Refuse, before any stage runs, a stage that takes gradients through a model whose weights
    are inference tensors (made under ``torch.inference_mode()``)."""
    for modifier in modifiers:
        if modifier.takes_gradients():
            raise ModelError(
                f"stage {modifier.stage!r} ({modifier.config.technique}) takes gradients through the model, whose "
                "weights were made under torch.inference_mode() and cannot enter autograd; load or build the model "
                "outside torch.inference_mode() (torch.no_grad() is fine)"
            )


def _split_experts_in_use(split: dict[str, nn.Module], view: ModelView) -> list[str]:
    """The split experts modules some stage changes; each must be changed whole (transformers
    would merge a float expert left among compressed ones back into a fused tensor on load)."""
    used = []
    for name in split:
        # the experts' own layers (the split module's), not those a stage adds inside them (low
        # rank's factors)
        experts = view.entries[name].module if name in view.entries else nn.Module()
        inside = (f"{name}.{n}" for n, m in experts.named_modules() if is_linear_like(m))
        layers = [(n, view.entries[n]) for n in inside if n in view.entries]
        changed = [n for n, e in layers if e.stage is not None]
        if changed and len(changed) != len(layers):
            left = next(n for n, e in layers if e.stage is None)
            raise RecipeError(
                f"the recipe compresses some experts of {name} but not {left!r}; compress all the experts of a layer "
                "or none (adjust targets/ignore)"
            )
        if changed:
            used.append(name)
    return used


def save_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    tokenizer: Any = None,
    format: str = "hfcompress",
    card: Any = True,
    **kwargs,
) -> Path:
    """``model.save_pretrained`` made safe to interrupt: the files are written into a temporary
    folder that replaces ``save_directory`` only once everything is on disk, so an
    interrupted save leaves either the old model or nothing that loads (see
    :mod:`hfcompress.saving`, which also handles mount points and cleans up after earlier
    interrupted saves). Raises :class:`~hfcompress.errors.OutputPathError` for a path that
    cannot hold a model.

    ``format="compressed-tensors"`` writes the compressed-tensors layout instead, which vLLM
    serves and transformers loads without hfcompress (see
    :func:`hfcompress.export.export_compressed_tensors`; extra keyword arguments go to it).
    A compressed model gets a model card (README.md and its plots, see :mod:`hfcompress.card`):
    pass ``card=CardInfo(...)`` to name the base model, licence and measurements, or
    ``card=False`` for none. Otherwise extra keyword arguments go to ``model.save_pretrained`` (not ``push_to_hub``:
    push after saving, see :func:`hfcompress.cli` ``--push-to-hub``).
    """
    if format == "compressed-tensors":
        from hfcompress.export import export_compressed_tensors

        return export_compressed_tensors(model, save_directory, tokenizer=tokenizer, **kwargs).folder
    if format != "hfcompress":
        raise ValueError(f"format={format!r} is not a save format; accepted: 'hfcompress', 'compressed-tensors'")

    def write(folder: Path) -> None:
        model.save_pretrained(folder, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        # A card for compressed layers, and for patches alone (a KV cache, block-sparse attention).
        if card is not False and (compressed_modules(model) or recorded_patches(model)):
            from hfcompress.card import CardInfo, write_card

            write_card(folder, model, card if isinstance(card, CardInfo) else None)

    return save_atomically(save_directory, write)
