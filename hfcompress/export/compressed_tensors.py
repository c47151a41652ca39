"""Export to the compressed-tensors format, which vLLM serves and plain transformers loads.

The packing is compressed-tensors' own (its registered compressors), never ours re-done by
hand: each :class:`~hfcompress.quant.QuantLinear` is handed to the compressor of its format as
the float weight it computes with plus its scales and signed zero points, and the compressor
re-derives the codes (exactly: every weight is ``(q - z) * s``, so ``round(w / s) + z`` is
``q`` again) and packs them in the format's layout.

What maps where:

* weight-only 2/3/4/8 bits, per group or per channel: ``pack-quantized`` (int32 words packed
  along in_features, signed codes, zero points packed along out_features);
* 8-bit weights with int8 input activations (W8A8; dynamic per token, or static per tensor
  with ``input_scale``): ``int-quantized``; 4-bit weights with int8 activations (W4A8):
  ``pack-quantized`` with the input-activation args;
* layers that stay float are written as they are.

What the format cannot express is refused with an :class:`~hfcompress.errors.ExportError`
naming the layer and the alternative, or re-quantized when asked:

* a partial last group (in_features not a multiple of the group size, e.g. SmolLM2's 576 at
  group 128): refused, or re-grouped at ``requantize_group_size`` (a divisor of
  in_features): losslessly when it also divides the layer's group size (scales repeated),
  else by rounding again; the CLI prints the perplexity change;
* asymmetric weights: refused (the format has packed integer zero points, but transformers
  5.24 with compressed-tensors 0.20 builds them unpacked and cannot load them: measured here,
  and reported upstream as llm-compressor issue 1618); float zero points (GGUF/HQQ-style) are
  asymmetric too;
* static per-input-channel activation scales: refused (use per-tensor or dynamic);
* model patches (split experts): refused.

3-bit exports are valid compressed-tensors that transformers loads, but vLLM's kernels serve
only 4 and 8 bits: the export says so in a warning.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hfcompress.errors import ExportError
from hfcompress.kinds import compressed_modules, swap_module
from hfcompress.patches import recorded_patches
from hfcompress.quant.affine import QuantizedWeight, num_groups, quantize_rtn
from hfcompress.quant.linear import SCALE_DTYPES, QuantLinear
from hfcompress.quant.scheme import QuantScheme
from hfcompress.saving import save_atomically

__all__ = [
    "ExportSummary",
    "check_with_transformers",
    "export_compressed_tensors",
    "plan_compressed_tensors",
    "requantize_partial_groups",
]

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'hfcompress[export]' (or pip install compressed-tensors)"


@dataclass
class ExportSummary:
    """What an export wrote: the folder, each config group's format and layer count, and
    the layers that were re-quantized to fit the format."""

    folder: Path
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    requantized: list[str] = field(default_factory=list)


def _ct():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise ExportError(
            f"exporting to compressed-tensors needs the compressed-tensors package: {INSTALL_HINT}"
        ) from None
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    return BaseCompressor, QuantizationArgs, QuantizationConfig, QuantizationScheme


def _partial(layer: QuantLinear) -> bool:
    return layer.scheme.weights.strategy == "group" and layer.in_features % layer.group_size != 0


def _weight_args(name: str, layer: QuantLinear, partial_groups: bool) -> dict[str, Any]:
    w = layer.scheme.weights
    if w.float_zero:
        raise ExportError(
            f"layer {name!r} has float zero points, which compressed-tensors cannot store (its zero points are "
            "integers); re-compress with integer zero points (zero_point: integer) or symmetric weights"
        )
    if not w.symmetric:
        # compressed-tensors' format has packed integer zero points, but transformers (5.24, with
        # compressed-tensors 0.20) builds them unpacked and fails to load them: refused rather
        # than written as a checkpoint that does not load.
        raise ExportError(
            f"layer {name!r} has asymmetric weights; their packed zero points do not load in transformers' "
            "compressed-tensors integration. Re-compress with symmetric: true for a compressed-tensors export"
        )
    if _partial(layer) and not partial_groups:
        raise ExportError(
            f"layer {name!r} has {layer.in_features} input features, not a multiple of its group size "
            f"{layer.group_size}: compressed-tensors has no partial last group. Re-compress with a group size that "
            f"divides {layer.in_features} (or per channel), or export with requantize_group_size= "
            "(--requantize-group-size), which re-quantizes such layers and reports the perplexity change"
        )
    args = {"num_bits": w.num_bits, "type": "int", "symmetric": w.symmetric, "scale_dtype": SCALE_DTYPES[w.scale_dtype]}
    if w.strategy == "group":
        args.update(strategy="group", group_size=layer.group_size)
    else:
        args.update(strategy="channel")
    return args


def _activation_args(name: str, layer: QuantLinear) -> dict[str, Any] | None:
    act = layer.scheme.input_activations
    if act is None:
        return None
    if act.dynamic:
        return {"num_bits": 8, "type": "int", "symmetric": True, "strategy": act.strategy, "dynamic": True}
    if act.strategy != "tensor":
        raise ExportError(
            f"layer {name!r} has static per-channel input scales, which compressed-tensors' int8 activations "
            "cannot express; re-compress with a per-tensor static or a dynamic activation scheme"
        )
    return {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor", "dynamic": False}


def _format(layer: QuantLinear) -> str:
    w = layer.scheme.weights
    if layer.scheme.input_activations is not None and w.num_bits == 8:
        return "int-quantized"
    return "pack-quantized"


def plan_compressed_tensors(model: nn.Module, *, partial_groups: bool = False) -> dict[str, tuple[str, dict[str, Any]]]:
    """Each compressed layer's (format, scheme dict) in compressed-tensors terms; raises
    :class:`ExportError` for the first layer the format cannot express.

    ``partial_groups=True`` lets layers with a partial last group pass (to check everything
    else before :func:`requantize_partial_groups` re-groups them)."""
    patches = [p.get("name") for p in recorded_patches(model)]
    if patches:
        raise ExportError(
            f"the model carries patches {patches} that compressed-tensors cannot describe; export is possible only "
            "for models whose compressed layers are plain QuantLinear replacements of Linear layers"
        )
    plan = {}
    for name, module in compressed_modules(model).items():
        if not isinstance(module, QuantLinear):
            hint = (
                ": the format quantizes Linear layers only. Export a model compressed without the embeddings stage"
                if module.kind.endswith("embedding")
                else ""
            )
            raise ExportError(
                f"layer {name!r} is a {module.kind} layer; compressed-tensors export covers quant_linear{hint}"
            )
        scheme = {
            "weights": _weight_args(name, module, partial_groups),
            "input_activations": _activation_args(name, module),
        }
        plan[name] = (_format(module), scheme)
    if not plan:
        raise ExportError("the model has no quantized layers to export; compress it first")
    return plan


def requantize_partial_groups(model: nn.Module, group_size: int) -> list[str]:
    """Re-quantize at ``group_size`` every layer whose last group is partial (bits, symmetry
    and activations kept). Returns the names of the layers changed.

    When ``group_size`` divides the layer's group size (64 for 128), each new group lies
    inside an old one and inherits its scale: the codes and the weights are unchanged, only
    the scales are stored twice as often. Otherwise the layer's weights are rounded again,
    by round-to-nearest, which changes the model: measure it (the CLI does).
    """
    changed = []
    for name, layer in list(compressed_modules(model).items()):
        if not isinstance(layer, QuantLinear) or not _partial(layer):
            continue
        if layer.in_features % group_size:
            raise ExportError(
                f"--requantize-group-size {group_size} does not divide layer {name!r}'s {layer.in_features} input "
                "features either; pick a divisor (e.g. 64 or 32 for 576)"
            )
        w = layer.scheme.weights
        scheme = QuantScheme.weight_only(
            num_bits=w.num_bits,
            group_size=group_size,
            in_features=layer.in_features,
            symmetric=w.symmetric,
            float_zero=w.float_zero,
            scale_dtype=w.scale_dtype,
            observer=w.observer or "minmax",
        )
        if layer.group_size % group_size == 0:
            # Each new group lies inside one old group: repeat its scale and zero point, and
            # the codes (and the weights) stay exactly as they were.
            reps, groups = layer.group_size // group_size, num_groups(layer.in_features, group_size)
            qw = QuantizedWeight(
                q=layer.codes(),
                scales=layer.scales.repeat_interleave(reps, dim=1)[:, :groups],
                zeros=layer.zero_points().repeat_interleave(reps, dim=1)[:, :groups],
                bits=w.num_bits,
                group_size=group_size,
            )
        else:
            qw = quantize_rtn(
                layer.dequantize(torch.float32),
                bits=w.num_bits,
                group_size=group_size,
                symmetric=w.symmetric,
                scale_dtype=SCALE_DTYPES[w.scale_dtype],
                float_zero=w.float_zero,
            )
        new = QuantLinear.from_quantized(qw, scheme, bias=layer.bias)
        new.stage = layer.stage
        if layer.scheme.input_activations is not None:
            new.set_input_activations(layer.scheme.input_activations, getattr(layer, "input_scale", None))
        swap_module(model, name, new)
        changed.append(name)
    return changed


def _compressed_state(compressor, ct_scheme, layer: QuantLinear) -> dict[str, torch.Tensor]:
    # Symmetric only (see _weight_args): no zero points to translate.
    state = {"weight": layer.dequantize(torch.float32), "weight_scale": layer.scales.clone()}
    out = dict(compressor.compress(state, ct_scheme))
    # Check the round trip: the format must give back the weights we compute with, rounded
    # once to the scales' dtype (compressed-tensors dequantizes in that dtype).
    back = compressor.decompress(dict(out), ct_scheme)["weight"]
    if not torch.equal(back, state["weight"].to(back.dtype)):
        raise ExportError("compressed-tensors' packing did not reproduce the layer's weights exactly")
    if hasattr(layer, "input_scale"):
        out["input_scale"] = layer.input_scale.clone()
    if layer.bias is not None:
        out["bias"] = layer.bias.detach().clone()
    return out


def _group_targets(plan: dict[str, tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any], list[str]]]:
    groups: dict[str, tuple[str, dict[str, Any], list[str]]] = {}
    for name, (fmt, scheme) in plan.items():
        key = json.dumps([fmt, scheme], sort_keys=True, default=str)
        groups.setdefault(key, (fmt, scheme, []))[2].append(name)
    return list(groups.values())


def export_compressed_tensors(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    tokenizer: Any = None,
    requantize_group_size: int | None = None,
    max_shard_size: str | int = "5GB",
) -> ExportSummary:
    """Write ``model`` (compressed by hfcompress) as a compressed-tensors checkpoint.

    The folder loads with ``AutoModel*.from_pretrained`` wherever compressed-tensors is
    installed (no hfcompress import), and with vLLM for the formats its kernels serve. The
    save is atomic like :func:`hfcompress.save_pretrained`.

    Args:
        model: A model with :class:`~hfcompress.quant.QuantLinear` layers (``model`` is
            changed in place only when ``requantize_group_size`` re-quantizes layers).
        save_directory: The output folder.
        tokenizer: Saved beside the model when given.
        requantize_group_size: Re-quantize layers with a partial last group at this group
            size instead of refusing them (see :func:`requantize_partial_groups`).
        max_shard_size: Largest safetensors shard.
    """
    base_compressor, qargs_cls, qconfig_cls, qscheme_cls = _ct()
    summary = ExportSummary(Path(save_directory).absolute())
    if requantize_group_size is not None:
        plan_compressed_tensors(model, partial_groups=True)  # refuse the rest before changing the model
        summary.requantized = requantize_partial_groups(model, requantize_group_size)
    plan = plan_compressed_tensors(model)
    layers = compressed_modules(model)

    config_groups, formats = {}, set()
    state = dict(model.state_dict())
    for i, (fmt, scheme, names) in enumerate(_group_targets(plan)):
        act = scheme["input_activations"]
        ct_scheme = qscheme_cls(
            targets=[f"re:^{re.escape(n)}$" for n in names],
            weights=qargs_cls(**scheme["weights"]),
            input_activations=qargs_cls(**act) if act is not None else None,
            format=fmt,
        )
        compressor = base_compressor.get_value_from_registry(fmt)
        for name in names:
            layer = layers[name]
            for key in [k for k in state if k.startswith(f"{name}.")]:
                del state[key]
            for key, tensor in _compressed_state(compressor, ct_scheme, layer).items():
                state[f"{name}.{key}"] = tensor.contiguous()
        config_groups[f"group_{i}"] = ct_scheme
        formats.add(fmt)
        bits = scheme["weights"]["num_bits"]
        summary.groups[f"group_{i}"] = {"format": fmt, "num_bits": bits, "layers": len(names)}
        if bits not in (4, 8):
            logger.warning(
                "group_%d holds %d-bit weights: transformers loads them, but vLLM serves only 4- and 8-bit "
                "compressed-tensors weights",
                i,
                bits,
            )
    qconfig = qconfig_cls(
        config_groups=config_groups,
        format=formats.pop() if len(formats) == 1 else "mixed-precision",
        quantization_status="compressed",
        ignore=[],
    )
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = config.get("architectures") or [type(model).__name__]
    config["quantization_config"] = qconfig.model_dump(mode="json", exclude_none=True)
    config["quantization_config"]["quant_method"] = "compressed-tensors"
    if "lm_head" in plan and config.get("tie_word_embeddings"):
        config["tie_word_embeddings"] = False  # the head is quantized: it no longer shares the embedding
    state = _drop_tied(model, state, tied=bool(config.get("tie_word_embeddings")))

    def write(folder: Path) -> None:
        from huggingface_hub import save_torch_state_dict

        save_torch_state_dict(state, folder, max_shard_size=max_shard_size)
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)

    save_atomically(summary.folder, write)
    return summary


def _drop_tied(model: nn.Module, state: dict[str, torch.Tensor], *, tied: bool) -> dict[str, torch.Tensor]:
    """Leave out the weights transformers ties on load (the output embedding), as
    ``save_pretrained`` does."""
    if not tied:
        return state
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out_emb is None or not isinstance(getattr(out_emb, "weight", None), torch.Tensor):
        return state
    drop = {n for n, m in model.named_modules() if m is out_emb}
    return {k: v for k, v in state.items() if k.rpartition(".")[0] not in drop}


_CHECK_SCRIPT = """
import json, sys, torch
import transformers
assert "hfcompress" not in sys.modules
folder, inputs, out = sys.argv[1], sys.argv[2], sys.argv[3]
config = transformers.AutoConfig.from_pretrained(folder)
names = config.architectures or []
if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in names):
    auto = transformers.AutoModelForCausalLM
elif getattr(config, "vision_config", None) is not None and any(a.endswith("ForConditionalGeneration") for a in names):
    auto = transformers.AutoModelForImageTextToText
else:
    auto = transformers.AutoModelForSequenceClassification
model = auto.from_pretrained(folder, dtype=torch.float32).eval()
ids = torch.load(inputs)
with torch.no_grad():
    logits = model(input_ids=ids).logits
torch.save(logits, out)
print(json.dumps({"class": type(model).__name__, "modules": sorted({type(m).__name__ for m in model.modules()})}))
"""


def check_with_transformers(folder: str | os.PathLike, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """Load an export with plain transformers in a fresh Python process (hfcompress is never
    imported there) and return its float32 logits on ``input_ids`` and what it loaded."""
    with tempfile.TemporaryDirectory() as tmp:
        inputs, out = Path(tmp) / "ids.pt", Path(tmp) / "logits.pt"
        torch.save(input_ids.cpu(), inputs)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        result = subprocess.run(
            [sys.executable, "-c", _CHECK_SCRIPT, str(folder), str(inputs), str(out)],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp,
        )
        if result.returncode != 0:
            tail = "\n".join(result.stderr.strip().splitlines()[-5:])
            raise ExportError(f"plain transformers could not load {folder}:\n{tail}")
        info = json.loads(result.stdout.strip().splitlines()[-1])
        return torch.load(out), info
