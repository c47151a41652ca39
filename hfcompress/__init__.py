"""hfcompress: compress Hugging Face Transformers models with one verb and a recipe.

    import hfcompress
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    hfcompress.compress(model, hfcompress.Recipe([hfcompress.RTNConfig(bits=4, group_size=128)]))
    hfcompress.save_pretrained(model, "out/")           # or model.save_pretrained("out/")
    AutoModelForCausalLM.from_pretrained("out/")         # rebuilds the packed layers

Importing this package registers the ``hfcompress`` quantization method with transformers
(that is what lets ``from_pretrained`` rebuild compressed layers). It does not import Triton
and does not touch a GPU.
"""

from hfcompress import versions as _versions  # noqa: F401 (first: checks the libraries' versions)
from hfcompress.api import compress, save_pretrained
from hfcompress.config import TechniqueConfig
from hfcompress.errors import (
    CalibrationDataError,
    CheckpointError,
    HfCompressError,
    ModelError,
    OutputPathError,
    RecipeError,
    TrainingDataError,
)
from hfcompress.integrations import post_import as _post_import
from hfcompress.integrations import transformers_quantizer as _transformers_quantizer
from hfcompress.integrations.transformers_quantizer import HfCompressQuantizationConfig
from hfcompress.integrity import verify_checkpoint as verify
from hfcompress.kinds import CompressedModule, register_module_kind
from hfcompress.mixed_precision import BitsBudget, PrecisionPlan
from hfcompress.patches import register_patch
from hfcompress.quant.dispatch import Kernel, register_kernel
from hfcompress.quant.embedding import QuantEmbedding
from hfcompress.quant.linear import QuantLinear
from hfcompress.quant.scheme import QuantArgs, QuantScheme
from hfcompress.recipe import Recipe, Stage
from hfcompress.registry import get_technique, register_technique, registered_techniques
from hfcompress.techniques.activations import ActivationQuantConfig
from hfcompress.techniques.awq import AWQConfig
from hfcompress.techniques.block_sparse import BlockSparseConfig, disable_block_sparse, enable_block_sparse
from hfcompress.techniques.embeddings import EmbeddingQuantConfig
from hfcompress.techniques.error_compensation import ErrorCompensationConfig
from hfcompress.techniques.gptq import GPTQConfig
from hfcompress.techniques.kv_cache import KVCacheConfig, QuantizedKVCache, disable_kv_cache, enable_kv_cache
from hfcompress.techniques.learned_rounding import LearnedRoundingConfig
from hfcompress.techniques.low_rank import LowRankConfig, LowRankLinear
from hfcompress.techniques.pkd import PKDConfig, drop_layers, layer_map
from hfcompress.techniques.rotation import RotationConfig
from hfcompress.techniques.rtn import RTNConfig
from hfcompress.techniques.smoothquant import SmoothQuantConfig

__version__ = "0.1.0"


def _install_peft() -> None:
    import importlib

    importlib.import_module("hfcompress.integrations.peft")  # which installs itself (install())


# peft's LoRA learns our layers once peft is imported (get_peft_model, "all-linear", add_adapter).
_post_import.when_imported("peft", _install_peft)

__all__ = [
    "AWQConfig",
    "ActivationQuantConfig",
    "BitsBudget",
    "BlockSparseConfig",
    "CalibrationDataError",
    "CheckpointError",
    "CompressedModule",
    "DistillationCallback",
    "DistillationTrainer",
    "EmbeddingQuantConfig",
    "ErrorCompensationConfig",
    "GPTQConfig",
    "HfCompressError",
    "HfCompressQuantizationConfig",
    "KVCacheConfig",
    "Kernel",
    "LearnedRoundingConfig",
    "LowRankConfig",
    "LowRankLinear",
    "ModelError",
    "OutputPathError",
    "PKDConfig",
    "PrecisionPlan",
    "QuantArgs",
    "QuantEmbedding",
    "QuantLinear",
    "QuantScheme",
    "QuantizedKVCache",
    "RTNConfig",
    "Recipe",
    "RecipeError",
    "RotationConfig",
    "SmoothQuantConfig",
    "Stage",
    "TechniqueConfig",
    "TrainingDataError",
    "compress",
    "disable_block_sparse",
    "disable_kv_cache",
    "drop_layers",
    "enable_block_sparse",
    "enable_kv_cache",
    "get_technique",
    "layer_map",
    "register_kernel",
    "register_module_kind",
    "register_patch",
    "register_technique",
    "registered_techniques",
    "save_pretrained",
    "verify",
]


def __getattr__(name: str):
    # The Trainer adapter imports transformers' Trainer (slow); load it on first use only.
    if name in ("DistillationTrainer", "DistillationCallback"):
        from hfcompress.integrations import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'hfcompress' has no attribute {name!r}")


# The integration point with transformers: without it `from_pretrained` cannot read our
# checkpoints. Registration is idempotent and touches no device.
_transformers_quantizer.register()
