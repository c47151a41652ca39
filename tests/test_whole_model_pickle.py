"""``torch.save(model)`` of a whole compressed model, loaded by ``torch.load`` in a fresh
process: the quantized KV cache and block-sparse attention keep working there (their
attention functions registered again on unpickling; generate's cache hook picklable)."""

import copy
import subprocess
import sys
import textwrap

import torch

import hfcompress
from tests.conftest import make_tiny_llama

RECIPES = {
    "w4_kv4": (
        "stages:\n  - {technique: rtn, bits: 4, group_size: 32}\n  - {technique: kv_cache, bits: 4, group_size: 32}\n"
    ),
    "block_sparse": "stages:\n  - {technique: block_sparse, layout: dynamic, density: 0.5, block_size: 16}\n",
    "w8a8_sparse_kv4": (
        "stages:\n"
        "  - {technique: rtn, bits: 8, group_size: -1, symmetric: true, ignore: [lm_head]}\n"
        "  - {technique: int8_activations, strategy: token, dynamic: true}\n"
        "  - {technique: block_sparse, layout: dynamic, density: 0.5, block_size: 16}\n"
        "  - {technique: kv_cache, bits: 4, group_size: 32, residual_length: 8}\n"
    ),
}
IDS = torch.randint(0, 128, (1, 48), generator=torch.Generator().manual_seed(3))


def test_a_pickled_model_runs_and_generates_in_a_fresh_process(tmp_path):
    expected = {}
    for name, recipe in RECIPES.items():
        model = make_tiny_llama(hidden_size=128, intermediate_size=256, max_position_embeddings=128)
        hfcompress.compress(model, hfcompress.Recipe.from_yaml_str(recipe), progress=False)
        with torch.no_grad():
            logits = model(IDS).logits
            generated = model.generate(IDS, max_new_tokens=6, do_sample=False)
            # a deep copy generates the same, through its own cache hook
            assert torch.equal(copy.deepcopy(model).generate(IDS, max_new_tokens=6, do_sample=False), generated)
        torch.save(model, tmp_path / f"{name}.pt")
        expected[name] = (model.config._attn_implementation, logits, generated)
    torch.save({"ids": IDS, "expected": expected}, tmp_path / "expected.pt")
    code = textwrap.dedent(
        f"""
        import torch
        d = torch.load({str(tmp_path / "expected.pt")!r})
        for name, (attention, logits, generated) in d["expected"].items():
            model = torch.load({str(tmp_path)!r} + f"/{{name}}.pt", weights_only=False)
            assert model.config._attn_implementation == attention, name
            with torch.no_grad():
                assert torch.equal(model(d["ids"]).logits, logits), name
                assert torch.equal(model.generate(d["ids"], max_new_tokens=6, do_sample=False), generated), name
            print(name, "ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [w for name in RECIPES for w in (name, "ok")]
