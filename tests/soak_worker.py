"""A worker the soak test (tests/test_soak.py) starts and kills: build a small random Llama,
compress it (GPTQ with a block checkpoint, or RTN), and save it.

    python -m tests.soak_worker gptq|save WORKDIR

It prints ``ready`` once its imports are done, so that the test's kill times fall in the work.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import hfcompress
from hfcompress import GPTQConfig, RTNConfig


def make_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


CALIBRATION = torch.randint(0, 512, (32, 64), generator=torch.Generator().manual_seed(1))


def main(phase: str, work: Path) -> None:
    torch.set_num_threads(1)
    model = make_model()
    if phase == "save":
        hfcompress.compress(model, [RTNConfig(bits=4, group_size=64)], progress=False)
    print("ready", flush=True)
    start = time.perf_counter()
    if phase == "gptq":
        hfcompress.compress(
            model,
            [GPTQConfig(bits=4, group_size=64)],
            calibration_data=CALIBRATION,
            progress=False,
            checkpoint_dir=work / "ckpt",
        )
    hfcompress.save_pretrained(model, work / "out")
    print(f"done {time.perf_counter() - start:.3f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
