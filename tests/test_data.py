import pytest
import torch

from hfcompress import CalibrationDataError
from hfcompress.data import calibration_samples, data_dir, join_wikitext_rows, load_text

needs_data = pytest.mark.skipif(data_dir() is None, reason="shared/data not found")


def test_join_wikitext_rows_blanks_become_empty_rows():
    # rows: [" = A = \n", "", " text \n"], joined with blank lines as the Hub's rows are
    assert join_wikitext_rows(" = A = \n \n text \n") == " = A = \n" + "\n\n" + "" + "\n\n" + " text \n"


@needs_data
def test_wikitext_test_split_is_the_hub_text():
    raw = (data_dir() / "wikitext-2-raw" / "wiki.test.raw").read_text()
    assert len(raw.splitlines()) == 4358  # the Hub's test split has 4358 rows
    text = load_text("wikitext2:test")
    # Row 0 is blank (an empty row), row 1 the first title.
    assert text.startswith("" + "\n\n" + " = Robert Boulter = \n" + "\n\n")
    assert "\n \n" not in text  # blank lines became empty rows
    assert load_text("wikitext2:valid") != text


def _offline_without_data(monkeypatch):
    """No data folder, no $HFCOMPRESS_DATA_DIR, and any attempt to reach the Hub fails."""
    import datasets

    from hfcompress import data

    monkeypatch.delenv("HFCOMPRESS_DATA_DIR", raising=False)
    monkeypatch.setattr(data, "data_dir", lambda: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise ConnectionError("no network in this test")

    monkeypatch.setattr(datasets, "load_dataset", no_network)


def test_demo_evaluation_text_needs_no_network_and_no_data_folder(monkeypatch):
    from hfcompress.cli import DEFAULT_EVAL_DATA

    _offline_without_data(monkeypatch)
    text = load_text(DEFAULT_EVAL_DATA)  # what `make demo` scores
    assert text.startswith("" + "\n\n" + " = Robert Boulter = \n" + "\n\n")
    assert len(text.split("\n\n")) == 4358  # every row of the Hub's test split
    # The validation split is not bundled: offline and without a data folder it is a clear error.
    with pytest.raises(CalibrationDataError, match="WikiText-2 valid not found locally"):
        load_text("wikitext2:valid")


@needs_data
def test_bundled_test_split_is_byte_identical_to_the_data_folder(monkeypatch):
    from hfcompress.data import bundled_wikitext_test

    raw = (data_dir() / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")
    assert bundled_wikitext_test() == raw
    local = load_text("wikitext2:test")
    _offline_without_data(monkeypatch)
    assert load_text("wikitext2:test") == local


@pytest.mark.parametrize(
    "name", ["wikitext:test", "Salesforce/wikitext:test", "wikitext:wikitext-2-raw-v1:test", "wikitext2:test"]
)
def test_hub_names_of_wikitext_are_the_same_text(name):
    assert load_text(name) == load_text("wikitext2:test")


def test_unknown_sources_are_clear_errors(tmp_path):
    for name in ("wikitext2:train", "wikitext", "Salesforce/wikitext", "wikitext:wikitext-103-raw-v1:test"):
        with pytest.raises(CalibrationDataError, match=r"WikiText-2 is named .*\(e.g. wikitext2:test"):
            load_text(name)
    with pytest.raises(CalibrationDataError, match="neither a file nor one of"):
        load_text(tmp_path / "missing.txt")
    # Text itself where a source is expected: an error that says so, not an OSError or the text.
    for text in ("word " * 2000, "one line\nanother line"):
        with pytest.raises(CalibrationDataError, match=r"names no file \(text itself\?\).*\[text\]") as info:
            load_text(text)
        assert len(str(info.value)) < 300


def test_plain_text_file_is_read_as_is(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("a\n\nb\n")
    assert load_text(path) == "a\n\nb\n"


class _CharTokenizer:
    def __call__(self, text, return_tensors, add_special_tokens):
        return type("Enc", (), {"input_ids": torch.tensor([[ord(c) % 128 for c in text]])})()


def test_calibration_samples_are_seeded_windows():
    text = ["the quick brown fox jumps over the lazy dog"] * 20
    a = calibration_samples(_CharTokenizer(), text, num_samples=5, seq_len=16, seed=1)
    b = calibration_samples(_CharTokenizer(), text, num_samples=5, seq_len=16, seed=1)
    c = calibration_samples(_CharTokenizer(), text, num_samples=5, seq_len=16, seed=2)
    assert a.shape == (5, 16) and torch.equal(a, b) and not torch.equal(a, c)


def test_calibration_text_too_short():
    with pytest.raises(CalibrationDataError, match="seq_len=512 needs more"):
        calibration_samples(_CharTokenizer(), ["short"], num_samples=2, seq_len=512)


def test_text_shorter_than_the_windows_drawn_is_warned_about(caplog):
    text = ["the quick brown fox jumps over the lazy dog"] * 20  # 937 tokens with the separators
    with caplog.at_level("WARNING", logger="hfcompress.data"):
        calibration_samples(_CharTokenizer(), text, num_samples=20, seq_len=100)
    assert "fewer than the 20 windows x 100 tokens drawn from it: the windows overlap" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="hfcompress.data"):
        calibration_samples(_CharTokenizer(), text, num_samples=8, seq_len=16)
    assert caplog.text == ""


def test_a_recipe_tokenizes_its_calibration_text_once(monkeypatch):
    """Two calibrated stages (AWQ, then GPTQ with another batch size) draw the same windows
    from one tokenization."""
    import hfcompress
    from hfcompress import data
    from tests.conftest import make_char_tokenizer, make_tiny_llama

    calls, real = [], data.calibration_samples

    def counted(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(data, "calibration_samples", counted)
    seen, batches_of = [], hfcompress.modifier.Modifier.calibration_batches

    def recorded(self, *args):
        seen.append(batches_of(self, *args))
        return seen[-1]

    monkeypatch.setattr(hfcompress.modifier.Modifier, "calibration_batches", recorded)
    text = ["the quick brown fox jumps over the lazy dog " * 8] * 4
    stages = [hfcompress.AWQConfig(bits=4, group_size=16, batch_size=2), hfcompress.GPTQConfig(bits=4, group_size=16)]
    hfcompress.compress(
        make_tiny_llama(),
        stages,
        tokenizer=make_char_tokenizer(),
        calibration_data=text,
        num_calibration_samples=6,
        calibration_seq_len=16,
        progress=False,
    )
    assert len(calls) == 1
    assert [len(batches) for batches in seen] == [3, 1]  # 6 windows by 2, then by GPTQ's 8
    assert torch.equal(torch.cat([b["input_ids"] for b in seen[0]]), seen[1][0]["input_ids"])


def test_token_samples_in_the_shapes_peers_take_are_one_tensor():
    # AutoGPTQ/GPTQModel take a list of tokenizer outputs; others a list of id tensors or a
    # Dataset with an input_ids column: each gives the [num_samples, seq_len] tensor.
    import datasets

    from hfcompress.data import calibration_ids
    from tests.conftest import make_char_tokenizer

    tokenizer = make_char_tokenizer()
    texts = ["the quick brown fox", "jumps over the dogs"]  # 19 characters each
    want = torch.tensor([tokenizer(t).input_ids for t in texts])
    encodings = [tokenizer(t, return_tensors="pt") for t in texts]
    assert torch.equal(calibration_ids(encodings), want)
    assert torch.equal(calibration_ids(tokenizer(texts, return_tensors="pt")), want)
    assert torch.equal(calibration_ids([torch.tensor(r) for r in want.tolist()]), want)
    assert torch.equal(calibration_ids(datasets.Dataset.from_dict({"input_ids": want.tolist()})), want)


def test_a_dataloader_a_generator_and_a_datasetdict():
    # A DataLoader of id batches (llm-compressor's and ModelOpt's examples build one) and a
    # generator of texts were refused as unknown types; a generator must survive being read by
    # the stages' checks and then by the calibration itself.
    import datasets

    from hfcompress import compress
    from hfcompress.data import calibration_ids
    from tests.conftest import make_char_tokenizer, make_tiny_llama

    ids = torch.randint(1, 100, (6, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(calibration_ids(torch.utils.data.DataLoader(ids, batch_size=4)), ids)
    batches = [{"input_ids": ids[:3]}, {"input_ids": ids[3:]}]
    assert torch.equal(calibration_ids(torch.utils.data.DataLoader(batches, batch_size=None)), ids)
    texts = ["some calibration text, repeated. " * 10] * 4
    kw = dict(tokenizer=make_char_tokenizer(), num_calibration_samples=4, calibration_seq_len=16, progress=False)
    recipe = {"technique": "gptq", "bits": 4, "group_size": 16}
    from_list = compress(make_tiny_llama(), recipe, calibration_data=texts, **kw).state_dict()
    from_generator = compress(make_tiny_llama(), recipe, calibration_data=(t for t in texts), **kw).state_dict()
    assert all(torch.equal(from_list[k], from_generator[k]) for k in from_list)
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts})})
    with pytest.raises(CalibrationDataError, match=r"a DatasetDict of splits \['train'\]: pass one split"):
        calibration_ids(splits)


def test_token_samples_of_two_lengths_or_padded_are_refused():
    from hfcompress.data import calibration_ids
    from tests.conftest import make_char_tokenizer

    tokenizer = make_char_tokenizer()
    with pytest.raises(CalibrationDataError, match=r"different lengths \(3 to 5 tokens\).*calibration_seq_len"):
        calibration_ids([torch.tensor([1, 2, 3]), torch.tensor([1, 2, 3, 4, 5])])
    tokenizer.pad_token = " "
    padded = tokenizer(["a long sentence", "short"], padding=True, return_tensors="pt")
    with pytest.raises(CalibrationDataError, match=r"calibration sample 0 is padded"):
        calibration_ids(padded)


CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"


def _chat_tokenizer():
    from tests.conftest import make_char_tokenizer

    tokenizer = make_char_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def test_chat_conversations_are_laid_out_by_the_chat_template(tmp_path):
    # An instruct model's calibration data is usually chat rows ({"messages": [...]}, as
    # UltraChat's); they were refused ("needs a 'text' or 'input_ids' column"). Each form gives
    # the windows of the texts the chat template lays out.
    import json

    import datasets

    from hfcompress.data import calibration_ids

    tokenizer = _chat_tokenizer()
    chats = [
        [{"role": "user", "content": f"question {i}: why is the sky blue?"}, {"role": "assistant", "content": "light"}]
        for i in range(6)
    ]
    rendered = [tokenizer.apply_chat_template(c, tokenize=False) for c in chats]
    assert rendered[0] == "<user>question 0: why is the sky blue?\n<assistant>light\n"
    kw = dict(num_samples=5, seq_len=24, seed=3)
    want = calibration_ids(rendered, tokenizer, **kw)
    jsonl = tmp_path / "chats.jsonl"
    jsonl.write_text("".join(json.dumps({"messages": c, "id": i}) + "\n" for i, c in enumerate(chats)))
    for data in (
        chats,
        [{"messages": c} for c in chats],
        datasets.Dataset.from_dict({"messages": chats}),
        datasets.Dataset.from_dict({"conversations": chats}),
        jsonl,
        str(jsonl),
        (c for c in chats),
    ):
        assert torch.equal(calibration_ids(data, tokenizer, **kw), want), type(data)
    with pytest.raises(CalibrationDataError, match=r"chat conversations .* the tokenizer has no chat template"):
        tokenizer.chat_template = None
        calibration_ids(chats, tokenizer, **kw)
    with pytest.raises(CalibrationDataError, match="holds chat conversations, which only calibration renders"):
        load_text(jsonl)


def test_tables_single_text_columns_text_rows_and_id_lists(tmp_path):
    # A JSONL/CSV/TSV/Parquet file was read as raw text (JSON syntax and all) and calibrated on
    # silently; a Dataset whose one text column is not named 'text' (GLUE's 'sentence'), rows
    # of {"text": ...} and token ids as lists were refused.
    import json

    import datasets

    from hfcompress.data import calibration_ids, read_calibration_source

    tokenizer = _chat_tokenizer()
    sentences = [f'a "quoted" sentence number {i}, with a comma' for i in range(8)]
    kw = dict(num_samples=4, seq_len=20, seed=1)
    want = calibration_ids(sentences, tokenizer, **kw)
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences))
    (tmp_path / "rows.json").write_text(json.dumps([{"text": s} for s in sentences]))
    datasets.Dataset.from_dict({"sentence": sentences, "label": list(range(8))}).to_csv(tmp_path / "rows.csv")
    datasets.Dataset.from_dict({"text": sentences}).to_parquet(tmp_path / "rows.parquet")
    # GLUE's layout: tab-separated, quotes inside sentences are not quoting
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{s}\t1\n" for s in sentences))
    for name in ("rows.jsonl", "rows.json", "rows.csv", "rows.parquet", "train.tsv"):
        assert read_calibration_source(tmp_path / name) == sentences, name
        assert torch.equal(calibration_ids(tmp_path / name, tokenizer, **kw), want), name
        assert load_text(tmp_path / name) == "\n\n".join(sentences)
    assert torch.equal(calibration_ids([{"text": s} for s in sentences], tokenizer, **kw), want)
    ids = calibration_ids(datasets.Dataset.from_dict({"sentence": sentences, "label": [0] * 8}), tokenizer, **kw)
    assert torch.equal(ids, want)
    as_lists = [tokenizer(s).input_ids for s in sentences]
    assert torch.equal(calibration_ids(as_lists), torch.tensor(as_lists))
    pairs = datasets.Dataset.from_dict({"sentence1": sentences, "sentence2": sentences})
    with pytest.raises(CalibrationDataError, match=r"2 text columns \(sentence1, sentence2\).*rename_column"):
        calibration_ids(pairs, tokenizer, **kw)
    with pytest.raises(CalibrationDataError, match=r"need 'input_ids', 'text' or chat 'messages'.*\['label'\]"):
        calibration_ids([{"label": 1, "sentence": "a"}, {"label": 0}], tokenizer, **kw)
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{not json\n')
    with pytest.raises(CalibrationDataError, match=r"broken.jsonl could not be read as a json table"):
        read_calibration_source(tmp_path / "broken.jsonl")
