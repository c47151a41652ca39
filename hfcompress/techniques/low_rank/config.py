"""Config of low-rank factorization (SVD, whitened SVD, ASVD)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from hfcompress.config import TechniqueConfig, check_target_fields, invalid

__all__ = ["FFN_TARGETS", "FactorStageConfig", "LowRankConfig"]

# The feed-forward layers of decoder blocks (``mlp``; OPT's ``fc1``/``fc2``), of BERT-style
# encoder blocks and of DistilBERT's (``ffn``).
FFN_TARGETS = (
    r"re:.*\.mlp",
    r"re:.*\.layer\.\d+\.(intermediate|output)\.dense",
    r"re:.*\.ffn",
    r"re:.*\.layers\.\d+\.fc[12]",
    r"re:.*\.layers\.\d+\.feed_forward",  # Llama 4, LFM2, Falcon-H1
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FactorStageConfig(TechniqueConfig):
    """Fields the low-rank stages share (``low_rank``, ``error_compensation``); each adds a
    ``method`` whose ``"svd"`` needs no calibration.

    Args:
        damp: Eigenvalue floor of the whitening, relative to the mean eigenvalue.
        batch_size: Calibration sequences per forward pass.
        compute_dtype: Dtype of the calibration passes (the ``x^T x`` sums stay float32).
    """

    damp: float = 1e-4
    batch_size: int = 8
    compute_dtype: Literal["float32", "bfloat16"] = "float32"

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.method != "svd"

    def _validate(self) -> None:
        if not 0 < self.damp < 1:
            raise invalid("damp", self.damp, "a number in (0, 1)")
        if self.batch_size < 1:
            raise invalid("batch_size", self.batch_size, "an integer >= 1")
        check_target_fields(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LowRankConfig(FactorStageConfig):
    """Replace Linear layers by two factors ``B A`` of lower rank (``LowRankLinear``).

    Whitened SVD and ASVD calibrate block by block on the layerwise runner: each layer's
    inputs are those of the blocks already factorized. Exactly one of ``ratio``, ``energy``
    and ``rank`` sets each layer's rank.

    Args:
        method: ``"whitened"`` (SVD-LLM's truncation-aware whitening: minimises each
            layer's output error on the calibration inputs), ``"asvd"`` (ASVD's per-channel
            activation scaling) or ``"svd"`` (plain SVD of the weights; no calibration).
        ratio: Fraction of each layer's weights removed (0.2: the factors hold at most 80%
            of ``N * K``).
        energy: Keep the smallest rank whose singular values hold this fraction of
            ``sum sigma^2`` (with whitening, of the layer's output energy). Layers where that
            rank saves nothing are left as they are.
        rank: One rank for every layer.
        allocation: With ``ratio``: ``"uniform"`` cuts every layer by ``ratio``;
            ``"global"`` spreads one budget, ``1 - ratio`` of all targeted weights, over the
            layers by their spectra: a first pass over the float model measures each layer's
            (whitened) singular values, and ranks go where they keep the most relative
            output energy per weight (layers inside the blocks; others are cut uniformly).
        alpha: ASVD's exponent on the mean activation magnitudes.
        damp: Eigenvalue floor of the whitening, relative to the mean eigenvalue.
        targets: Layers to factorize (default: the feed-forward layers); module names, class
            names or ``re:`` patterns, a container selecting the layers inside it.
        ignore: Layers to leave alone.
        batch_size: Calibration sequences per forward pass.
        compute_dtype: Dtype of the calibration passes (the ``x^T x`` sums stay float32).
    """

    technique = "low_rank"

    method: Literal["whitened", "asvd", "svd"] = "whitened"
    ratio: float | None = None
    energy: float | None = None
    rank: int | None = None
    allocation: Literal["uniform", "global"] = "uniform"
    alpha: float = 0.5
    targets: tuple[str, ...] = FFN_TARGETS
    ignore: tuple[str, ...] = ("lm_head",)

    def _validate(self) -> None:
        super()._validate()
        chosen = [k for k in ("ratio", "energy", "rank") if getattr(self, k) is not None]
        if len(chosen) != 1:
            raise invalid(
                "ratio/energy/rank",
                {k: getattr(self, k) for k in chosen} or None,
                "exactly one of ratio (fraction of weights removed), energy (fraction of sum sigma^2 kept) or rank",
            )
        if self.ratio is not None and not 0 < self.ratio < 1:
            raise invalid("ratio", self.ratio, "a fraction in (0, 1) of each layer's weights to remove")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise invalid("energy", self.energy, "a fraction in (0, 1]")
        if self.allocation == "global" and self.ratio is None:
            raise invalid("allocation", self.allocation, "'uniform' unless ratio sets the budget")
        if self.rank is not None and self.rank < 1:
            raise invalid("rank", self.rank, "an integer >= 1")
        if not 0 < self.alpha <= 1:
            raise invalid("alpha", self.alpha, "a number in (0, 1]")
