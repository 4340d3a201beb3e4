"""Text classification data: task description, loading, tokenisation and batching.

Loading
    Splits come from local files (JSON lines ``.jsonl``, JSON ``.json`` holding either JSON lines or one
    array of objects, comma-separated ``.csv``, tab-separated ``.tsv``; CSV/TSV files need a header row)
    or, when the ``datasets`` package is installed and the network is reachable, from the Hugging Face
    hub.

Text fields
    When ``text_fields`` is not given, it is detected from the columns of the first row of the training
    split (or of the first split given when there is no training split). Sentence pairs are tried
    first, in this order: ``premise`` + ``hypothesis``, ``sentence1`` + ``sentence2``,
    ``question1`` + ``question2``, ``question`` + ``sentence``; then single texts: ``text``, then
    ``sentence``. The first candidate whose columns are all present wins.

Labels
    A label is an integer or a string. A string of decimal digits (such as ``"1"`` read from a CSV
    file) is read as that integer, so CSV and JSON files of one task agree; JSON booleans are read as
    0/1 and integral floats (``1.0``) as integers. Unless ``labels`` is given, the label list is the
    sorted set of labels in the training split, and label id ``i`` is ``labels[i]``. A label in another
    split that the training split does not have is an error.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from aptune.data.errors import DataError, DataFileNotFoundError

Label = int | str
"""A class label as it appears in the data: an integer or a string."""

SPLITS: tuple[str, ...] = ("train", "validation", "test")
"""The split names this module knows, in the order they are loaded."""

SUPPORTED_EXTENSIONS: tuple[str, ...] = (".jsonl", ".json", ".csv", ".tsv")
"""File name endings that :func:`load_split_files` can read."""

PAIR_TEXT_FIELDS: tuple[tuple[str, str], ...] = (
    ("premise", "hypothesis"),
    ("sentence1", "sentence2"),
    ("question1", "question2"),
    ("question", "sentence"),
)
"""Sentence-pair column names tried by :func:`detect_text_fields`, in order."""

SINGLE_TEXT_FIELDS: tuple[str, ...] = ("text", "sentence")
"""Single-text column names tried by :func:`detect_text_fields` after the pairs, in order."""

MODEL_INPUT_KEYS: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids")
"""Tokenizer outputs kept by :func:`encode_rows` (``token_type_ids`` only when the tokenizer gives it)."""

_INTEGER_STRING = re.compile(r"^[+-]?\d+$")
_HUB_NAME = re.compile(r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_.-]+)?(:[A-Za-z0-9_.-]+)?$")
_FILE_LIKE_SUFFIXES = (*SUPPORTED_EXTENSIONS, ".txt", ".parquet", ".arrow", ".gz", ".zip", ".bz2", ".xz")
_HUB_SPLIT_ALIASES: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "validation": ("validation", "validation_matched", "dev"),
    "test": ("test", "test_matched"),
}


# ----------------------------------------------------------------------------------------------------
# Task description
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextClassificationData:
    """Describes a text classification task: which columns hold the text(s) and label, and the labels.

    Attributes:
        text_fields: One column name for single-text tasks, two for sentence-pair tasks.
        labels: The class labels; label id ``i`` stands for ``labels[i]``. All integers or all strings,
            no repeats.
        label_field: The column holding the label.

    Raises:
        DataError: if any of the above does not hold.
    """

    text_fields: tuple[str, ...]
    labels: tuple[Label, ...]
    label_field: str = "label"

    def __post_init__(self) -> None:
        text_fields = (self.text_fields,) if isinstance(self.text_fields, str) else tuple(self.text_fields)
        labels = tuple(self.labels)
        object.__setattr__(self, "text_fields", text_fields)
        object.__setattr__(self, "labels", labels)

        if len(text_fields) not in (1, 2):
            raise DataError(
                f"text_fields must name one or two columns, got {len(text_fields)}: {text_fields!r}"
            )
        for name in (*text_fields, self.label_field):
            if not isinstance(name, str) or not name:
                raise DataError(f"column names must be non-empty strings, got {name!r}")
        if len(set(text_fields)) != len(text_fields):
            raise DataError(f"text_fields must be two different columns, got {text_fields!r}")
        if self.label_field in text_fields:
            raise DataError(f"label_field {self.label_field!r} is also a text field")
        if not labels:
            raise DataError("a classification task needs at least one label")
        for label in labels:
            if isinstance(label, bool) or not isinstance(label, int | str):
                raise DataError(f"labels must be integers or strings, got {label!r}")
        if len({type(label) for label in labels}) > 1:
            raise DataError(f"labels mix integers and strings: {_format_labels(labels)}")
        if len(set(labels)) != len(labels):
            raise DataError(f"labels repeat: {_format_labels(labels)}")

    @property
    def is_pair(self) -> bool:
        """True for sentence-pair tasks (two text fields)."""
        return len(self.text_fields) == 2

    @property
    def num_labels(self) -> int:
        """How many classes the task has."""
        return len(self.labels)

    @property
    def label2id(self) -> dict[Label, int]:
        """Maps each label to its id (its position in :attr:`labels`)."""
        return {label: index for index, label in enumerate(self.labels)}

    @property
    def id2label(self) -> dict[int, str]:
        """Maps each id to the label as a string, the form a Hugging Face model config expects."""
        return {index: str(label) for index, label in enumerate(self.labels)}

    def label_id(self, label: Label) -> int:
        """Returns the id of ``label``; raises :class:`DataError` naming the known labels if unknown."""
        try:
            return self.label2id[label]
        except KeyError:
            raise DataError(f"unknown label {label!r}; known labels: {_format_labels(self.labels)}") from None


@dataclass
class TextClassificationSplits:
    """Loaded splits of a text classification task.

    Attributes:
        task: The task description (text fields, label field, labels).
        splits: Split name (``"train"``, ``"validation"``, ``"test"``) to its rows. Each row is the
            record as read, with the label normalised (see the module docstring).
        sources: Split name to where it was read from (a file path or a hub name), for messages.
    """

    task: TextClassificationData
    splits: dict[str, list[dict[str, Any]]]
    sources: dict[str, str] = field(default_factory=dict)

    def __contains__(self, name: object) -> bool:
        return name in self.splits

    def __getitem__(self, name: str) -> list[dict[str, Any]]:
        """Returns the rows of split ``name``; raises :class:`DataError` if there is no such split."""
        if name not in self.splits:
            available = ", ".join(self.splits) or "none"
            raise DataError(f"no {name!r} split was loaded (available: {available})")
        return self.splits[name]

    def get(self, name: str) -> list[dict[str, Any]] | None:
        """Returns the rows of split ``name``, or None if it was not loaded."""
        return self.splits.get(name)


# ----------------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Record:
    """One raw row and where it came from (used in error messages)."""

    where: str
    values: dict[str, Any]


def _format_labels(labels: Iterable[Label]) -> str:
    return ", ".join(repr(label) for label in labels)


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataFileNotFoundError(f"data file not found: {path}")
    if path.is_dir():
        raise DataError(f"{path} is a directory, expected a data file ({', '.join(SUPPORTED_EXTENSIONS)})")
    if path.suffix.lower() not in SUPPORTED_EXTENSIONS:
        raise DataError(
            f"unsupported file extension {path.suffix or '(none)'!r} for {path}; "
            f"expected one of {', '.join(SUPPORTED_EXTENSIONS)}"
        )


def _read_json_lines(path: Path, text: str) -> Iterator[_Record]:
    # Split on "\n" only: str.splitlines() would also split on characters such as U+2028 that JSON
    # allows unescaped inside strings. A trailing "\r" is JSON whitespace.
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {line_number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(value, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(value).__name__}")
        yield _Record(where, value)


def _read_json_array(path: Path, text: str) -> Iterator[_Record]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}, line {exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})"
        ) from None
    for item_number, item in enumerate(value, start=1):
        where = f"{path}, item {item_number}"
        if not isinstance(item, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(item).__name__}")
        yield _Record(where, item)


def _read_delimited(path: Path, text: str, delimiter: str) -> Iterator[_Record]:
    # csv skips blank lines; an empty cell counts as a missing value (None), like a short row.
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        for row in reader:
            values = {key: (value if value != "" else None) for key, value in row.items() if key is not None}
            yield _Record(f"{path}, line {reader.line_num}", values)
    except csv.Error as exc:
        raise DataError(f"{path}, line {reader.line_num}: malformed CSV ({exc})") from None


def _read_records(path: Path) -> list[_Record]:
    """Reads every row of a data file; raises :class:`DataError` on a bad or empty file."""
    _check_file(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 text (byte {exc.start})") from None
    suffix = path.suffix.lower()
    if suffix == ".csv":
        records = list(_read_delimited(path, text, ","))
    elif suffix == ".tsv":
        records = list(_read_delimited(path, text, "\t"))
    elif suffix == ".json" and text.lstrip().startswith("["):
        records = list(_read_json_array(path, text))
    else:
        records = list(_read_json_lines(path, text))
    if not records:
        raise DataError(f"{path} is empty (no data rows)")
    return records


# ----------------------------------------------------------------------------------------------------
# Fields and labels
# ----------------------------------------------------------------------------------------------------


def detect_text_fields(columns: Iterable[str], *, source: str = "the data") -> tuple[str, ...]:
    """Picks the text column(s) from the column names of a row.

    Pairs are tried first (``premise``/``hypothesis``, ``sentence1``/``sentence2``,
    ``question1``/``question2``, ``question``/``sentence``), then single texts (``text``, ``sentence``).

    Args:
        columns: The column names present.
        source: Where the columns come from, used in the error message.

    Returns:
        One column name, or two for a sentence pair.

    Raises:
        DataError: if no candidate matches.
    """
    present = set(columns)
    for pair in PAIR_TEXT_FIELDS:
        if set(pair) <= present:
            return pair
    for name in SINGLE_TEXT_FIELDS:
        if name in present:
            return (name,)
    raise DataError(
        f"cannot tell which column holds the text in {source} (columns: {', '.join(sorted(present))}); "
        f"pass text_fields explicitly"
    )


def _normalise_label(value: Any, where: str, label_field: str) -> Label:
    """Turns a raw label into an int or a str (see the module docstring for the rules)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        stripped = value.strip()
        if _INTEGER_STRING.match(stripped):
            return int(stripped)
        if stripped:
            return value
    raise DataError(f"{where}: field {label_field!r} must be an integer or a non-empty string, got {value!r}")


def _check_record(record: _Record, text_fields: Sequence[str], label_field: str) -> dict[str, Any]:
    """Checks that a record has its text and label fields; returns a copy with the label normalised."""
    values = record.values
    for name in (*text_fields, label_field):
        if values.get(name) is None:
            present = ", ".join(values) or "none"
            raise DataError(f"{record.where}: missing field {name!r} (fields present: {present})")
    for name in text_fields:
        if not isinstance(values[name], str):
            raise DataError(
                f"{record.where}: field {name!r} must be a string, got {type(values[name]).__name__}"
            )
    row = dict(values)
    row[label_field] = _normalise_label(values[label_field], record.where, label_field)
    return row


def _sorted_labels(labels: set[Label], source: str) -> tuple[Label, ...]:
    kinds = {type(label) for label in labels}
    if len(kinds) > 1:
        example_int = min(label for label in labels if isinstance(label, int))
        example_str = min(label for label in labels if isinstance(label, str))
        raise DataError(
            f"labels in {source} mix integers and strings (e.g. {example_int!r} and {example_str!r})"
        )
    return tuple(sorted(labels))  # type: ignore[type-var]


def _build_splits(
    records: Mapping[str, list[_Record]],
    sources: Mapping[str, str],
    *,
    text_fields: Sequence[str] | str | None,
    label_field: str,
    labels: Sequence[Label] | None,
) -> TextClassificationSplits:
    """Validates raw records of each split and builds the task and its splits."""
    if not records:
        raise DataError("no data given: pass at least a training file")
    first_split = "train" if "train" in records else next(iter(records))
    if text_fields is None:
        text_fields = detect_text_fields(records[first_split][0].values, source=sources[first_split])
    elif isinstance(text_fields, str):
        text_fields = (text_fields,)
    text_fields = tuple(text_fields)

    rows: dict[str, list[dict[str, Any]]] = {
        name: [_check_record(record, text_fields, label_field) for record in split_records]
        for name, split_records in records.items()
    }

    explicit_labels = labels is not None
    if labels is None:
        if "train" not in rows:
            raise DataError("cannot build the label list without a training split; pass labels explicitly")
        labels = _sorted_labels({row[label_field] for row in rows["train"]}, sources["train"])
        checked_splits = [name for name in rows if name != "train"]
    else:
        labels = tuple(_normalise_label(label, "labels", "labels") for label in labels)
        checked_splits = list(rows)
    task = TextClassificationData(text_fields=text_fields, labels=tuple(labels), label_field=label_field)

    known = set(task.labels)
    origin = "the given labels" if explicit_labels else "the training split"
    for name in checked_splits:
        for record, row in zip(records[name], rows[name], strict=True):
            if row[label_field] not in known:
                raise DataError(
                    f"{record.where}: unknown label {row[label_field]!r} (not in {origin}; "
                    f"known labels: {_format_labels(task.labels)})"
                )
    return TextClassificationSplits(task=task, splits=rows, sources=dict(sources))


# ----------------------------------------------------------------------------------------------------
# Loading: local files, directories, hub names
# ----------------------------------------------------------------------------------------------------


def load_split_files(
    train: str | os.PathLike[str] | None = None,
    validation: str | os.PathLike[str] | None = None,
    test: str | os.PathLike[str] | None = None,
    *,
    text_fields: Sequence[str] | str | None = None,
    label_field: str = "label",
    labels: Sequence[Label] | None = None,
) -> TextClassificationSplits:
    """Loads a text classification task from local files, one per split.

    Args:
        train: Training file (``.jsonl``, ``.json``, ``.csv`` or ``.tsv``). Needed unless ``labels`` is
            given.
        validation: Optional validation file.
        test: Optional test file.
        text_fields: The text column(s); detected when None (see :func:`detect_text_fields`).
        label_field: The label column.
        labels: The label list; when None, the sorted labels of the training split.

    Returns:
        The task and its rows, split by split.

    Raises:
        DataFileNotFoundError: if a file does not exist.
        DataError: for an unsupported extension, an empty file, a row without a needed field, or a
            label that the training split (or ``labels``) does not have.
    """
    paths = {
        name: Path(path)
        for name, path in zip(SPLITS, (train, validation, test), strict=True)
        if path is not None
    }
    records = {name: _read_records(path) for name, path in paths.items()}
    sources = {name: str(path) for name, path in paths.items()}
    return _build_splits(records, sources, text_fields=text_fields, label_field=label_field, labels=labels)


def find_split_files(directory: str | os.PathLike[str]) -> dict[str, Path]:
    """Finds ``train``, ``validation`` (or ``dev``) and ``test`` files in a directory.

    Each file is named after its split with a supported extension, e.g. ``train.jsonl``. A training
    file is required.

    Raises:
        DataFileNotFoundError: if the directory does not exist or holds no training file.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DataFileNotFoundError(f"data directory not found: {directory}")
    found: dict[str, Path] = {}
    stems = {"train": ("train",), "validation": ("validation", "dev"), "test": ("test",)}
    for split, names in stems.items():
        for name in names:
            candidates = [directory / f"{name}{ext}" for ext in SUPPORTED_EXTENSIONS]
            existing = [path for path in candidates if path.is_file()]
            if existing:
                found[split] = existing[0]
                break
    if "train" not in found:
        raise DataFileNotFoundError(
            f"no training file in {directory} (expected train{{{','.join(SUPPORTED_EXTENSIONS)}}})"
        )
    return found


def looks_like_hub_name(name: str) -> bool:
    """True if ``name`` reads as a Hugging Face hub data set name rather than a local path.

    Accepted forms: ``name``, ``owner/name`` or ``dataset/config`` (e.g. ``glue/sst2``), each optionally
    followed by ``:config``. The first part has no dot, and a name ending like a data file (``.jsonl``,
    ``.csv``, ``.txt``, ...) is taken as a path.
    """
    if not _HUB_NAME.match(name):
        return False
    base = name.split(":", 1)[0]
    return not base.lower().endswith(_FILE_LIKE_SUFFIXES)


def _hub_error(name: str) -> DataError:
    return DataError(
        f"could not load '{name}' from the Hugging Face hub (no network?); "
        f"pass local files with --train/--validation/--test"
    )


def _hub_candidates(name: str) -> list[tuple[str, str | None]]:
    """The ``(path, config)`` pairs to try for a hub name, in order."""
    if ":" in name:
        path, config = name.split(":", 1)
        return [(path, config)]
    candidates: list[tuple[str, str | None]] = [(name, None)]
    if "/" in name:
        path, config = name.split("/", 1)
        candidates.append((path, config))
    return candidates


def load_hub_dataset(
    name: str,
    *,
    text_fields: Sequence[str] | str | None = None,
    label_field: str = "label",
    labels: Sequence[Label] | None = None,
) -> TextClassificationSplits:
    """Loads a text classification task from the Hugging Face hub with the optional ``datasets`` package.

    ``name`` is tried as a data set name first; ``a/b`` is then tried as data set ``a`` with config ``b``
    (``glue/sst2``), and ``a:b`` always means data set ``a`` with config ``b``. Splits called
    ``validation_matched``/``dev`` and ``test_matched`` are used when ``validation``/``test`` are missing,
    and a split whose labels are all -1 (hidden test labels, as in GLUE) is dropped.

    Raises:
        DataError: "could not load '<name>' from the Hugging Face hub (no network?); ..." when
            ``datasets`` is not installed or loading fails (the original error is the ``__cause__``);
            otherwise as :func:`load_split_files` for bad rows.
    """
    try:
        import datasets  # optional dependency
    except ImportError as exc:
        raise _hub_error(name) from exc

    loaded: Any = None
    last_error: Exception | None = None
    for path, config in _hub_candidates(name):
        try:
            loaded = datasets.load_dataset(path, config) if config else datasets.load_dataset(path)
            break
        except Exception as exc:  # no network, unknown name, ...: all end in the same clear message
            last_error = exc
    if loaded is None:
        raise _hub_error(name) from last_error

    records: dict[str, list[_Record]] = {}
    sources: dict[str, str] = {}
    for split, aliases in _HUB_SPLIT_ALIASES.items():
        hub_split = next((alias for alias in aliases if alias in loaded), None)
        if hub_split is None:
            continue
        where = f"{name} [{hub_split}]"
        split_records = [
            _Record(f"{where}, row {index}", dict(values))
            for index, values in enumerate(loaded[hub_split], start=1)
        ]
        if not split_records or all(record.values.get(label_field) == -1 for record in split_records):
            continue
        records[split] = split_records
        sources[split] = where
    if "train" not in records and labels is None:
        raise DataError(f"'{name}' has no usable training split; pass labels explicitly or local files")
    return _build_splits(records, sources, text_fields=text_fields, label_field=label_field, labels=labels)


def load_text_classification(
    source: str | os.PathLike[str] | None = None,
    *,
    train: str | os.PathLike[str] | None = None,
    validation: str | os.PathLike[str] | None = None,
    test: str | os.PathLike[str] | None = None,
    text_fields: Sequence[str] | str | None = None,
    label_field: str = "label",
    labels: Sequence[Label] | None = None,
) -> TextClassificationSplits:
    """Loads a text classification task from whatever the user named.

    Either ``source`` or the split files (``train``/``validation``/``test``) are given, not both.
    ``source`` is resolved in this order:

    1. ``"rt-polarity"``: the project's demo data, found or rebuilt by
       :func:`aptune.data.rt_polarity.rt_polarity_files`.
    2. An existing directory: its ``train``/``validation``/``test`` files (:func:`find_split_files`).
    3. An existing file: loaded as the training split.
    4. A name that :func:`looks_like_hub_name`: loaded with :func:`load_hub_dataset`.
    5. Anything else: :class:`DataFileNotFoundError`.

    Other arguments are as in :func:`load_split_files`.
    """
    options: dict[str, Any] = {"text_fields": text_fields, "label_field": label_field, "labels": labels}
    if source is None:
        if train is None and validation is None and test is None:
            raise DataError("no data given: name a data set or pass --train/--validation/--test files")
        return load_split_files(train, validation, test, **options)
    if train is not None or validation is not None or test is not None:
        raise DataError("give either a data set name or split files (--train/--validation/--test), not both")

    name = os.fspath(source)
    path = Path(name).expanduser()
    if name == "rt-polarity" and not path.exists():
        from aptune.data.rt_polarity import rt_polarity_files

        files = rt_polarity_files()
        return load_split_files(files.train, files.validation, files.test, **options)
    if path.is_dir():
        return load_split_files(**find_split_files(path), **options)
    if path.exists():
        return load_split_files(path, **options)
    if looks_like_hub_name(name):
        return load_hub_dataset(name, **options)
    raise DataFileNotFoundError(f"data file not found: {name}")


# ----------------------------------------------------------------------------------------------------
# Tokenisation and batching
# ----------------------------------------------------------------------------------------------------


def resolve_pad_token_id(tokenizer: Any) -> int:
    """The id used to pad ``input_ids``: the tokenizer's pad token, else its end-of-sequence token, else 0."""
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(candidate, int):
            return candidate
    return 0


@dataclass(frozen=True)
class PaddingCollator:
    """Pads a list of encoded examples to the longest one in the batch and stacks them into tensors.

    ``input_ids`` are padded with ``pad_token_id``; ``attention_mask`` and ``token_type_ids`` with 0.
    ``labels`` become a ``torch.long`` tensor of shape ``(batch,)``.

    Attributes:
        pad_token_id: Padding id for ``input_ids``.
        padding_side: ``"right"`` (pad after the tokens) or ``"left"``.
        pad_to_multiple_of: If set, the padded length is rounded up to a multiple of it (GPU-friendly).
    """

    pad_token_id: int = 0
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {self.padding_side!r}")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be positive, got {self.pad_to_multiple_of}")

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, pad_to_multiple_of: int | None = None) -> PaddingCollator:
        """A collator with the tokenizer's padding id and padding side."""
        return cls(
            pad_token_id=resolve_pad_token_id(tokenizer),
            padding_side=getattr(tokenizer, "padding_side", "right") or "right",
            pad_to_multiple_of=pad_to_multiple_of,
        )

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        length = max(len(example["input_ids"]) for example in examples)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch: dict[str, torch.Tensor] = {}
        for key in MODEL_INPUT_KEYS:
            if key not in examples[0]:
                continue
            pad_value = self.pad_token_id if key == "input_ids" else 0
            rows = []
            for example in examples:
                values = list(example[key])
                padding = [pad_value] * (length - len(values))
                rows.append(values + padding if self.padding_side == "right" else padding + values)
            batch[key] = torch.tensor(rows, dtype=torch.long)
        if "labels" in examples[0]:
            batch["labels"] = torch.tensor([int(example["labels"]) for example in examples], dtype=torch.long)
        return batch


class EncodedDataset(Dataset):
    """Tokenised examples, unpadded; index it to get one example as a dict of int lists plus ``labels``.

    Attributes:
        examples: The encoded examples.
        collator: The :class:`PaddingCollator` matching the tokenizer that encoded them.
    """

    def __init__(self, examples: list[dict[str, Any]], collator: PaddingCollator | None = None) -> None:
        self.examples = examples
        self.collator = collator or PaddingCollator()

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.examples[index]


def encode_rows(
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    task: TextClassificationData,
    max_length: int = 128,
) -> EncodedDataset:
    """Tokenises rows of a task, truncating to ``max_length`` tokens without padding.

    Sentence pairs are encoded as pairs (``tokenizer(first, second)``, truncating the longer text
    first), so BERT-style tokenizers add ``[SEP]`` between them and set ``token_type_ids``.

    Args:
        tokenizer: Any Hugging Face ``PreTrainedTokenizerBase``.
        rows: Rows from :class:`TextClassificationSplits` (each has the task's text and label fields).
        task: The task the rows belong to; gives the text fields and the label ids.
        max_length: Longest encoded length, special tokens included.

    Returns:
        An :class:`EncodedDataset` whose examples hold ``input_ids``, ``attention_mask``,
        ``token_type_ids`` (when the tokenizer returns them) and ``labels`` (the label id).
    """
    if not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
    collator = PaddingCollator.from_tokenizer(tokenizer)
    if not rows:
        return EncodedDataset([], collator)
    texts = [[row[name] for row in rows] for name in task.text_fields]
    encoded = tokenizer(*texts, truncation=True, max_length=max_length, return_attention_mask=True)
    keys = [key for key in MODEL_INPUT_KEYS if key in encoded]
    label2id = task.label2id
    examples = []
    for index, row in enumerate(rows):
        example: dict[str, Any] = {key: list(encoded[key][index]) for key in keys}
        label = row[task.label_field]
        example["labels"] = label2id[label] if label in label2id else task.label_id(label)
        examples.append(example)
    return EncodedDataset(examples, collator)


def encode_splits(
    tokenizer: Any, data: TextClassificationSplits, max_length: int = 128
) -> dict[str, EncodedDataset]:
    """Runs :func:`encode_rows` on every loaded split; returns split name to encoded data set."""
    return {name: encode_rows(tokenizer, rows, data.task, max_length) for name, rows in data.splits.items()}


def make_dataloader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int | None = 0,
    collate_fn: Any = None,
    drop_last: bool = False,
    num_workers: int = 0,
) -> DataLoader:
    """Builds a DataLoader that pads each batch dynamically.

    Args:
        dataset: Usually an :class:`EncodedDataset`.
        batch_size: Examples per batch.
        shuffle: Shuffle the order every epoch.
        seed: Seeds the loader's own ``torch.Generator``, so the same seed gives the same order of
            batches, epoch after epoch, independent of the global random state. None uses the global
            random state.
        collate_fn: Defaults to the data set's ``collator`` (an :class:`EncodedDataset`'s matches its
            tokenizer), else a right-padding :class:`PaddingCollator` with pad id 0.
        drop_last: Drop the last, smaller batch.
        num_workers: Worker processes for loading (0 loads in the main process).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if collate_fn is None:
        collate_fn = getattr(dataset, "collator", None) or PaddingCollator()
    generator = None
    if seed is not None:
        generator = torch.Generator()
        generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=collate_fn,
        drop_last=drop_last,
        num_workers=num_workers,
        generator=generator,
    )
