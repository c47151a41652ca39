"""How much of W3 SmolLM2-135M's perplexity loss a LoRA adapter trained on the frozen
quantized model wins back (QLoRA-style, through hfcompress.integrations.peft).

    python benchmarks/bench_lora.py                     # RTN W3 g128, rank 16, 200 steps
    python benchmarks/bench_lora.py --method gptq --steps 200

Protocol: evaluation as bench_gptq.py (first 40 windows of 512 tokens of WikiText-2 test);
the adapter trains on WikiText-2 *validation* windows of 512 tokens (shuffled, seed 0) with
AdamW, bf16 autocast on CPU, on every quantized layer (q/k/v/o/gate/up/down), lm_head in
float and frozen. Recovered = (ppl_W3 - ppl_W3+LoRA) / (ppl_W3 - ppl_fp32). Prints a JSON line.
Training on WikiText-2 also adapts the model to WikiText-2's domain: ``--method fp32`` trains
the same adapter on the float model, the line the quantized-plus-LoRA result is to be read
against.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--method",
        choices=["rtn", "gptq", "fp32"],
        default="rtn",
        help="fp32: the same adapter on the float model (how much of the gain is domain adaptation)",
    )
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--eval-windows", type=int, default=40)
    args = parser.parse_args()

    from bench_gptq import BEST_GPTQ, quantize

    from hfcompress.data import load_text
    from hfcompress.eval import perplexity
    from hfcompress.integrations.peft import add_lora
    from hfcompress.models import load_model, load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer("smollm2-135m")
    test = tokenizer(load_text("wikitext2:test"), return_tensors="pt", add_special_tokens=False).input_ids[0]
    valid = tokenizer(load_text("wikitext2:valid"), return_tensors="pt", add_special_tokens=False).input_ids[0]

    def ppl(model) -> float:
        model.eval()
        return perplexity(model, test, seq_len=512, max_windows=args.eval_windows, progress=False).perplexity

    model = load_model("smollm2-135m")
    fp32 = ppl(model)
    start = time.perf_counter()
    quantize(model, tokenizer, args.method, args.bits, args.group_size, BEST_GPTQ)
    quant_s = time.perf_counter() - start
    quantized = ppl(model)

    lora = {"r": args.rank, "lora_alpha": 2 * args.rank, "lora_dropout": 0.0}
    if args.method == "fp32":
        import peft

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        peft_model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", target_modules=targets, **lora))
    else:
        peft_model = add_lora(model, **lora)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * max(0.0, 1 - s / args.steps))
    windows = valid[: valid.numel() // args.seq_len * args.seq_len].view(-1, args.seq_len)
    order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(0))
    peft_model.train()
    start = time.perf_counter()
    losses = []
    for step in range(args.steps):
        idx = order[(torch.arange(args.batch_size) + step * args.batch_size) % windows.shape[0]]
        batch = windows[idx]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = peft_model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
        if step % 20 == 0:
            print(f"step {step} loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    train_s = time.perf_counter() - start
    recovered = ppl(peft_model)
    result = {
        "method": args.method,
        "bits": args.bits,
        "group_size": args.group_size,
        "rank": args.rank,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "ppl_fp32": fp32,
        "ppl_quantized": quantized,
        "ppl_lora": recovered,
        "recovered_fraction": (quantized - recovered) / (quantized - fp32) if quantized != fp32 else None,
        "quantize_s": quant_s,
        "train_s": train_s,
        "first_loss": sum(losses[:10]) / 10,
        "last_loss": sum(losses[-10:]) / 10,
        "trainable_params": sum(p.numel() for p in params),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
