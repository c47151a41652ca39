"""Config of block-sparse attention."""

from __future__ import annotations

import dataclasses
from typing import Literal

from hfcompress.config import TechniqueConfig, invalid

__all__ = ["LAYOUTS", "BlockSparseConfig"]

LAYOUTS = ("dynamic", "calibrated", "local", "bigbird", "pooled", "oracle")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSparseConfig(TechniqueConfig):
    """Attend only to some ``block_size x block_size`` tiles of the attention matrix.

    The stage changes no weight: it switches the model's attention to ``hfcompress_block_sparse``
    (through transformers' ``AttentionInterface``), records the layout, and ``from_pretrained``
    switches it back on. A forward whose queries are the whole sequence (a prefill, training,
    an encoder), longer than one block and at least ``min_tokens`` long, is sparse; a step
    over a cache (decoding) attends densely.

    Args:
        layout: Which tiles each head keeps:

            * ``"dynamic"``: per input, the tiles with the most attention mass, estimated
              from ``samples`` query rows per block (their exact softmax over all keys).
            * ``"calibrated"``: per head, the tiles whose place (a sink block, or a block
              distance) carried the most mass on the calibration data; fixed per length.
            * ``"local"``: a window of recent blocks plus ``sink_blocks`` sink blocks (for
              encoders, also global rows: the CLS block sees every block).
            * ``"bigbird"``: window, sinks and ``random_blocks`` seeded random blocks per row.
            * ``"pooled"``: per input, the tiles with the best mean-pooled query-key scores.
            * ``"oracle"``: per input, the tiles with the true attention mass: computes the
              dense attention to choose, so it is a reference line, never faster.
        density: Kept tiles over the tiles a dense attention computes (the causal triangle
            for decoders), in (0, 1].
        block_size: Tokens per block side.
        sink_blocks: The first key blocks every query block keeps (attention sinks; the CLS
            block for encoders), counted in the density.
        scope: Data-driven layouts: ``"row"`` keeps ``density`` of each query block's
            blocks; ``"head"`` keeps ``density`` of each head's tiles, wherever its mass is.
        samples: ``dynamic``: query rows per block whose attention estimates the block mass.
        random_blocks: ``bigbird``: random key blocks per query block.
        seed: ``bigbird``: seed of the random blocks.
        batch_size: ``calibrated``: sequences per calibration forward pass.
        min_tokens: Sequences shorter than this attend densely (0: every sequence longer
            than one block is sparse). Short prompts gain little speed and lose the most
            quality: on SmolLM2-135M the dynamic layout at 50% costs +2.6% of perplexity at
            2048 tokens and +25% at 512.
    """

    technique = "block_sparse"

    layout: Literal["dynamic", "calibrated", "local", "bigbird", "pooled", "oracle"] = "dynamic"
    density: float = 0.5
    block_size: Literal[16, 32, 64, 128] = 64
    sink_blocks: int = 1
    scope: Literal["row", "head"] = "head"
    samples: int = 8
    random_blocks: int = 1
    seed: int = 0
    batch_size: int = 1
    min_tokens: int = 0

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.layout == "calibrated"

    def _validate(self) -> None:
        if not 0 < self.density <= 1:
            raise invalid("density", self.density, "a fraction in (0, 1] of the tiles a dense attention computes")
        if self.sink_blocks < 0:
            raise invalid("sink_blocks", self.sink_blocks, "an integer >= 0")
        if not 1 <= self.samples <= self.block_size:
            raise invalid("samples", self.samples, f"an integer from 1 to block_size ({self.block_size})")
        if self.random_blocks < 0:
            raise invalid("random_blocks", self.random_blocks, "an integer >= 0")
        if self.batch_size < 1:
            raise invalid("batch_size", self.batch_size, "an integer >= 1")
        if self.min_tokens < 0:
            raise invalid("min_tokens", self.min_tokens, "an integer >= 0 (0: no minimum)")
