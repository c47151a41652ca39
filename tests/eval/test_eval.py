import math

import pytest
import torch
import torch.nn.functional as F

from hfcompress import RTNConfig, compress
from hfcompress.errors import EvaluationError
from hfcompress.eval import decode_speed, perplexity, size_report
from hfcompress.eval.size import linear_layer_stats


def test_perplexity_matches_a_hand_computation(tiny_llama):
    ids = torch.randint(0, 128, (50,), generator=torch.Generator().manual_seed(0))
    result = perplexity(tiny_llama, ids, seq_len=16, progress=False)
    assert (result.windows, result.tokens) == (3, 45)  # 50 // 16 windows, 15 predictions each
    nll = 0.0
    for w in ids[:48].reshape(3, 16):
        logits = tiny_llama(w[None]).logits[0]
        nll += F.cross_entropy(logits[:-1], w[1:], reduction="sum").item()
    assert result.perplexity == pytest.approx(math.exp(nll / 45), rel=1e-5)


def test_perplexity_max_windows_and_batching(tiny_llama):
    ids = torch.randint(0, 128, (100,), generator=torch.Generator().manual_seed(0))
    one = perplexity(tiny_llama, ids, seq_len=10, max_windows=4, progress=False)
    batched = perplexity(tiny_llama, ids, seq_len=10, max_windows=4, batch_size=3, progress=False)
    assert one.windows == 4 and one.perplexity == pytest.approx(batched.perplexity, rel=1e-5)


def test_perplexity_reads_a_training_model_without_dropout():
    # a model left training (after a Trainer) was scored through its dropout: a noisy, higher
    # perplexity, silently. It is scored in eval mode, and keeps its own modes.
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama(attention_dropout=0.5)
    ids = torch.randint(0, 128, (64,), generator=torch.Generator().manual_seed(0))
    want = perplexity(model, ids, seq_len=16, progress=False).perplexity
    model.train()
    model.model.layers[0].eval()
    assert perplexity(model, ids, seq_len=16, progress=False).perplexity == want
    assert model.training and model.model.layers[1].training and not model.model.layers[0].training


def test_perplexity_needs_a_full_window(tiny_llama):
    with pytest.raises(EvaluationError, match="the text has 20 tokens, fewer than one window of seq_len=32"):
        perplexity(tiny_llama, torch.arange(20), seq_len=32, progress=False)


BAD_EVAL_INPUTS = [
    ("text", lambda ids: "some text", 16, r"must be a tensor of token ids, got str; for text use text_perplexity"),
    ("two-rows", lambda ids: ids.view(2, 50), 16, r"must be 1-D \[T\] token ids, got torch.int64 \(2, 50\)"),
    ("floats", lambda ids: ids.float(), 16, r"must be 1-D \[T\] token ids, got torch.float32"),
    ("vocabulary", lambda ids: ids + 1000, 16, r"token id \d+ is outside the model's vocabulary \(0..127\)"),
    # the tiny Llama's max_position_embeddings is 64; a Llama still ran such windows and scored them
    ("too-long", lambda ids: ids, 100, r"seq_len=100 exceeds the model's max_position_embeddings=64"),
]


@pytest.mark.parametrize("make,seq_len,message", [c[1:] for c in BAD_EVAL_INPUTS], ids=[c[0] for c in BAD_EVAL_INPUTS])
def test_perplexity_names_unusable_inputs(tiny_llama, make, seq_len, message):
    ids = torch.randint(0, 128, (100,), generator=torch.Generator().manual_seed(0))
    with pytest.raises(EvaluationError, match=message):
        perplexity(tiny_llama, make(ids), seq_len=seq_len, progress=False)
    one_row = perplexity(tiny_llama, ids[None], seq_len=16, progress=False)  # a tokenizer's [1, T]
    assert one_row == perplexity(tiny_llama, ids, seq_len=16, progress=False)


def test_perplexity_and_decode_speed_refuse_a_classifier(tiny_bert):
    with pytest.raises(EvaluationError, match="needs a causal language model; BertForSequenceClassification"):
        perplexity(tiny_bert, torch.randint(0, 100, (64,)), seq_len=16, progress=False)
    with pytest.raises(EvaluationError, match="needs a model that generates; BertForSequenceClassification"):
        decode_speed(tiny_bert, None)


def test_size_report_before_and_after(tiny_llama):
    stats = linear_layer_stats(tiny_llama)
    compress(tiny_llama, [RTNConfig(bits=4, group_size=16)], progress=False)
    after = size_report(tiny_llama)
    names = list(tiny_llama.config.quantization_config.layers)
    before = size_report(tiny_llama, names, stats=stats)
    weights = sum(m.in_features * m.out_features for n, m in tiny_llama.named_modules() if n in names)
    assert after.layer_weights == before.layer_weights == weights
    assert before.bits_per_weight == 32
    # 4-bit codes + a float16 scale and a uint8 zero point per 16 weights: 4 + 24 / 16.
    assert after.bits_per_weight == pytest.approx(4 + 24 / 16)
    assert after.fraction_of_fp16 == pytest.approx(after.bits_per_weight / 16)


def test_decode_speed_reports_a_rate(tiny_llama):
    class Tok:
        def __call__(self, text, return_tensors):
            return type("Enc", (), {"input_ids": torch.tensor([[1, 2, 3]])})()

    speed = decode_speed(tiny_llama, Tok(), new_tokens=4, repeats=1)
    assert speed.tokens_per_second > 0 and speed.prompt_tokens == 3 and speed.new_tokens == 4


def test_decode_speed_decodes_a_batch_side_by_side(tiny_llama, monkeypatch):
    class Tok:
        def __call__(self, text, return_tensors):
            return type("Enc", (), {"input_ids": torch.tensor([[1, 2, 3]])})()

    shapes = []
    generate = tiny_llama.generate
    monkeypatch.setattr(
        tiny_llama, "generate", lambda ids, **kw: shapes.append(tuple(ids.shape)) or generate(ids, **kw)
    )
    speed = decode_speed(tiny_llama, Tok(), new_tokens=4, repeats=1, batch=3)
    assert speed.batch == 3 and {tuple(shape) for shape in shapes} == {(3, 3)}
    with pytest.raises(ValueError, match="batch=0"):
        decode_speed(tiny_llama, Tok(), new_tokens=4, batch=0)
