"""How far the CPU fast paths (cpu_int4, cpu_int8) are from the exact float32 result, on
SmolLM2-135M, and what it does to perplexity.

    python benchmarks/bench_cpu_precision.py [--windows 40] [--tokens 256]

Per layer: the activations each quantized Linear sees on the first --tokens tokens of the
WikiText-2 test split are captured; the relative output error ``||y - y_ref|| / ||y_ref||``
(summed over every layer) is measured against ``y_ref``, float32 activations times the
float32 dequantized weight, for: bfloat16 activations alone (the floor of any bfloat16
kernel), torch's op as we called it before (int4: the op's zero-point offset rounded to
bfloat16, which is also what calls of fewer than 16 rows still run; int8: the scales
rounded to bfloat16 inside the op), the op as we call it now (what CPUs without AMX or AVX-512 BF16 run on
these 256-row calls), where the CPU has AMX, the AMX bfloat16 kernel that serves such
calls there, and where the CPU has AVX-512 BF16, the decode kernel that serves decoding calls
(fed the same rows 8 at a time; 4 bits on bfloat16 inputs, 8 bits in float32) and the matmul
of the dequantized weight, which serves calls of 64 rows or more there without AMX (in
bfloat16, or in float32 where that is faster: ``cpu_decode.dense_dtype``).
Perplexity: WikiText-2 test, first --windows windows of 512 tokens, with the reference kernel
in float32 (``HFCOMPRESS_FORCE_REFERENCE=1``) and with the fast path.
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import replace

import torch
import torch.nn.functional as F

import hfcompress
from hfcompress.data import load_text
from hfcompress.eval import perplexity
from hfcompress.models import load_model, load_tokenizer
from hfcompress.quant import cpu_decode, cpu_kernels, cpu_w8a8
from hfcompress.quant.dispatch import reference_path, select_kernel

RECIPES = {
    "W4 g128 asym, fp16 scales": ("recipes/smollm2_w4a16_rtn_g128.yaml", "cpu_int4"),
    "W8 per-channel sym": ("recipes/llama_w8a16_rtn.yaml", "cpu_int8"),
}


_BUILD_INT4 = cpu_kernels._build_int4


def _before_int4(layer):
    """cpu_int4 with the op's zero-point offset rounded to bfloat16: as it was before the
    fix, and as it still runs calls of fewer than EXACT_OFFSET_MIN_ROWS rows (decoding)."""
    pack = _BUILD_INT4(layer)
    return replace(pack, scale_zero=pack.scale_offset, offsets=torch.zeros_like(pack.offsets))


_BUILD_INT8 = cpu_kernels._build_int8


def _before_int8(layer):
    """cpu_int8 as it was: the layer's scales handed to the op, rounded to bfloat16."""
    pack = _BUILD_INT8(layer)
    return replace(pack, rescale=torch.ones_like(pack.rescale))


_BEFORE = {
    "cpu_int4": ("_build_int4", _before_int4, _BUILD_INT4),
    "cpu_int8": ("_build_int8", _before_int8, _BUILD_INT8),
}


def _capture(model, ids):
    inputs = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, name=name: inputs.__setitem__(name, args[0].detach().clone()))
        for name, m in model.named_modules()
        if isinstance(m, hfcompress.QuantLinear)
    ]
    with reference_path(), torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return inputs


def _errors(model, inputs, kernel_name):
    sums = {
        "bf16 activations only": 0.0,
        "kernel before": 0.0,
        "kernel now": 0.0,
        "AMX bf16 kernel": 0.0,
        "decode kernel": 0.0,
        "dense matmul": 0.0,
    }
    ref_total = 0.0
    measured = set()  # the paths this CPU has (an exact one reads 0)
    amx = cpu_w8a8.amx_available()
    for name, m in model.named_modules():
        if name not in inputs:
            continue
        x = inputs[name].float()
        w = m.dequantize().float()
        ref = F.linear(x, w)
        assert select_kernel(m, x).name == kernel_name, (name, select_kernel(m, x).name)
        outs = {"bf16 activations only": F.linear(x.bfloat16().float(), w)}
        if amx:
            outs["AMX bf16 kernel"] = m(x).float()
        rows = x.reshape(-1, x.shape[-1])
        if cpu_decode.decode_forward(m, rows[:1]) is not None:
            parts = [cpu_decode.decode_forward(m, rows[i : i + 8]) for i in range(0, len(rows), 8)]
            outs["decode kernel"] = torch.cat(parts).view(ref.shape)
        if cpu_decode.dense_available():
            outs["dense matmul"] = cpu_decode.dense_forward(m, x).float()
        attribute, before, now = _BEFORE[kernel_name]
        serves, dense = cpu_w8a8.amx_bf16_serves, cpu_decode.dense_dtype
        cpu_w8a8.amx_bf16_serves = lambda *a: False  # torch's op, as on CPUs without AMX
        cpu_decode.dense_dtype = lambda: None  # (and without the dense matmul)
        try:
            outs["kernel now"] = m(x).float()
            m._kernel_cache.clear()
            setattr(cpu_kernels, attribute, before)
            outs["kernel before"] = m(x).float()
        finally:
            cpu_w8a8.amx_bf16_serves, cpu_decode.dense_dtype = serves, dense
            setattr(cpu_kernels, attribute, now)
            m._kernel_cache.clear()
        for key, y in outs.items():
            sums[key] += (y - ref).pow(2).sum().item()
            measured.add(key)
        ref_total += ref.pow(2).sum().item()
    return {k: (v / ref_total) ** 0.5 if k in measured else None for k, v in sums.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)
    base = load_model("smollm2-135m")
    tokenizer = load_tokenizer("smollm2-135m")
    tokens = tokenizer(load_text("wikitext2:test"), return_tensors="pt", add_special_tokens=False).input_ids[0]
    print(f"SmolLM2-135M, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print(
        "| scheme | kernel | rel. error: bf16 activations only | op before | op now | AMX bf16 kernel | decode kernel "
        f"| dense matmul ({str(cpu_decode.dense_dtype()).removeprefix('torch.')}) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    ppl_rows = []
    for label, (recipe, kernel_name) in RECIPES.items():
        model = copy.deepcopy(base)
        hfcompress.compress(model, recipe, progress=False)
        errors = _errors(model, _capture(model, tokens[: args.tokens].view(1, -1)), kernel_name)
        cells = [
            "-" if v is None else "0 (exact)" if v == 0 else f"{100 * v:.3f}%" if v >= 1e-5 else f"{100 * v:.1e}%"
            for v in errors.values()
        ]
        print(f"| {label} | {kernel_name} | " + " | ".join(cells) + " |")
        with reference_path():
            reference = perplexity(model, tokens, seq_len=512, max_windows=args.windows, progress=False).perplexity
        fast = perplexity(model, tokens, seq_len=512, max_windows=args.windows, progress=False).perplexity
        ppl_rows.append((label, kernel_name, reference, fast))
    print(f"\nWikiText-2 test perplexity, first {args.windows} windows of 512 tokens:\n")
    print("| scheme | reference kernel, float32 | fast path | difference |")
    print("|---|---|---|---|")
    for label, kernel_name, reference, fast in ppl_rows:
        print(f"| {label} | {reference:.4f} | {fast:.4f} ({kernel_name}) | {fast - reference:+.4f} |")


if __name__ == "__main__":
    main()
