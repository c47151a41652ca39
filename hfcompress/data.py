"""Text data: WikiText-2 (local copy or the Hub) and calibration samples.

A text source is one of:

* ``wikitext2:test`` / ``wikitext2:valid`` (also ``wikitext2:validation``): WikiText-2 raw.
  The Hub's names work too: ``wikitext:test``, ``Salesforce/wikitext:test``, with or without
  the config (``wikitext:wikitext-2-raw-v1:validation``).
  Read from ``$HFCOMPRESS_DATA_DIR/wikitext-2-raw/wiki.<split>.raw`` or from the
  ``shared/data`` folder beside this checkout; else, for the test split, from the copy this
  package ships (``hfcompress/resources``, CC BY-SA 3.0, checked against the official
  file's sha256), so that evaluation needs no network; else from the Hub dataset
  ``wikitext`` (``wikitext-2-raw-v1``) when online.
* a path to a text file. A file named ``wiki.*.raw`` is read as WikiText rows (below); any
  other file is used as it is, except a table:
* a path to a table (``.jsonl``, ``.json``, ``.csv``, ``.tsv``, ``.parquet``), read with
  ``datasets``: its ``text`` column (or its only string column), or its ``input_ids``, or its
  chat ``messages`` (``conversations``), which calibration renders with the tokenizer's chat
  template.

WikiText rows are joined the way most LLM quantization papers and tools do it: the file's lines
(blank lines as empty rows) joined with ``"\\n\\n"``, which is byte-identical to joining the Hub
dataset's ``text`` column.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from importlib import resources
from pathlib import Path

import torch

from hfcompress.errors import CalibrationDataError

__all__ = [
    "DATA_ENV",
    "ChatConversations",
    "bundled_wikitext_test",
    "calibration_batches",
    "calibration_ids",
    "calibration_samples",
    "data_dir",
    "is_calibration_text",
    "join_wikitext_rows",
    "load_text",
    "read_calibration_source",
    "reusable",
]

logger = logging.getLogger(__name__)

DATA_ENV = "HFCOMPRESS_DATA_DIR"
_SPLITS = {"test": "test", "valid": "valid", "validation": "valid"}
_HUB_SPLITS = {"test": "test", "valid": "validation"}
_WIKITEXT_NAMES = ("wikitext2", "wikitext", "Salesforce/wikitext")  # ours, then the Hub's
_WIKITEXT_CONFIG = "wikitext-2-raw-v1"
_BUNDLED_TEST = "wikitext-2-raw-v1-test.raw.gz"
_BUNDLED_TEST_SHA256 = "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"


def data_dir() -> Path | None:
    """``$HFCOMPRESS_DATA_DIR``, else the first ``shared/data`` found beside the working
    directory or this checkout, else None."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV])
    repo = Path(__file__).resolve().parent.parent
    for base in (Path.cwd(), repo):
        for candidate in (base / "shared" / "data", base.parent / "shared" / "data"):
            if candidate.is_dir():
                return candidate
    return None


def join_wikitext_rows(raw: str) -> str:
    """Join the lines of a WikiText raw file as the Hub dataset's rows are joined."""
    rows = [line if line.strip() else "" for line in raw.splitlines(keepends=True)]
    return "\n\n".join(rows)


def bundled_wikitext_test() -> str:
    """The WikiText-2 raw test file this package ships (decompressed, digest-checked)."""
    try:
        raw = gzip.decompress(resources.files("hfcompress.resources").joinpath(_BUNDLED_TEST).read_bytes())
    except (OSError, ModuleNotFoundError) as exc:
        raise CalibrationDataError(
            f"the bundled WikiText-2 test file is missing ({exc}); reinstall hfcompress"
        ) from exc
    if hashlib.sha256(raw).hexdigest() != _BUNDLED_TEST_SHA256:
        raise CalibrationDataError(
            f"the bundled WikiText-2 test file ({_BUNDLED_TEST}) does not match its recorded sha256; reinstall"
        )
    return raw.decode("utf-8")


def _wikitext(split: str) -> str:
    root = data_dir()
    if root is not None:
        path = root / "wikitext-2-raw" / f"wiki.{split}.raw"
        if path.is_file():
            return join_wikitext_rows(path.read_text(encoding="utf-8"))
    if split == "test":
        return join_wikitext_rows(bundled_wikitext_test())
    try:
        from datasets import load_dataset

        rows = load_dataset("wikitext", "wikitext-2-raw-v1", split=_HUB_SPLITS[split])["text"]
    except Exception as exc:  # offline, no cache: say where the data was looked for
        raise CalibrationDataError(
            f"WikiText-2 {split} not found locally (set {DATA_ENV} to a folder holding "
            f"wikitext-2-raw/wiki.{split}.raw) and the Hub dataset 'wikitext' could not be loaded: {exc}"
        ) from exc
    return "\n\n".join(rows)


def load_text(source: str | os.PathLike) -> str:
    """The text of a source (see the module docstring); a table's rows are joined with blank
    lines."""
    table = _table_file(source)
    if table is not None:
        rows = _table_rows(table)
        if isinstance(rows, ChatConversations):
            raise CalibrationDataError(
                f"{table} holds chat conversations, which only calibration renders (with the tokenizer's chat "
                "template); for perplexity pass text: a file, or a table with a 'text' column"
            )
        if isinstance(rows, torch.Tensor):
            raise CalibrationDataError(f"{table} holds token ids ('input_ids'); perplexity reads text: pass text")
        return "\n\n".join(rows)
    name = str(source)
    dataset, _, split = name.partition(":")
    if dataset in _WIKITEXT_NAMES and not Path(name).is_file():
        config, _, split = split.rpartition(":")
        if config not in ("", _WIKITEXT_CONFIG) or split not in _SPLITS:
            raise CalibrationDataError(
                f"{name!r}: WikiText-2 is named <dataset>[:{_WIKITEXT_CONFIG}]:<split> with a split of "
                f"{', '.join(_SPLITS)} (e.g. wikitext2:test, wikitext:validation)"
            )
        return _wikitext(_SPLITS[split])
    path = Path(name)
    try:
        is_file = path.is_file()
    except OSError:  # a name no file system takes (too long): the text itself, passed as a source
        is_file = False
    if not is_file and ("\n" in name or len(name) > 255):
        raise CalibrationDataError(
            f"the text source is a string of {len(name)} characters that names no file (text itself?); a string "
            "names a file or one of wikitext2:test, wikitext2:valid: pass text as a list of strings ([text])"
        )
    if not is_file:
        raise CalibrationDataError(f"text source {name!r} is neither a file nor one of wikitext2:test, wikitext2:valid")
    text = path.read_text(encoding="utf-8")
    return join_wikitext_rows(text) if path.name.startswith("wiki.") and path.suffix == ".raw" else text


class ChatConversations(list):
    """Chat conversations (each a list of ``{"role": ..., "content": ...}`` messages) as
    calibration data: :func:`calibration_ids` renders each with the tokenizer's chat template,
    so an instruct model calibrates on text laid out as it is prompted."""


_CHAT_COLUMNS = ("messages", "conversations")
_TABLE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}


def _table_file(source) -> Path | None:
    """``source`` as a path when it names an existing table file (by its extension)."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    path = Path(source)
    try:
        return path if path.suffix.lower() in _TABLE_BUILDERS and path.is_file() else None
    except OSError:  # a name no file system takes
        return None


def _table_rows(path: Path) -> list[str] | ChatConversations | torch.Tensor:
    """A table file's rows (see :func:`_dataset_source`), read as a ``datasets.Dataset`` (TSV
    without quote handling, as GLUE's files are)."""
    from datasets import load_dataset

    builder = _TABLE_BUILDERS[path.suffix.lower()]
    options = {"delimiter": "\t", "quoting": 3} if path.suffix.lower() == ".tsv" else {}
    try:
        table = load_dataset(builder, data_files=str(path), split="train", **options)
    except Exception as exc:  # the reader's own error, with the file and the format named
        raise CalibrationDataError(f"{path} could not be read as a {builder} table: {exc}") from exc
    return _dataset_source(table, what=str(path))


def _is_conversation(item) -> bool:
    return isinstance(item, (list, tuple)) and bool(item) and all(isinstance(m, Mapping) and "role" in m for m in item)


def _dataset_source(data, what: str = "a calibration Dataset") -> list[str] | ChatConversations | torch.Tensor:
    """The calibration rows of a ``datasets.Dataset`` (or a table read as one): its
    ``input_ids``, its ``text``, its chat ``messages``, or its only string column."""
    column_names = list(data.column_names)
    if "input_ids" in column_names:
        return _stacked_ids(data["input_ids"])
    if "text" in column_names:
        return [t for t in data["text"] if t]
    chat = next((c for c in _CHAT_COLUMNS if c in column_names), None)
    if chat is not None:
        return ChatConversations(data[chat])
    features = getattr(data, "features", None) or {}
    strings = [c for c in column_names if getattr(features.get(c), "dtype", None) in ("string", "large_string")]
    if len(strings) == 1:
        logger.info("calibrating on the %r column of %s (its only text column)", strings[0], what)
        return [t for t in data[strings[0]] if t]
    hint = (
        f"; it has {len(strings)} text columns ({', '.join(strings)}): name the one to use as 'text', e.g. "
        f"data.rename_column({strings[0]!r}, 'text')"
        if strings
        else ""
    )
    raise CalibrationDataError(
        f"{what} needs a 'text', 'input_ids' or chat 'messages' column; it has {column_names}{hint}"
    )


def read_calibration_source(source: str | os.PathLike) -> list[str] | ChatConversations | torch.Tensor:
    """A calibration source named on the command line, read now (to fail before a model loads):
    a table's rows (see :func:`_dataset_source`), any other source's text as a one-item list."""
    table = _table_file(source)
    return _table_rows(table) if table is not None else [load_text(source)]


def calibration_samples(
    tokenizer,
    source: str | os.PathLike | list[str],
    *,
    num_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
) -> torch.Tensor:
    """``[num_samples, seq_len]`` token windows drawn at random (seeded) from a text source.

    The default, 128 windows of 512 tokens of WikiText-2 validation, follows GPTQ's
    calibration setup (Frantar et al., 2022, section 5, with 2048-token windows there).
    """
    if num_samples < 1 or seq_len < 2:
        raise CalibrationDataError(f"num_samples={num_samples} and seq_len={seq_len} must be >= 1 and >= 2")
    text = "\n\n".join(source) if isinstance(source, list) else load_text(source)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() < seq_len + 1:
        raise CalibrationDataError(f"calibration text has {ids.numel()} tokens; seq_len={seq_len} needs more")
    if ids.numel() < num_samples * seq_len:
        logger.warning(
            "the calibration text has %d tokens, fewer than the %d windows x %d tokens drawn from it: the windows "
            "overlap, so calibration sees at most %d distinct tokens; give more text (such as wikitext2:valid) "
            "or fewer, shorter windows (num_calibration_samples, calibration_seq_len)",
            ids.numel(),
            num_samples,
            seq_len,
            ids.numel(),
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (num_samples,), generator=generator)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def _stacked_ids(samples) -> torch.Tensor:
    """Token-id samples (tensors or lists ``[T]`` or ``[n, T]``, or mappings holding
    ``input_ids`` and maybe ``attention_mask``) as one ``[num_samples, T]`` tensor; samples of
    different lengths, or with padding, are a :class:`CalibrationDataError`: calibration takes
    whole windows of one length."""
    rows = []
    for i, sample in enumerate(samples):
        mask = None
        if isinstance(sample, Mapping):
            if "input_ids" not in sample:
                raise CalibrationDataError(f"calibration sample {i} has no 'input_ids' (keys {sorted(sample)})")
            sample, mask = sample["input_ids"], sample.get("attention_mask")
        ids = torch.as_tensor(sample)
        if ids.dim() not in (1, 2):
            raise CalibrationDataError(
                f"calibration sample {i} must be [seq_len] or [n, seq_len], got {tuple(ids.shape)}"
            )
        if mask is not None and not bool(torch.as_tensor(mask).all()):
            raise CalibrationDataError(
                f"calibration sample {i} is padded (its attention_mask holds zeros); calibration takes unpadded "
                "windows of one length: tokenize without padding, or pass the text and let compress() cut windows"
            )
        rows.extend(ids.reshape(-1, ids.shape[-1]))
    lengths = sorted({len(r) for r in rows})
    if len(lengths) > 1:
        raise CalibrationDataError(
            f"calibration samples have different lengths ({lengths[0]} to {lengths[-1]} tokens); calibration takes "
            "windows of one length: cut them to one length, or pass the text and let compress() cut the windows "
            "(calibration_seq_len)"
        )
    return torch.stack(rows) if rows else torch.empty(0, 0, dtype=torch.long)


def _records(items) -> list[str] | ChatConversations | torch.Tensor:
    """Samples as mappings: tokenizer outputs (AutoGPTQ's "examples"), ``{"text": ...}`` rows,
    or ``{"messages": [...]}`` chat rows (all of one kind)."""
    keys = set.intersection(*(set(item) for item in items))
    if "input_ids" in keys:
        return _stacked_ids(items)
    if "text" in keys and all(isinstance(item["text"], str) for item in items):
        return [item["text"] for item in items if item["text"]]
    chat = next((c for c in _CHAT_COLUMNS if c in keys), None)
    if chat is not None:
        return ChatConversations(item[chat] for item in items)
    raise CalibrationDataError(
        f"calibration samples as mappings need 'input_ids', 'text' or chat 'messages' in every sample; the keys "
        f"every sample has are {sorted(keys)} (sample 0 has {sorted(items[0])})"
    )


def _as_text_or_ids(data) -> str | list[str] | torch.Tensor:
    """Normalise the accepted calibration inputs to a text source or a token tensor."""
    if isinstance(data, torch.Tensor):
        return data
    if isinstance(data, ChatConversations):
        return data
    if isinstance(data, (str, os.PathLike)):
        table = _table_file(data)
        return _table_rows(table) if table is not None else str(data)
    if isinstance(data, (list, tuple)) and all(isinstance(t, str) for t in data):
        return list(data)
    if isinstance(data, Mapping) and "input_ids" in data:  # a tokenizer's output (BatchEncoding)
        return _stacked_ids([data])
    if isinstance(data, (list, tuple)) and data and all(isinstance(t, Mapping) for t in data):
        return _records(data)
    if isinstance(data, (list, tuple)) and data and all(isinstance(t, (torch.Tensor, Mapping)) for t in data):
        return _stacked_ids(data)  # token tensors (or tensors and tokenizer outputs)
    if isinstance(data, (list, tuple)) and data and all(_is_conversation(t) for t in data):
        return ChatConversations(data)
    if (
        isinstance(data, (list, tuple))
        and data
        and all(isinstance(t, (list, tuple)) and t and all(isinstance(i, int) for i in t) for t in data)
    ):
        return _stacked_ids(data)  # token ids as lists (a tokenizer's input_ids without return_tensors)
    column_names = getattr(data, "column_names", None)  # a datasets.Dataset
    if isinstance(column_names, dict):  # a DatasetDict
        raise CalibrationDataError(
            f"calibration_data is a DatasetDict of splits {list(column_names)}: pass one split, e.g. "
            f"calibration_data=data[{next(iter(column_names), 'train')!r}]"
        )
    if column_names is not None:
        return _dataset_source(data)
    if isinstance(data, Iterable) and not isinstance(data, (Mapping, bytes)):
        # A torch DataLoader (batches of ids or tokenizer outputs) or another iterable of samples
        items = list(data)
        if items and all(isinstance(t, (str, torch.Tensor, Mapping)) or _is_conversation(t) for t in items):
            return _as_text_or_ids(items)
    raise CalibrationDataError(
        "calibration_data must be a list of strings, a text source (a text file, a .jsonl/.json/.csv/.tsv/.parquet "
        "table, 'wikitext2:valid'), a datasets.Dataset, chat conversations (lists of role/content messages), a "
        "[num_samples, seq_len] tensor of token ids, or a list of token-id tensors, id lists or tokenizer outputs of "
        "one length (or an iterable of these: a DataLoader, a generator); got "
        f"{type(data).__name__}"
    )


def reusable(data):
    """``data`` as something that can be read more than once: a one-shot iterator (a
    generator) as a list, anything else as it is (the checks and the calibration both read it)."""
    return list(data) if isinstance(data, Iterator) else data


def is_calibration_text(data) -> bool:
    """Whether ``data`` (any accepted calibration input) is text, which needs a tokenizer,
    rather than token ids; a :class:`CalibrationDataError` for an input that is neither."""
    return not isinstance(_as_text_or_ids(data), torch.Tensor)


def _render_chats(conversations: ChatConversations, tokenizer) -> list[str]:
    """Each conversation as the text its chat template lays out (special tokens included)."""
    if not getattr(tokenizer, "chat_template", None):
        raise CalibrationDataError(
            "the calibration data is chat conversations ('messages'), but the tokenizer has no chat template to "
            "lay them out with; pass text instead (a 'text' column, or the messages' contents as strings)"
        )
    texts = []
    for i, conversation in enumerate(conversations):
        if not _is_conversation(conversation):
            raise CalibrationDataError(
                f"calibration conversation {i} is not a list of {{'role': ..., 'content': ...}} messages: "
                f"{str(conversation)[:80]!r}"
            )
        texts.append(tokenizer.apply_chat_template(list(conversation), tokenize=False))
    return texts


def calibration_batches(data, tokenizer=None, *, batch_size: int = 8, **windows) -> list[dict[str, torch.Tensor]]:
    """Calibration data as model-ready batches ``{"input_ids": [B, seq_len]}``: the windows of
    :func:`calibration_ids` (``windows``: its keyword arguments), ``batch_size`` at a time."""
    return [{"input_ids": chunk} for chunk in calibration_ids(data, tokenizer, **windows).split(batch_size)]


def calibration_ids(
    data,
    tokenizer=None,
    *,
    num_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    vocab_size: int | None = None,
    max_length: int | None = None,
) -> torch.Tensor:
    """Calibration data as checked token windows ``[n, seq_len]`` (int64).

    Token tensors ``[n, T]`` are used as they are (all ``n`` rows); text (a list of strings, a
    file, ``wikitext2:valid``, a Dataset's ``text`` column) is tokenized and sampled by
    :func:`calibration_samples`, which needs ``tokenizer``. With ``vocab_size`` and
    ``max_length`` (the model's ``max_position_embeddings``), token ids outside the vocabulary
    and windows longer than the model takes are refused here, before any model runs.
    """
    source = _as_text_or_ids(data)
    if isinstance(source, torch.Tensor):
        if source.dim() not in (1, 2):
            raise CalibrationDataError(
                f"calibration token ids must be [num_samples, seq_len] (or one sample [seq_len]), got shape "
                f"{tuple(source.shape)}"
            )
        ids = source if source.dim() == 2 else source[None]
        if ids.dtype not in (torch.int64, torch.int32) or ids.numel() == 0:
            raise CalibrationDataError(
                f"calibration token ids must be a non-empty integer tensor, got {ids.dtype} {tuple(ids.shape)}"
            )
    else:
        if tokenizer is None:
            raise CalibrationDataError("text calibration data needs a tokenizer: pass tokenizer=... to compress()")
        if isinstance(source, ChatConversations):
            source = _render_chats(source, tokenizer)
        if max_length is not None and seq_len > max_length:
            raise CalibrationDataError(
                f"calibration windows of {seq_len} tokens exceed the model's max_position_embeddings={max_length}; "
                f"pass a calibration_seq_len (--calibration-seq-len) of at most {max_length}"
            )
        ids = calibration_samples(tokenizer, source, num_samples=num_samples, seq_len=seq_len, seed=seed)
    if vocab_size is not None and (int(ids.max()) >= vocab_size or int(ids.min()) < 0):
        bad = int(ids.max()) if int(ids.max()) >= vocab_size else int(ids.min())
        raise CalibrationDataError(
            f"calibration token id {bad} is outside the model's vocabulary (0..{vocab_size - 1}); the data was "
            "tokenized for another model: tokenize it with this model's tokenizer"
        )
    if max_length is not None and ids.shape[1] > max_length:
        raise CalibrationDataError(
            f"calibration sequences of {ids.shape[1]} tokens exceed the model's max_position_embeddings={max_length}; "
            f"cut them to at most {max_length} tokens"
        )
    return ids.long()
