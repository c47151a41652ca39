import pytest

from hfcompress.targets import resolve_linear_targets


def _names(model, targets, ignore=()):
    return list(resolve_linear_targets(model, tuple(targets), tuple(ignore)))


def test_class_name_selects_every_linear(tiny_llama):
    names = _names(tiny_llama, ["Linear"])
    assert len(names) == 2 * 7 + 1 and "lm_head" in names


def test_ignore_wins(tiny_llama):
    assert "lm_head" not in _names(tiny_llama, ["Linear"], ["lm_head"])


def test_exact_name(tiny_llama):
    assert _names(tiny_llama, ["model.layers.1.mlp.down_proj"]) == ["model.layers.1.mlp.down_proj"]


def test_regex_is_a_full_match(tiny_llama):
    assert _names(tiny_llama, [r"re:.*\.(q|k)_proj"]) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.k_proj",
    ]
    assert _names(tiny_llama, ["re:q_proj"]) == []


@pytest.mark.parametrize("container", ["LlamaMLP", "model.layers.0"])
def test_container_selects_linears_inside(tiny_llama, container):
    names = _names(tiny_llama, [container])
    assert names and all(".layers.0." in n or container == "LlamaMLP" for n in names)
    assert all("mlp" in n for n in names) or container == "model.layers.0"
