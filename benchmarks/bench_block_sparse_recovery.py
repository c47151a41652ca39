"""How much of a block-sparse SmolLM2-135M's perplexity loss distillation from the dense
model wins back (our DistillationTrainer, pure KD).

    python benchmarks/bench_block_sparse_recovery.py                  # dynamic layout, 25% density
    python benchmarks/bench_block_sparse_recovery.py --layout local --steps 100

Protocol: evaluation on the first ``--eval-windows`` windows of ``--seq-len`` tokens of
WikiText-2 test (as bench_block_sparse.py); training on WikiText-2 *validation* windows of the
same length (shuffled, seed 0), bf16 autocast on CPU (float32 where the CPU has no fast bf16
matrix multiply), the student block-sparse and the teacher the same model with dense
attention. Only ``--train`` parameters learn (default: the attention
projections, q/k/v/o), on the pure distillation loss (``alpha = 1``: the KL divergence to the
teacher's next-token distribution at temperature 1, no WikiText labels), so the target is the
dense model, not WikiText-2.

Recovered = (ppl_sparse - ppl_recovered) / (ppl_sparse - ppl_dense). Prints a JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import tempfile
import time

import torch

TRAIN = {"attention": r"\.self_attn\.(q|k|v|o)_proj\.", "all": r"."}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layout", default="dynamic")
    parser.add_argument("--density", type=float, default=0.25)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--train", choices=list(TRAIN), default="attention")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--eval-windows", type=int, default=3)
    args = parser.parse_args()

    from datasets import Dataset

    from hfcompress.data import load_text
    from hfcompress.eval import perplexity
    from hfcompress.integrations.trainer import make_trainer
    from hfcompress.models import load_model, load_tokenizer
    from hfcompress.techniques.block_sparse import BlockSparseConfig, enable_block_sparse

    torch.manual_seed(0)
    tokenizer = load_tokenizer("smollm2-135m")
    test = tokenizer(load_text("wikitext2:test"), return_tensors="pt", add_special_tokens=False).input_ids[0]
    valid = tokenizer(load_text("wikitext2:valid"), return_tensors="pt", add_special_tokens=False).input_ids[0]

    def ppl(model) -> float:
        model.eval()
        return perplexity(model, test, seq_len=args.seq_len, max_windows=args.eval_windows, progress=False).perplexity

    model = load_model("smollm2-135m")
    dense = ppl(model)
    teacher = copy.deepcopy(model).eval()
    config = BlockSparseConfig(layout=args.layout, density=args.density, block_size=args.block)
    enable_block_sparse(model, config)
    sparse = ppl(model)

    windows = valid[: valid.numel() // args.seq_len * args.seq_len].view(-1, args.seq_len)
    windows = windows[torch.randperm(len(windows), generator=torch.Generator().manual_seed(0))]
    train = Dataset.from_dict({"input_ids": windows.tolist(), "labels": windows.tolist()})
    pattern = re.compile(TRAIN[args.train])
    for name, p in model.named_parameters():
        p.requires_grad_(bool(pattern.search(name)))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(
            model,
            train,
            None,
            output_dir=out,
            teacher=teacher,
            alpha=1.0,
            temperature=1.0,
            epochs=args.steps * args.batch_size / len(train),
            max_steps=args.steps,
            batch_size=args.batch_size,
            learning_rate=args.lr,
            bf16=True,
            logging_steps=10,
            progress=False,
            train_sampling_strategy="random",
        )
        start = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    recovered = ppl(model)
    print(
        json.dumps(
            {
                **config.to_dict(),
                "train": args.train,
                "steps": args.steps,
                "batch_size": args.batch_size,
                "seq_len": args.seq_len,
                "lr": args.lr,
                "train_windows": len(train),
                "ppl_dense": dense,
                "ppl_sparse": sparse,
                "ppl_recovered": recovered,
                "recovered_fraction": (sparse - recovered) / (sparse - dense),
                "train_s": train_s,
                "trainable_params": trainable,
                "losses": losses,
            }
        )
    )


if __name__ == "__main__":
    main()
