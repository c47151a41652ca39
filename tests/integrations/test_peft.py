"""LoRA through peft on compressed models: frozen packed weights, trainable adapters."""

from __future__ import annotations

import pytest
import torch

import hfcompress
from hfcompress.errors import ModelError
from hfcompress.integrations.peft import QuantLoraLinear, add_lora, load_lora
from hfcompress.quant import QuantLinear
from hfcompress.quant.dispatch import reference_forward
from tests.conftest import make_tiny_bert, make_tiny_llama

W4 = {
    "stages": [{"name": "w", "technique": "rtn", "bits": 4, "group_size": 16, "symmetric": True, "ignore": ["lm_head"]}]
}
W8A8 = {
    "stages": [
        {"name": "w", "technique": "rtn", "bits": 8, "group_size": -1, "symmetric": True, "ignore": ["lm_head"]},
        {"name": "a", "technique": "int8_activations"},
    ]
}


def _train(model, ids, steps=20, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("recipe", [W4, W8A8], ids=["w4", "w8a8"])
def test_lora_on_a_quantized_model_trains_and_leaves_packed_weights_alone(recipe):
    model = make_tiny_llama()
    hfcompress.compress(model, recipe, progress=False)
    packed = {n: b.clone() for n, b in model.named_buffers()}
    peft_model = add_lora(model, r=8, lora_alpha=16)
    wrapped = [m for m in peft_model.modules() if isinstance(m, QuantLoraLinear)]
    assert len(wrapped) == 14 and all(isinstance(m.base_layer, QuantLinear) for m in wrapped)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = _train(peft_model, ids)
    assert losses[-1] < 0.85 * losses[0]
    for n, b in peft_model.base_model.model.named_buffers():
        if n in packed:
            assert torch.equal(b, packed[n]), n


def test_gradient_reaches_the_input_through_the_dequantize_path():
    model = make_tiny_llama()
    hfcompress.compress(model, W4, progress=False)
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 80, requires_grad=True)
    layer(x).sum().backward()
    expected = layer.dequantize(torch.float32).sum(0).expand(3, -1)
    torch.testing.assert_close(x.grad, expected)
    with torch.no_grad():  # inference keeps the packed kernel, the same numbers
        torch.testing.assert_close(layer(x), reference_forward(layer, x.detach()), rtol=2e-2, atol=2e-2)


def test_merge_is_refused_and_the_adapter_saves_and_reloads(tmp_path):
    model = make_tiny_llama()
    hfcompress.compress(model, W4, progress=False)
    peft_model = add_lora(model, r=4, lora_alpha=8)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    _train(peft_model, ids, steps=3)
    with pytest.raises(ModelError, match="cannot be merged into packed quantized weights"):
        peft_model.merge_and_unload()
    peft_model.eval()
    with torch.no_grad():
        trained = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    base = make_tiny_llama()
    hfcompress.compress(base, W4, progress=False)
    reloaded = load_lora(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained)


def test_lora_on_a_quantized_classifier_and_bad_variants():
    model = make_tiny_bert()
    hfcompress.compress(
        model,
        {
            "stages": [
                {
                    "name": "w",
                    "technique": "rtn",
                    "bits": 4,
                    "group_size": 32,
                    "symmetric": True,
                    "ignore": ["classifier"],
                }
            ]
        },
        progress=False,
    )
    peft_model = add_lora(model, r=4)
    assert peft_model.peft_config["default"].task_type == "SEQ_CLS"
    quantized = make_tiny_llama()
    hfcompress.compress(quantized, W4, progress=False)
    with pytest.raises(ModelError, match="plain LoRA only"):
        add_lora(quantized, r=4, use_dora=True)
    with pytest.raises(ModelError, match="no compressed layers"):
        add_lora(make_tiny_llama(), r=4)


def test_a_model_with_adapters_is_refused_before_any_stage_runs():
    # compressing a PeftModel took the adapters' own lora_A/lora_B Linear layers as targets
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ModelError, match=r"carries peft adapters \(.*q_proj.*\); compress the base model first"):
        hfcompress.compress(model, W4, progress=False)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    merged = model.merge_and_unload()  # the fix the error names
    hfcompress.compress(merged, W4, progress=False)
    assert isinstance(merged.model.layers[0].self_attn.q_proj, hfcompress.QuantLinear)


def _w4_llama(**kwargs):
    model = make_tiny_llama(**kwargs)
    hfcompress.compress(model, hfcompress.Recipe.from_dict(W4), progress=False)
    return model


def test_plain_get_peft_model_wraps_quantized_layers_and_reloads(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    model = _w4_llama()
    hfcompress.save_pretrained(model, tmp_path / "base")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    wrapped = peft_model.base_model.model.model.layers[0].self_attn
    assert isinstance(wrapped.q_proj, QuantLoraLinear) and isinstance(wrapped.q_proj.base_layer, QuantLinear)
    ids = torch.randint(0, 128, (2, 10))
    losses = _train(peft_model, ids, steps=5)
    assert losses[-1] < losses[0]
    peft_model.eval()
    logits = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert torch.equal(reloaded(ids).logits, logits)


@pytest.mark.parametrize("head_w8", [False, True])
def test_all_linear_includes_quantized_layers_but_not_the_head(head_w8):
    from peft import LoraConfig, get_peft_model

    model = make_tiny_llama()
    stages = [hfcompress.RTNConfig(bits=4, group_size=16)]
    if head_w8:
        stages.append(hfcompress.RTNConfig(bits=8, group_size=-1, targets=("lm_head",), ignore=()))
    hfcompress.compress(model, hfcompress.Recipe(stages), progress=False)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    wrapped = {n.rpartition(".")[2] for n, m in peft_model.named_modules() if isinstance(m, QuantLoraLinear)}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not isinstance(peft_model.base_model.model.lm_head, QuantLoraLinear)


def test_peft_learns_our_layers_whichever_is_imported_first():
    import subprocess
    import sys

    probe = (
        "import sys, torch\n"
        "{first}\n"
        "from tests.conftest import make_tiny_llama\n"
        "from peft import LoraConfig, get_peft_model\n"
        "m = make_tiny_llama()\n"
        "hfcompress.compress(m, [hfcompress.RTNConfig(bits=4, group_size=16)], progress=False)\n"
        "p = get_peft_model(m, LoraConfig(r=2, target_modules=['q_proj']))\n"
        "print(type(p.base_model.model.model.layers[0].self_attn.q_proj).__name__)\n"
    )
    orders = {
        "peft first": "import peft\nimport hfcompress",
        "hfcompress first": "import hfcompress\nassert 'peft' not in sys.modules  # not imported for nothing",
        # transformers looks peft up (importlib.util.find_spec) before anything imports it
        "looked up, then imported": "import hfcompress, importlib.util\nassert importlib.util.find_spec('peft')\n"
        "from transformers import Trainer",
    }
    for label, first in orders.items():
        out = subprocess.run([sys.executable, "-c", probe.format(first=first)], capture_output=True, text=True)
        assert out.returncode == 0, (label, out.stderr[-2000:])
        assert out.stdout.strip().splitlines()[-1] == "QuantLoraLinear", label


def test_qlora_recipe_prepare_for_kbit_training_and_gradient_checkpointing():
    """peft's QLoRA preparation, then activation checkpointing: the first block's adapters
    still get gradients (recomputed through the packed kernels' dequantize path)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = make_tiny_llama()
    hfcompress.compress(model, W4, progress=False)
    packed = {n: b.clone() for n, b in model.named_buffers()}
    model = prepare_model_for_kbit_training(model)
    model.gradient_checkpointing_enable()
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    peft_model.train()
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    first = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(first, QuantLoraLinear)
    for p in (first.lora_A["default"].weight, first.lora_B["default"].weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    for n, b in peft_model.base_model.model.named_buffers():
        if n in packed:
            assert torch.equal(b, packed[n]), n


@pytest.mark.parametrize("head", ["quantized", "float"])
def test_a_quantized_classifier_head_that_peft_would_train_whole_is_warned_about(head):
    """SEQ_CLS LoRA trains the classifier whole (modules_to_save); a packed head could only
    learn its bias, so say so (and say nothing when the recipe left the head float)."""
    import warnings

    from peft import LoraConfig, get_peft_model

    model = make_tiny_bert(num_labels=2)
    ignore = ["classifier"] if head == "float" else []
    hfcompress.compress(model, [hfcompress.RTNConfig(bits=8, group_size=-1, ignore=ignore)], progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear", task_type="SEQ_CLS"))
    ours = [w for w in caught if "packed weight cannot train" in str(w.message)]
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad and "classifier" in n}
    if head == "quantized":
        assert len(ours) == 1 and "QuantLinear (64 -> 2)" in str(ours[0].message)
        assert trainable == {"base_model.model.classifier.modules_to_save.default.bias"}
    else:
        assert ours == []
        assert "base_model.model.classifier.modules_to_save.default.weight" in trainable
