"""How much of a low-rank SmolLM2-135M's perplexity loss recovery wins back: distillation
from the unpatched model (our DistillationTrainer) or LoRA on the factors (peft).

    python benchmarks/bench_lowrank_recovery.py                       # FFN cut 20%, whitened, distill
    python benchmarks/bench_lowrank_recovery.py --method asvd --recovery lora --steps 100

Protocol: the low-rank stage calibrates as bench_lowrank.py (128 windows x 512 tokens of
WikiText-2 validation, seed 0); evaluation the first 40 windows of 512 tokens of WikiText-2
test. Recovery trains on WikiText-2 *validation* windows of 512 tokens (shuffled, seed 0),
bf16 autocast on CPU:

* ``distill``: only the factors train (everything else frozen), on the pure distillation
  loss (``alpha = 1``: the KL divergence to the float teacher's next-token distribution at
  temperature 1, no WikiText labels). The target is the teacher, not WikiText-2, so the
  result is not domain adaptation: a dense student trained this way would not move.
* ``lora``: a rank-``--rank`` LoRA adapter on every factor, trained on the language-model
  loss of the same windows (this one also adapts to WikiText-2; read it against
  bench_lora.py's float-model line).

Recovered = (ppl_low_rank - ppl_recovered) / (ppl_low_rank - ppl_dense). Prints a JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratio", type=float, default=0.2, help="fraction of the FFN weights removed")
    parser.add_argument("--method", choices=["whitened", "asvd", "svd"], default="whitened")
    parser.add_argument("--recovery", choices=["distill", "lora"], default="distill")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (--recovery lora)")
    parser.add_argument("--calib", type=int, default=128)
    parser.add_argument("--eval-windows", type=int, default=40)
    args = parser.parse_args()

    from datasets import Dataset

    import hfcompress
    from hfcompress.data import load_text
    from hfcompress.eval import perplexity
    from hfcompress.integrations.trainer import make_trainer
    from hfcompress.models import load_model, load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer("smollm2-135m")
    test = tokenizer(load_text("wikitext2:test"), return_tensors="pt", add_special_tokens=False).input_ids[0]
    valid = tokenizer(load_text("wikitext2:valid"), return_tensors="pt", add_special_tokens=False).input_ids[0]

    def ppl(model) -> float:
        model.eval()
        return perplexity(model, test, seq_len=512, max_windows=args.eval_windows, progress=False).perplexity

    model = load_model("smollm2-135m")
    dense = ppl(model)
    teacher = copy.deepcopy(model).eval()
    start = time.perf_counter()
    hfcompress.compress(
        model,
        [hfcompress.LowRankConfig(method=args.method, ratio=args.ratio)],
        tokenizer=tokenizer,
        calibration_data="wikitext2:valid",
        progress=False,
        num_calibration_samples=args.calib,
        calibration_seq_len=512,
        seed=0,
    )
    compress_s = time.perf_counter() - start
    low_rank = ppl(model)

    windows = valid[: valid.numel() // args.seq_len * args.seq_len].view(-1, args.seq_len)
    windows = windows[torch.randperm(len(windows), generator=torch.Generator().manual_seed(0))]
    train = Dataset.from_dict({"input_ids": windows.tolist(), "labels": windows.tolist()})
    if args.recovery == "lora":
        from hfcompress.integrations.peft import add_lora

        student = add_lora(model, r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0)
        teacher = None
    else:
        student = model
        for name, p in student.named_parameters():
            p.requires_grad_(".factor_" in name)
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    epochs = args.steps * args.batch_size / len(train)
    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(
            student,
            train,
            None,
            output_dir=out,
            teacher=teacher,
            alpha=1.0,
            temperature=1.0,
            epochs=epochs,
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
    recovered = ppl(student)
    print(
        json.dumps(
            {
                "method": args.method,
                "ratio": args.ratio,
                "recovery": args.recovery,
                "steps": args.steps,
                "batch_size": args.batch_size,
                "lr": args.lr,
                "ppl_dense": dense,
                "ppl_low_rank": low_rank,
                "ppl_recovered": recovered,
                "recovered_fraction": (low_rank - recovered) / (low_rank - dense),
                "compress_s": compress_s,
                "train_s": train_s,
                "trainable_params": trainable,
                "losses": losses,
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
