"""The seams a new technique plugs into: module kinds, kernels and model patches.

Each test adds one in this file, with one registration call, and shows that the loader,
the dispatch or ``from_pretrained`` pick it up without any change to hfcompress.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import hfcompress
from hfcompress import kinds, patches
from hfcompress.integrations.transformers_quantizer import attach_quantization_config
from hfcompress.quant import dispatch
from hfcompress.quant.affine import quantize_rtn
from hfcompress.quant.linear import QuantLinear
from hfcompress.quant.scheme import QuantScheme


class HalfLinear(kinds.CompressedModule):
    """A module kind for the test: a Linear whose weight is stored in float16."""

    kind = "test_half_linear"
    marker_tensors = ("half_weight",)

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("half_weight", torch.zeros(out_features, in_features, dtype=torch.float16))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> HalfLinear:
        new = cls(linear.in_features, linear.out_features)
        new.half_weight.copy_(linear.weight.detach().half())
        return new

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features}

    @classmethod
    def from_spec(cls, spec, original):
        return cls(spec["in_features"], spec["out_features"])

    @classmethod
    def expected_tensors(cls, name, spec):
        return {f"{name}.half_weight": ("F16", (spec["out_features"], spec["in_features"]))}

    def storage_bytes(self) -> int:
        return self.half_weight.numel() * 2

    def forward(self, x):
        return nn.functional.linear(x, self.half_weight.to(x.dtype))


@pytest.fixture
def half_linear_kind(monkeypatch):
    monkeypatch.setitem(kinds._KINDS, HalfLinear.kind, HalfLinear)  # the registration line, undone after
    return HalfLinear


def test_a_new_module_kind_saves_and_reloads_without_loader_changes(half_linear_kind, tiny_llama, llama_ids, tmp_path):
    name = "model.layers.1.mlp.down_proj"
    kinds.swap_module(tiny_llama, name, HalfLinear.from_linear(tiny_llama.get_submodule(name)))
    attach_quantization_config(tiny_llama, {"stages": []})
    expected = tiny_llama(llama_ids).logits
    hfcompress.save_pretrained(tiny_llama, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]
    assert config["layers"] == {name: {"kind": "test_half_linear", "in_features": 96, "out_features": 80}}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert isinstance(reloaded.get_submodule(name), HalfLinear)
    assert torch.equal(reloaded(llama_ids).logits, expected)
    assert hfcompress.verify(tmp_path / "m").checked == 1


def test_registering_a_kind_twice_raises(half_linear_kind):
    with pytest.raises(ValueError, match="module kind 'test_half_linear' is already registered"):
        kinds.register_module_kind(HalfLinear)


def test_unknown_kind_in_a_checkpoint_is_a_clear_error(tiny_llama, tmp_path):
    hfcompress.compress(tiny_llama, [hfcompress.RTNConfig(bits=4, group_size=16)], progress=False)
    hfcompress.save_pretrained(tiny_llama, tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["layers"]["lm_head"] = {"kind": "sparse_linear"}
    path.write_text(json.dumps(config))
    with pytest.raises(hfcompress.CheckpointError, match="unknown module kind 'sparse_linear'"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "m")


def _w4_layer(n: int, k: int) -> QuantLinear:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0))
    scheme = QuantScheme.weight_only(num_bits=4, group_size=32, in_features=k, symmetric=False)
    return QuantLinear.from_quantized(quantize_rtn(w, bits=4, group_size=32, symmetric=False), scheme)


def test_a_new_kernel_is_chosen_by_its_capability_check(monkeypatch):
    calls = []

    def forward(layer, x):
        calls.append(layer.out_features)
        return dispatch.reference_forward(layer, x)

    kernel = dispatch.Kernel("test_n24", lambda layer, x: layer.out_features == 24, forward, priority=100)
    monkeypatch.setitem(dispatch._KERNELS, kernel.name, kernel)
    served, other = _w4_layer(24, 64), _w4_layer(32, 64)
    x = torch.randn(2, 64)
    assert dispatch.select_path(served, x) == "test_n24"
    assert dispatch.select_path(other, x) == "cpu_int4"
    torch.testing.assert_close(served(x), dispatch.reference_forward(served, x))
    other(x)
    assert calls == [24]
    with pytest.raises(ValueError, match="kernel 'test_n24' is already registered"):
        dispatch.register_kernel(kernel)


class _ScaledNorm(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.gain = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.norm(x) * self.gain


def _scale_final_norm(model: nn.Module, params: dict[str, Any]) -> None:
    model.model.norm = _ScaledNorm(model.model.norm)


@pytest.fixture
def scaled_norm_patch(monkeypatch):
    monkeypatch.setitem(patches._PATCHES, "test_scaled_norm", patches.Patch("test_scaled_norm", _scale_final_norm))


def test_a_patch_only_model_reloads_patched(scaled_norm_patch, tiny_llama, llama_ids, tmp_path):
    # Today's defect: a model whose only change is structural reloaded as the dense model.
    _scale_final_norm(tiny_llama, {})
    with torch.no_grad():
        tiny_llama.model.norm.gain.fill_(0.5)
    patches.record_patch(tiny_llama, "test_scaled_norm", {"why": "test"})
    attach_quantization_config(tiny_llama, {"stages": []})
    expected = tiny_llama(llama_ids).logits
    hfcompress.save_pretrained(tiny_llama, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]
    assert config["patches"] == [{"name": "test_scaled_norm", "why": "test"}] and config["layers"] == {}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert isinstance(reloaded.model.norm, _ScaledNorm) and reloaded.model.norm.gain.item() == 0.5
    assert torch.equal(reloaded(llama_ids).logits, expected)


def test_a_patch_this_version_does_not_know_is_refused(scaled_norm_patch, tiny_llama, tmp_path, monkeypatch):
    _scale_final_norm(tiny_llama, {})
    patches.record_patch(tiny_llama, "test_scaled_norm", {})
    attach_quantization_config(tiny_llama, {"stages": []})
    hfcompress.save_pretrained(tiny_llama, tmp_path / "m")
    monkeypatch.delitem(patches._PATCHES, "test_scaled_norm")
    with pytest.raises(hfcompress.CheckpointError, match="needs the model patch 'test_scaled_norm'"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "m")
