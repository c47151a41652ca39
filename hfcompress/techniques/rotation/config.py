"""Config of the ``rotate`` stage (QuaRot-style orthogonal rotations)."""

from __future__ import annotations

import dataclasses

from hfcompress.config import TechniqueConfig, invalid

__all__ = ["RotationConfig"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RotationConfig(TechniqueConfig):
    """Rotate the model's hidden spaces by orthogonal matrices so that activation outliers are
    spread over all channels, leaving the model's function unchanged (in exact arithmetic).
    What QuaRot and SpinQuant do before 8-bit activations; it needs no calibration data.

    * **Residual stream**: every norm's weight is folded into the linears that read it, then
      the embedding, every linear reading the residual stream and every linear writing it are
      rotated by one seeded random orthogonal matrix ``Q``. The final norm becomes a
      ``[hidden, hidden]`` matrix norm (``Q^T diag(g) Q``), so a tied output embedding stays
      tied. Nothing runs at inference for this part.
    * **Attention values** (``heads``): each value head and the matching columns of the output
      projection are rotated by a Hadamard matrix of the head dimension (a seeded random
      orthogonal one where it is not a power of two; offline, grouped-query attention included).
    * **MLP down projection** (``ffn``): its input is rotated on the fly by a block Hadamard
      transform (blocks of the largest power of two dividing the intermediate size: 512 on
      SmolLM2), and its weight by the same matrix. This is the one online cost: two small
      matmuls per block of the down projection's input.

    Put it first in a recipe, before any stage that compresses these layers (``rtn``,
    ``gptq``, ...), which then quantize the rotated weights. For Llama-family models with
    RMSNorm (``llama``, ``mistral``, ``qwen2``, ``qwen3``). The saved config records the
    rotation, and ``from_pretrained`` restores the matrix norm and the online transform.

    Args:
        seed: Seed of the residual stream's random orthogonal matrix.
        heads: Rotate the attention value heads.
        ffn: Rotate the down projection's input online.
    """

    technique = "rotate"

    seed: int = 0
    heads: bool = True
    ffn: bool = True

    def _validate(self) -> None:
        if self.seed < 0:
            raise invalid("seed", self.seed, "an integer >= 0")
