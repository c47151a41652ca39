"""Teacher-labelled augmentation: copies perturbed with embedding neighbours, without labels;
the distillation loss skips their task term and still learns from them."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset

from hfcompress.glue import UNLABELLED, augment_glue
from hfcompress.glue.augment import embedding_neighbours
from hfcompress.techniques.pkd.loss import is_unlabelled, task_loss

WORDS = ["[PAD]", "[UNK]", "good", "great", "fine", "bad", "awful", "poor", "film", "movie", "##s", ".", "a"]


class WordTokenizer:
    """The one method augment_glue needs from a tokenizer."""

    def get_vocab(self):
        return {w: i for i, w in enumerate(WORDS)}


def _embeddings():
    """Three clusters: {good, great, fine}, {bad, awful, poor}, {film, movie}; the rest apart."""
    e = torch.eye(len(WORDS))
    groups = (("good", "great", "fine"), ("bad", "awful", "poor"), ("film", "movie"))
    for seed, group in enumerate(groups):
        centre = torch.randn(len(WORDS), generator=torch.Generator().manual_seed(seed))
        for w in group:
            e[WORDS.index(w)] = centre + 0.05 * e[WORDS.index(w)]
    return e


def _pairs(label_type=int):
    return Dataset.from_dict(
        {
            "text_a": ["A good film .", "Bad movie", "a"],
            "text_b": ["great movie", "An awful film .", "good"],
            "label": [label_type(1), label_type(0), label_type(1)],
        }
    )


def test_neighbours_are_the_nearest_whole_words():
    table = embedding_neighbours(_embeddings(), WordTokenizer().get_vocab(), {"good", "film", "xyz", "a"}, k=2)
    assert sorted(table["good"]) == ["fine", "great"]
    assert table["film"][0] == "movie"
    assert "xyz" not in table and "a" not in table  # out of vocabulary; one letter
    assert all("##" not in w and w != "good" for w in table["good"])


def test_copies_follow_the_originals_without_labels():
    data = _pairs()
    out = augment_glue(data, _embeddings(), WordTokenizer(), copies=3, replace_prob=1.0, neighbours=2, seed=0)
    assert out[: len(data)] == data[:]
    copies = out.select(range(len(data), len(out)))
    # "a" / "good" as the only words: the third row still changes through "good".
    assert len(copies) == 3 * len(data)
    assert set(copies["label"]) == {UNLABELLED}
    first = copies[0]
    # Every replaceable word went to one of its 2 neighbours, with its case kept; the rest stays.
    a_words, b_words = first["text_a"].split(), first["text_b"].split()
    assert a_words[0] == "A" and a_words[1] in {"great", "fine"} and a_words[2] == "movie" and a_words[3] == "."
    movie = embedding_neighbours(_embeddings(), WordTokenizer().get_vocab(), {"movie"}, k=2)["movie"]
    assert b_words[0] in {"good", "fine"} and b_words[1] in movie and movie[0] == "film"
    assert copies[1]["text_a"].split()[0] in {"Awful", "Poor"}


def test_same_seed_same_copies_and_regression_rows_get_nan():
    data = _pairs(float)
    one = augment_glue(data, _embeddings(), WordTokenizer(), copies=2, seed=3, replace_prob=0.5)
    two = augment_glue(data, _embeddings(), WordTokenizer(), copies=2, seed=3, replace_prob=0.5)
    assert one["text_a"] == two["text_a"] and one["text_b"] == two["text_b"]
    labels = torch.tensor(one["label"])
    assert labels[: len(data)].tolist() == [1.0, 0.0, 1.0]
    assert all(math.isnan(v) for v in labels[len(data) :].tolist())
    assert is_unlabelled(labels).tolist() == [False] * len(data) + [True] * (len(one) - len(data))
    only = augment_glue(
        data, _embeddings(), WordTokenizer(), copies=2, seed=3, replace_prob=0.5, include_original=False
    )
    assert only["text_a"] == one["text_a"][len(data) :]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(copies=0), "copies=0: need an integer >= 1"),
        (dict(replace_prob=0.0), r"replace_prob=0.0: need a probability in \(0, 1\]"),
        (dict(model_or_embeddings=torch.zeros(4, 8)), "has 4 rows but the tokenizer's vocabulary needs 13"),
    ],
    ids=["copies", "prob", "embeddings"],
)
def test_bad_arguments_are_named(kwargs, message):
    args = dict(model_or_embeddings=_embeddings(), copies=2) | kwargs
    with pytest.raises(ValueError, match=message):
        augment_glue(_pairs(), args.pop("model_or_embeddings"), WordTokenizer(), **args)


def test_dataset_without_labels_is_refused():
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['label'\]"):
        augment_glue(Dataset.from_dict({"text_a": ["good"]}), _embeddings(), WordTokenizer())


def test_task_loss_counts_labelled_rows_only():
    logits = torch.randn(4, 3, requires_grad=True)
    labels = torch.tensor([2, UNLABELLED, 0, UNLABELLED])
    expected = torch.nn.functional.cross_entropy(logits[[0, 2]], labels[[0, 2]])
    assert torch.allclose(task_loss(logits, labels), expected)
    scores = torch.randn(3, 1, requires_grad=True)
    targets = torch.tensor([0.5, float("nan"), 4.0])
    assert torch.allclose(task_loss(scores, targets), ((scores[[0, 2], 0] - targets[[0, 2]]) ** 2).mean())
    # A batch of copies only: zero, and backward still works (the KD terms carry the step).
    none = task_loss(logits, torch.full((4,), UNLABELLED))
    none.backward()
    assert none.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))
