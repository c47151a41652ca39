"""Dev: static per-tensor W8A8 (SQ0.7 + W8 + MSE) with the activation stage's e2e_steps."""
import copy, json, sys, time
import torch
import hfcompress
from hfcompress.data import load_text
from hfcompress.eval import perplexity
from hfcompress.models import load_model, load_tokenizer

N = int(sys.argv[1]); specs = sys.argv[2:]
tok = load_tokenizer("smollm2-135m")
base = load_model("smollm2-135m")
test = tok(load_text("wikitext2:test"), return_tensors="pt", add_special_tokens=False).input_ids[0]
kw = dict(tokenizer=tok, calibration_data="wikitext2:valid", num_calibration_samples=N, calibration_seq_len=512,
          seed=0, progress=False)
def ppl(m):
    with torch.no_grad():
        return perplexity(m, test, seq_len=512, max_windows=10, progress=False).perplexity
t0 = time.time()
fp = ppl(base); print("fp32", round(fp, 3), flush=True)
hfcompress.compress(base, hfcompress.Recipe.from_yaml_str(
    "stages:\n  - {name: smooth, technique: smoothquant, alpha: 0.7}\n"
    "  - {name: w8, technique: rtn, bits: 8, group_size: -1, symmetric: true, ignore: [lm_head]}\n"), **kw)
print("prefix", round(ppl(base), 3), f"{time.time()-t0:.0f}s", flush=True)
for spec in ["{}"] + specs:
    extra = json.loads(spec)
    m = copy.deepcopy(base); t1 = time.time()
    fields = {"strategy": "tensor", "dynamic": False, "observer": "mse", **extra}
    body = ", ".join(f"{k}: {json.dumps(v)}" for k, v in fields.items())
    hfcompress.compress(m, hfcompress.Recipe.from_yaml_str(
        "stages:\n  - {name: acts, technique: int8_activations, " + body + "}\n"), **kw)
    p = ppl(m)
    print(spec, round(p, 3), f"{100*(p/fp-1):+.2f}%", f"{time.time()-t1:.0f}s", flush=True)
