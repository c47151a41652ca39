"""The quantized KV cache on SmolLM2-135M beside transformers' QuantizedCache (quanto and HQQ
backends), measured in one run on this machine.

    python benchmarks/bench_kv.py [--windows 8] [--trials 20] [--only ppl,needle,bytes,speed,chunks] [--compile]

Parts (each prints a markdown table for benchmarks/RESULTS.md):

* ``ppl``: perplexity *through the cache*: WikiText-2 test windows of 2048 tokens, a 256-token
  prefill, then chunks of 64 tokens, each attending to everything earlier through the cache
  (teacher-forced prefill alone would never read the quantized part). float32 model; the
  baseline is transformers' DynamicCache (float32, an upper bound on an fp16 cache).
* ``needle``: a five-digit pass key hidden at a random depth in filler text of 1k, 2k, 4k
  and 8k tokens, then "What is the pass key?": greedy answer, 20 trials per length. The
  prompt's prefill is computed once per trial (in full precision for every cache: none of them
  quantizes the prompt's own attention) and loaded into each cache; each cache then decodes.
* ``bytes``: the cache's bytes at 4k and 8k tokens (scales, zeros, sinks and window included;
  for the peers every tensor their quantized states hold, plus their window) against a
  bfloat16 DynamicCache, and the process's peak resident memory from the prefill on
  (one child process per cache; the peak is reset after the model loads).
* ``chunks``: a 4096-token prompt fed in chunks of 512 and of 64 tokens (a chunked prefill, or
  a chat's turns), each chunk attending to everything earlier through the cache: seconds, and
  the last position's logits against the float cache's.
* ``speed``: CPU decode tokens/s at 512, 2k and 8k tokens of context, bfloat16 model, median
  of --steps steps; ours also through the reference path (the history dequantized every step
  in torch, what transformers' QuantizedCache does), and given to the model with its SDPA
  attention (no ``enable_kv_cache``: ``update`` hands SDPA the history, dequantized in C).
  ``--compile`` adds the float cache and ours KV4 with
  ``model.forward = torch.compile(model.forward)``.

Peers: axis 0 for quanto (its default; it accepts only 0 or -1), axis 1 for HQQ (what HQQ's
README says to start with), q_group_size 64 and residual_length 128 (transformers' defaults).
quanto has no 8-bit KV; HQQ's 8-bit runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, QuantizedCache

from hfcompress.data import load_text
from hfcompress.eval.speed import cpu_name
from hfcompress.integrations.kv_cache import QuantizedKVCache, disable_kv_cache, enable_kv_cache
from hfcompress.models import load_model, load_tokenizer
from hfcompress.quant.dispatch import reference_path

MODEL = "smollm2-135m"
# Ours: KV4 and KV8 at group 64 with 16 sink tokens (the stage's defaults); KV2 needs smaller
# key groups and more sinks on this model (RESULTS.md).
OURS = {
    "ours KV8": dict(bits=8, group_size=64, sink_tokens=16),
    "ours KV4": dict(bits=4, group_size=64, sink_tokens=16),
    "ours KV2": dict(bits=2, group_size=16, sink_tokens=64),
}
PEERS = {
    "quanto KV4": dict(backend="quanto", nbits=4, axis_key=0, axis_value=0),
    "quanto KV2": dict(backend="quanto", nbits=2, axis_key=0, axis_value=0),
    "HQQ KV8": dict(backend="hqq", nbits=8, axis_key=1, axis_value=1),
    "HQQ KV4": dict(backend="hqq", nbits=4, axis_key=1, axis_value=1),
    "HQQ KV2": dict(backend="hqq", nbits=2, axis_key=1, axis_value=1),
}
FLOAT = "float cache"


def cache_factory(label: str, config) -> Callable[[], object]:
    """A function building a fresh cache of kind ``label`` for a model with ``config``."""
    if label == FLOAT:
        return lambda: DynamicCache(config=config)
    if label in OURS:
        return lambda: QuantizedKVCache(config, residual_length=128, **OURS[label])
    spec = dict(PEERS[label])
    backend = spec.pop("backend")
    return lambda: QuantizedCache(backend, config, q_group_size=64, residual_length=128, **spec)


# -- perplexity through the cache ---------------------------------------------------------------


@torch.no_grad()
def perplexity_through_cache(model, ids: torch.Tensor, make, windows: int, length=2048, prefill=256, chunk=64):
    total, count = 0.0, 0
    for w in range(windows):
        x = ids[w * length : (w + 1) * length][None]
        cache = make()
        logits = [model(x[:, :prefill], cache=cache).logits]
        for start in range(prefill, length, chunk):
            logits.append(model(x[:, start : start + chunk], cache=cache).logits)
        lg = torch.cat(logits, dim=1)[0, :-1].float()
        total += torch.nn.functional.cross_entropy(lg, x[0, 1:], reduction="sum").item()
        count += length - 1
    return math.exp(total / count)


def run_ppl(args) -> None:
    model = load_model(MODEL)
    enable_kv_cache(model)
    tokenizer = load_tokenizer(MODEL)
    ids = tokenizer(load_text("wikitext2:test"), return_tensors="pt", add_special_tokens=False).input_ids[0]
    labels = _available([FLOAT, *OURS, *PEERS])
    rows = {}
    for label in tqdm(labels, desc="perplexity through the cache"):
        # CPU time of this process: unlike wall time, unaffected by other work on the machine
        start = time.process_time()
        rows[label] = (
            perplexity_through_cache(model, ids, cache_factory(label, model.config), args.windows),
            time.process_time() - start,
        )
    base = rows[FLOAT][0]
    print(f"\n### Perplexity through the cache ({args.windows} windows of 2048, prefill 256, chunks of 64)\n")
    print("| cache | perplexity | vs float cache | CPU time (s) |\n|---|---|---|---|")
    for label, (ppl, secs) in rows.items():
        print(f"| {label} | {ppl:.3f} | {100 * (ppl / base - 1):+.2f}% | {secs:.0f} |")


# -- needle retrieval ---------------------------------------------------------------------------

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def needle_prompt(tokenizer, length: int, rng: random.Random) -> tuple[torch.Tensor, str]:
    key = str(rng.randint(10000, 99999))
    head = tokenizer("There is a pass key hidden in the text below. Remember it.\n", add_special_tokens=False).input_ids
    needle = tokenizer(
        f"The pass key is {key}. Remember it. {key} is the pass key. ", add_special_tokens=False
    ).input_ids
    tail = tokenizer("\nWhat is the pass key? The pass key is", add_special_tokens=False).input_ids
    filler = tokenizer(FILLER, add_special_tokens=False).input_ids
    room = length - len(head) - len(needle) - len(tail)
    hay = (filler * (room // len(filler) + 1))[:room]
    at = int(room * rng.uniform(0.05, 0.95))
    return torch.tensor([head + hay[:at] + needle + hay[at:] + tail]), key


def _load_prefill(cache, prefill: DynamicCache):
    """Give ``cache`` the prompt's keys and values, as a prefill through it would."""
    for i, layer in enumerate(prefill.layers):
        cache.update(layer.keys, layer.values, i)
        if isinstance(cache, QuantizedKVCache):
            cache.layers[i].commit()
    return cache


@torch.no_grad()
def answer(model, tokenizer, logits: torch.Tensor, cache, new_tokens: int = 8) -> str:
    token = logits[:, -1:].argmax(-1)
    out = [token]
    for _ in range(new_tokens - 1):
        token = model(token, cache=cache).logits[:, -1:].argmax(-1)
        out.append(token)
    return tokenizer.decode(torch.cat(out, dim=1)[0])


def run_needle(args) -> None:
    model = load_model(MODEL)
    enable_kv_cache(model)
    tokenizer = load_tokenizer(MODEL)
    labels = _available([FLOAT, "ours KV4", "ours KV2", "quanto KV4", "HQQ KV4", "quanto KV2", "HQQ KV2"])
    hits = {(label, n): 0 for label in labels for n in args.lengths}
    rng = random.Random(0)
    for n in args.lengths:
        for _ in tqdm(range(args.trials), desc=f"needle {n}"):
            ids, key = needle_prompt(tokenizer, n, rng)
            prefill = DynamicCache(config=model.config)
            with torch.no_grad():
                logits = model(ids, cache=prefill, logits_to_keep=1).logits
            for label in labels[1:]:
                cache = _load_prefill(cache_factory(label, model.config)(), prefill)
                hits[(label, n)] += key in answer(model, tokenizer, logits, cache)
            # the float cache (the prefill's own) decodes last, so that its growth reaches no other
            hits[(FLOAT, n)] += key in answer(model, tokenizer, logits, prefill)
    print(f"\n### Needle retrieval ({args.trials} trials per length, pass key found in the greedy answer)\n")
    print("| cache | " + " | ".join(f"{n} tokens" for n in args.lengths) + " |")
    print("|---|" + "---|" * len(args.lengths))
    for label in labels:
        print(f"| {label} | " + " | ".join(f"{100 * hits[(label, n)] / args.trials:.0f}%" for n in args.lengths) + " |")


# -- bytes and peak memory ----------------------------------------------------------------------


def _reset_peak() -> None:
    # Linux: writing 5 to clear_refs resets the peak resident set size (VmHWM), so that the
    # model's loading does not hide the cache's peak.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def storage_bytes(obj) -> int:
    """Bytes of every tensor reachable from ``obj`` (through tuples, lists, dicts and the inner
    tensors of tensor subclasses such as quanto's packed tensors)."""
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "__tensor_flatten__") and type(obj) is not torch.Tensor:
            names, _ = obj.__tensor_flatten__()
            return sum(storage_bytes(getattr(obj, n)) for n in names)
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(storage_bytes(v) for v in obj.values())
    if isinstance(obj, (tuple, list)):
        return sum(storage_bytes(v) for v in obj)
    return 0


def _child_bytes(label: str, context: int) -> None:
    """In a child process: prefill ``context`` tokens into the cache, decode 16, print JSON."""
    torch.manual_seed(0)
    model = load_model(MODEL).to(torch.bfloat16)
    enable_kv_cache(model)
    cache = cache_factory(label, model.config)()
    _reset_peak()
    ids = torch.randint(100, 10000, (1, context - 16))
    with torch.no_grad():
        logits = model(ids, cache=cache, logits_to_keep=1).logits
        token = logits.argmax(-1)
        for _ in range(16):
            token = model(token, cache=cache).logits[:, -1:].argmax(-1)
    if isinstance(cache, QuantizedKVCache):
        nbytes = cache.nbytes()
    elif isinstance(cache, DynamicCache):
        nbytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    else:  # QuantizedCache: quantized states (codes, scales, zeros) and the full-precision window
        nbytes = sum(
            storage_bytes((layer._quantized_keys, layer._quantized_values, layer.keys, layer.values))
            for layer in cache.layers
        )
    print(json.dumps({"bytes": nbytes, "peak": _peak()}))


def run_bytes(args) -> None:
    labels = _available([FLOAT, *OURS, "quanto KV4", "HQQ KV4"])
    print("\n### KV bytes and peak process memory (bfloat16 model; one child process per cache)\n")
    print("| cache | context | KV bytes (MB) | vs bf16 cache | peak RSS from prefill on (MB) |\n|---|---|---|---|---|")
    for context in args.byte_contexts:
        base = None
        for label in tqdm(labels, desc=f"bytes {context}"):
            out = subprocess.run(
                [sys.executable, __file__, "--child-bytes", label, str(context)],
                capture_output=True,
                text=True,
                check=True,
            )
            result = json.loads(out.stdout.strip().splitlines()[-1])
            nbytes, peak = result["bytes"], result["peak"]
            base = base if base is not None else nbytes
            ratio = "n/a" if nbytes is None else f"{nbytes / base:.3f}x"
            shown = "n/a" if nbytes is None else f"{nbytes / 1e6:.1f}"
            print(f"| {label} | {context} | {shown} | {ratio} | {peak / 1e6:.0f} |", flush=True)


# -- decode speed -------------------------------------------------------------------------------


@torch.no_grad()
def decode_rate(model, cache, logits, steps: int) -> float:
    token = logits[:, -1:].argmax(-1)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        token = model(token, cache=cache).logits[:, -1:].argmax(-1)
        times.append(time.perf_counter() - start)
    return 1.0 / statistics.median(times)


COMPILED = ", torch.compile"


PEER_PACKAGES = {"quanto": "optimum.quanto", "hqq": "hqq"}


def _missing_backend(label: str) -> str | None:
    """The package a peer cache ``label`` needs, when it is not installed."""
    package = PEER_PACKAGES[PEERS[label]["backend"]]
    try:
        found = importlib.util.find_spec(package) is not None
    except ModuleNotFoundError:  # a parent package (optimum) is missing
        found = False
    return None if found else package


def _available(labels: list[str]) -> list[str]:
    """``labels`` without the peers whose backend is not installed (each named once)."""
    kept = []
    for label in labels:
        missing = _missing_backend(label) if label in PEERS else None
        if missing:
            print(f"{label}: left out, {missing} is not installed")
        else:
            kept.append(label)
    return kept


PLAIN_SDPA = " (SDPA attention)"  # the cache given to a model whose attention is not ours


def _cache_for(label: str, model, prefill: DynamicCache):
    """A ``label`` cache holding the prompt's keys and values."""
    name = label.replace(" (reference path)", "").replace(COMPILED, "").replace(PLAIN_SDPA, "")
    if name == FLOAT:
        cache = DynamicCache(config=model.config)
        for i, layer in enumerate(prefill.layers):
            cache.update(layer.keys.clone(), layer.values.clone(), i)
        return cache
    return _load_prefill(cache_factory(name, model.config)(), prefill)


def run_speed(args) -> None:
    model = load_model(MODEL).to(torch.bfloat16)
    enable_kv_cache(model)
    labels = _available(
        [FLOAT, "ours KV4", "ours KV4 (reference path)", "ours KV4" + PLAIN_SDPA, "ours KV2", "quanto KV4", "HQQ KV4"]
    )
    compiled = None
    if args.compile:
        # model.forward compiled; under it our cache's decode step is one operator per layer
        # (hfcompress.integrations.kv_cache). Each context's first steps, untimed, compile.
        labels += [FLOAT + COMPILED, "ours KV4" + COMPILED]
        compiled = torch.compile(model.forward)
        torch._dynamo.config.recompile_limit = torch._dynamo.config.accumulated_recompile_limit = 64
    rates: dict[tuple[str, int], float] = {}
    for context in args.speed_contexts:
        ids = torch.randint(100, 10000, (1, context))
        prefill = DynamicCache(config=model.config)
        with torch.no_grad():
            logits = model(ids, cache=prefill, logits_to_keep=1).logits
        for label in tqdm(labels, desc=f"decode at {context}"):
            cache = _cache_for(label, model, prefill)
            if label.endswith(COMPILED):
                model.forward = compiled
                try:
                    decode_rate(model, _cache_for(label, model, prefill), logits, 3)  # compiles
                    rates[(label, context)] = decode_rate(model, cache, logits, args.steps)
                finally:
                    del model.forward  # the instance attribute: the class's forward again
            elif label.endswith("(reference path)"):
                with reference_path():
                    rates[(label, context)] = decode_rate(model, cache, logits, args.steps)
            elif label.endswith(PLAIN_SDPA):  # update() hands SDPA the dequantized history
                disable_kv_cache(model)
                try:
                    rates[(label, context)] = decode_rate(model, cache, logits, args.steps)
                finally:
                    enable_kv_cache(model)
            else:
                rates[(label, context)] = decode_rate(model, cache, logits, args.steps)
    print(f"\n### CPU decode tokens/s (bfloat16 model, median of {args.steps} steps; {cpu_name()})\n")
    print("| cache | " + " | ".join(f"{c} ctx" for c in args.speed_contexts) + " |")
    print("|---|" + "---|" * len(args.speed_contexts))
    for label in labels:
        cells = [f"{rates[(label, c)]:.2f} ({rates[(label, c)] / rates[(FLOAT, c)]:.2f}x)" for c in args.speed_contexts]
        print(f"| {label} | " + " | ".join(cells) + " |")


def run_chunks(args) -> None:
    """A long prompt fed in chunks (a chunked prefill; a chat's next turn is one such chunk),
    every chunk attending to everything earlier through the cache: seconds for the whole
    prompt, best of ``--rounds``, bfloat16 model, with the last position's logits against the
    float cache's."""
    model = load_model(MODEL).to(torch.bfloat16)
    enable_kv_cache(model)
    labels = [FLOAT, "ours KV4", "ours KV2"]
    ids = torch.randint(100, 10000, (1, args.chunk_prompt), generator=torch.Generator().manual_seed(0))
    print(f"\n### A {args.chunk_prompt}-token prompt in chunks (bfloat16 model, best of {args.rounds}; {cpu_name()})\n")
    print("| cache | " + " | ".join(f"chunks of {c}" for c in args.chunk_sizes) + " |")
    print("|---|" + "---|" * len(args.chunk_sizes))
    rows: dict[str, list[str]] = {label: [] for label in labels}
    for chunk in args.chunk_sizes:
        seconds, last = {}, {}
        for label in labels:
            best = math.inf
            for _ in range(args.rounds):
                cache = cache_factory(label, model.config)()
                start = time.perf_counter()
                for s in range(0, ids.shape[1], chunk):
                    logits = model(ids[:, s : s + chunk], cache=cache, logits_to_keep=1).logits
                best = min(best, time.perf_counter() - start)
            seconds[label], last[label] = best, logits[0, -1].float()
        for label in labels:
            diff = (last[label] - last[FLOAT]).abs().max().item()
            ratio = seconds[FLOAT] / seconds[label]
            rows[label].append(f"{seconds[label]:.2f} s ({ratio:.2f}x; logits max diff {diff:.2f})")
    for label in labels:
        print(f"| {label} | " + " | ".join(rows[label]) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="ppl,needle,bytes,speed,chunks", help="comma-separated parts to run")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--byte-contexts", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--speed-contexts", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--chunk-prompt", type=int, default=4096, help="chunks: the prompt's tokens")
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[512, 64])
    parser.add_argument("--rounds", type=int, default=2, help="chunks: timed rounds per cache (the best counts)")
    parser.add_argument("--compile", action="store_true", help="speed: also time the float cache and KV4 compiled")
    parser.add_argument("--child-bytes", nargs=2, metavar=("LABEL", "CONTEXT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_bytes:
        _child_bytes(args.child_bytes[0], int(args.child_bytes[1]))
        return
    torch.set_grad_enabled(False)
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} threads; torch {torch.__version__}")
    parts = {"ppl": run_ppl, "needle": run_needle, "bytes": run_bytes, "speed": run_speed, "chunks": run_chunks}
    for part in args.only.split(","):
        parts[part](args)


if __name__ == "__main__":
    main()
