"""Each GLUE task's original file layout, read from a few hand-written rows."""

from __future__ import annotations

import pytest

from hfcompress.data import data_dir
from hfcompress.glue import GLUE_TASKS, GlueDataError, get_task, load_glue, read_glue_tsv

# A few rows per task, in the original GLUE layout (tabs, headers as in the download).
FILES = {
    "cola": ("CoLA", "dev.tsv", "gj04\t1\t\tThe sailors rode the breeze.\ngj04\t0\t*\tThe rope stretch over.\n"),
    "sst2": ("SST-2", "dev.tsv", "sentence\tlabel\nit 's a charming journey . \t1\nbleak and desperate \t0\n"),
    "mrpc": (
        "MRPC",
        "dev.tsv",
        "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
        '1\t1355540\t1355592\tHe said the " pie .\tThe pie business .\n0\t2029631\t2029565\tA b .\tC d .\n',
    ),
    "stsb": (
        "STS-B",
        "dev.tsv",
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
        "0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\tA man is dancing.\tA man dances.\t5.000\n"
        "1\tmain-captions\tMSRvid\t2012test\t0002\tnone\tnone\tA child rides.\tA cat sleeps.\t0.250\n",
    ),
    "rte": (
        "RTE",
        "dev.tsv",
        "index\tsentence1\tsentence2\tlabel\n0\tDana died.\tDana is dead.\tentailment\n"
        "1\tIt rains.\tIt is dry.\tnot_entailment\n",
    ),
    "wnli": ("WNLI", "dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\tThe drain is clogged.\tIt is clogged.\t1\n"),
    "qnli": (
        "QNLI",
        "dev.tsv",
        "index\tquestion\tsentence\tlabel\n0\tWho won?\tBob won.\tentailment\n1\tWhy?\tNo.\tnot_entailment\n",
    ),
    "qqp": (
        "QQP",
        "dev.tsv",
        "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n0\t1\t2\tHow do I cook?\tHow to cook?\t1\n",
    ),
    "mnli": (
        "MNLI",
        "dev_matched.tsv",
        "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
        "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label\n"
        "0\t1\t1e\tgov\t(x)\t(y)\t(X)\t(Y)\tThe cat sat.\tA cat sat.\tentailment\tentailment\n"
        "1\t2\t2c\tgov\t(x)\t(y)\t(X)\t(Y)\tIt is hot.\tIt is cold.\tcontradiction\tcontradiction\n",
    ),
}
EXPECTED = {
    "cola": ([("The sailors rode the breeze.", None, 1), ("The rope stretch over.", None, 0)]),
    "sst2": ([("it 's a charming journey . ", None, 1), ("bleak and desperate ", None, 0)]),
    "mrpc": ([('He said the " pie .', "The pie business .", 1), ("A b .", "C d .", 0)]),
    "stsb": ([("A man is dancing.", "A man dances.", 5.0), ("A child rides.", "A cat sleeps.", 0.25)]),
    "rte": ([("Dana died.", "Dana is dead.", 0), ("It rains.", "It is dry.", 1)]),
    "wnli": ([("The drain is clogged.", "It is clogged.", 1)]),
    "qnli": ([("Who won?", "Bob won.", 0), ("Why?", "No.", 1)]),
    "qqp": ([("How do I cook?", "How to cook?", 1)]),
    "mnli": ([("The cat sat.", "A cat sat.", 0), ("It is hot.", "It is cold.", 2)]),
}


def _write(root, task: str, text: str | None = None, name: str | None = None):
    folder, default_name, default_text = FILES[task]
    (root / folder).mkdir(parents=True, exist_ok=True)
    path = root / folder / (name or default_name)
    path.write_text(text if text is not None else default_text, encoding="utf-8")
    return path


@pytest.mark.parametrize("task", sorted(FILES), ids=sorted(FILES))
def test_original_layout_is_read_per_task(tmp_path, task):
    split = "validation_matched" if task == "mnli" else "validation"
    _write(tmp_path, task)
    ds = load_glue(task, split, tmp_path)
    rows = [(r["text_a"], r.get("text_b"), r["label"]) for r in ds]
    assert rows == EXPECTED[task]
    assert ("text_b" in ds.column_names) == (len(get_task(task).text_columns) == 2)


def test_splits_by_the_original_file_names(tmp_path):
    # the original layout calls the validation split "dev" (dev.tsv, dev_matched.tsv)
    _write(tmp_path, "rte")
    assert load_glue("rte", "dev", tmp_path)["text_a"] == load_glue("rte", "validation", tmp_path)["text_a"]
    _write(tmp_path, "mnli")
    assert (
        load_glue("mnli", "dev_matched", tmp_path)["text_a"]
        == load_glue("mnli", "validation_matched", tmp_path)["text_a"]
    )


def test_task_folder_itself_is_accepted(tmp_path):
    path = _write(tmp_path, "rte")
    assert len(load_glue("RTE", "validation", path.parent)) == 2


@pytest.mark.parametrize("name", ["SST-2", "sst2", "Sst-2", "sst-2"], ids=str)
def test_task_spellings(name):
    assert get_task(name) is GLUE_TASKS["sst2"]


def test_unknown_task_lists_the_tasks():
    with pytest.raises(GlueDataError, match=r"unknown GLUE task 'sst3'.*sst2"):
        get_task("sst3")


def test_missing_file_names_the_path_and_layout(tmp_path):
    _write(tmp_path, "rte")
    with pytest.raises(GlueDataError, match=r"no train\.tsv in .*RTE.*RTE/train\.tsv, dev\.tsv"):
        load_glue("rte", "train", tmp_path)


def test_missing_folder_is_refused(tmp_path):
    with pytest.raises(GlueDataError, match="does not exist"):
        load_glue("rte", "validation", tmp_path / "nope")


def test_bad_label_names_file_line_and_accepted(tmp_path):
    path = _write(tmp_path, "rte", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(GlueDataError, match=rf"{path.name}:2: label 'maybe'.*entailment, not_entailment"):
        read_glue_tsv(path, "rte")


def test_short_row_is_refused(tmp_path):
    path = _write(tmp_path, "mrpc", "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t2\t3\tonly one\n")
    with pytest.raises(GlueDataError, match=r":2: 4 fields, GLUE mrpc needs at least 5"):
        read_glue_tsv(path, "mrpc")


def test_wrong_header_is_refused(tmp_path):
    path = _write(tmp_path, "sst2", "text\tlabel\nfine\t1\n")
    with pytest.raises(GlueDataError, match="no column 'sentence'"):
        read_glue_tsv(path, "sst2")


def test_unknown_split_is_refused():
    with pytest.raises(GlueDataError, match=r"no split 'validation'.*validation_matched.*\(or by file: .*dev_matched"):
        load_glue("mnli", "validation", "/nonexistent")


@pytest.mark.skipif(data_dir() is None or not (data_dir() / "glue").is_dir(), reason="shared/data/glue not found")
@pytest.mark.parametrize(
    ("task", "train", "dev"),
    [
        ("cola", 8551, 1043),
        ("sst2", 67349, 872),
        ("mrpc", 3668, 408),
        ("rte", 2490, 277),
        ("stsb", 5749, 1500),
        ("wnli", 635, 71),
    ],
    ids=["cola", "sst2", "mrpc", "rte", "stsb", "wnli"],
)
def test_shared_glue_copy_loads_whole(task, train, dev):
    assert (len(load_glue(task, "train")), len(load_glue(task, "validation"))) == (train, dev)


def test_hub_source_maps_the_hub_columns(monkeypatch):
    """`nyu-mll/glue` rows (here a stand-in for the download) come out with our column names."""
    import datasets

    calls = []

    def fake_load_dataset(path, name, split):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict(
            {"premise": ["A cat sat."], "hypothesis": ["A cat."], "label": [0], "idx": [0]}
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_glue("MNLI", "validation_mismatched", "nyu-mll/glue")
    assert calls == [("nyu-mll/glue", "mnli", "validation_mismatched")]
    assert sorted(ds.column_names) == ["label", "text_a", "text_b"]
    assert ds[0] == {"text_a": "A cat sat.", "text_b": "A cat.", "label": 0}


def test_hub_failure_says_how_to_work_offline(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(GlueDataError, match=r"no network.*Offline, pass a local folder"):
        load_glue("rte", "train", "nyu-mll/glue")
