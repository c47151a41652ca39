"""Shared fixtures: tiny random Llama and BERT models built from configs."""

from __future__ import annotations

import os

import pytest
import torch

# Triton runs on CPU only through its interpreter; set it before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

import hfcompress  # (importing it also registers the transformers quantizer)


def make_tiny_llama(seed: int = 0, tie: bool = True, layers: int = 2, **overrides) -> LlamaForCausalLM:
    """2 layers, hidden 80 (not a multiple of 32: partial groups at group size 32), GQA;
    ``overrides`` replace any of these config fields."""
    torch.manual_seed(seed)
    fields = dict(
        vocab_size=128,
        hidden_size=80,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    config = LlamaConfig(**{**fields, **overrides})
    return LlamaForCausalLM(config).eval()


def make_tiny_causal(model_type: str, **extra):
    """A tiny random causal LM of any ``model_type`` (4 layers, hidden 64, 4 query heads on 2 KV
    heads, 256 positions); ``extra`` sets or replaces config fields."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    fields.update(extra)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **fields)).eval()


def make_tiny_hybrid(model_type: str, **extra):
    """A tiny model of sliding-window (or chunked) and full-attention layers, head dim 16."""
    return make_tiny_causal(model_type, head_dim=16, bos_token_id=1, eos_token_id=None, pad_token_id=0, **extra)


def make_tiny_llava():
    """A tiny Llava whose vision tower has more blocks (4) than its language model (2), as
    Qwen2-VL-2B has (32 and 28)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    text = dict(model_type="llama", vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                  num_attention_heads=2, image_size=32, patch_size=8)  # fmt: skip
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(LlavaConfig(text_config=text, vision_config=vision, image_token_id=150)).eval()


def make_tiny_bert(
    seed: int = 0, layers: int = 2, num_labels: int = 3, vocab: int = 100, **overrides
) -> BertForSequenceClassification:
    """2 layers, hidden 64; ``overrides`` replace any of the config fields."""
    torch.manual_seed(seed)
    fields = dict(
        vocab_size=vocab,
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=128,
        num_labels=num_labels,
        pad_token_id=0,
    )
    return BertForSequenceClassification(BertConfig(**{**fields, **overrides})).eval()


class Killed(Exception):
    """Stands for the process being killed in the middle of a run."""


def killed_run(monkeypatch, owner: type, method: str, after_calls: int, run) -> None:
    """Call ``run()`` with ``owner.method`` raising :class:`Killed` once ``after_calls`` calls
    of it have completed; check that the run was killed, then restore the method."""
    original = getattr(owner, method)
    calls = []

    def kill(self, *args, **kwargs):
        if len(calls) == after_calls:
            raise Killed
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(owner, method, kill)
    with pytest.raises(Killed):
        run()
    monkeypatch.setattr(owner, method, original)


def assert_resume_gives_the_uninterrupted_result(
    monkeypatch,
    tmp_path,
    config,
    calibration: torch.Tensor,
    owner: type,
    method: str,
    after_calls: int,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Compress a 3-block tiny Llama (seed 3, in ``dtype``) with ``config`` in one go; then
    again, killed once ``after_calls`` calls of ``owner.method`` completed and started over
    from the block checkpoints in ``tmp_path``. Assert the two end with the same tensors, and
    return the resumed model's state."""

    def run(**kwargs) -> LlamaForCausalLM:
        model = make_tiny_llama(seed=3, layers=3).to(dtype)
        hfcompress.compress(model, config, calibration_data=calibration, progress=False, **kwargs)
        return model

    expected = {k: v.clone() for k, v in run().state_dict().items()}
    killed_run(monkeypatch, owner, method, after_calls, lambda: run(checkpoint_dir=tmp_path))
    got = run(checkpoint_dir=tmp_path).state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    return got


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    return make_tiny_llama()


@pytest.fixture
def tiny_bert() -> BertForSequenceClassification:
    return make_tiny_bert()


@pytest.fixture
def llama_ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def bert_ids() -> torch.Tensor:
    return torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def make_char_tokenizer():
    """A character-level fast tokenizer over 128 ids, enough to drive the CLI on tiny models."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i): i for i in range(32, 127)}
    vocab.update({"<unk>": 0, "<eos>": 1, "\n": 10})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


@pytest.fixture
def tiny_llama_dir(tmp_path):
    """A saved tiny Llama with a tokenizer, as a folder the CLI can load."""
    model = make_tiny_llama()
    model.config.eos_token_id = 1
    model.generation_config.eos_token_id = 1
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    make_char_tokenizer().save_pretrained(path)
    return path


def write_tiny_glue(root, rows: int = 48):
    """SST-2 and RTE folders in the original layout whose label is a trivial function of the
    text ("good"/"bad" words), so a tiny model can learn them in a few steps."""
    import random

    rng = random.Random(0)
    for folder, header, make in (
        ("SST-2", "sentence\tlabel", lambda w, y: f"{w} {w} fun\t{y}"),
        ("RTE", "index\tsentence1\tsentence2\tlabel", None),
    ):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for split, n in (("train", rows), ("dev", rows // 2)):
            lines = [header]
            for i in range(n):
                y = rng.randint(0, 1)
                word = "good" if y else "bad"
                if make is not None:
                    lines.append(make(word, y))
                else:
                    label = "not_entailment" if y else "entailment"
                    lines.append(f"{i}\tit is {word}.\tit is {word} too.\t{label}")
            (root / folder / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def tiny_glue_dir(tmp_path):
    return write_tiny_glue(tmp_path / "glue")


def save_tiny_bert_classifier(path, seed: int = 0, layers: int = 4, num_labels: int = 2):
    """A saved tiny BERT classifier (vocab 128) with the character tokenizer."""
    model = make_tiny_bert(seed, layers=layers, num_labels=num_labels, vocab=128)
    model.save_pretrained(path)
    tokenizer = make_char_tokenizer()
    tokenizer.pad_token = "<unk>"
    tokenizer.save_pretrained(path)
    return path
