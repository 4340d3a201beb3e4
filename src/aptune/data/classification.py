"""Text classification data: task description, loading, tokenisation and batching.

Loading
    Splits come from local files, read with Hugging Face ``datasets`` (JSON lines ``.jsonl``, JSON
    ``.json`` holding either JSON lines or one array of objects, comma-separated ``.csv``, tab-separated
    ``.tsv``, ``.parquet``; CSV/TSV files need a header row and their cells are read as text, an empty
    cell counting as a missing value), or, when the network is reachable, from the Hugging Face hub.
    Local files are read afresh on every load, through a throw-away cache, so an edited file is never
    served from a stale copy.

Text fields
    When ``text_fields`` is not given, it is detected from the columns of the training split (or of
    the first split given when there is no training split). Sentence pairs are tried first, in this
    order: ``premise`` + ``hypothesis``, ``sentence1`` + ``sentence2``, ``question1`` + ``question2``,
    ``question`` + ``sentence``; then single texts: ``text``, then ``sentence``. The first candidate
    whose columns are all present wins.

Labels
    A label is an integer or a string. A string of decimal digits (such as ``"1"`` read from a CSV
    file) is read as that integer, so CSV and JSON files of one task agree; JSON booleans are read as
    0/1 and integral floats (``1.0``) as integers. Unless ``labels`` is given, the label list is the
    sorted set of labels in the training split, and label id ``i`` is ``labels[i]``. A label in another
    split that the training split does not have is an error.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from transformers import DataCollatorWithPadding

from aptune.data.errors import DataError, DataFileNotFoundError

Label = int | str
"""A class label as it appears in the data: an integer or a string."""

SPLITS: tuple[str, ...] = ("train", "validation", "test")
"""The split names this module knows, in the order they are loaded."""

SUPPORTED_EXTENSIONS: tuple[str, ...] = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
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
_FILE_LIKE_SUFFIXES = (*SUPPORTED_EXTENSIONS, ".txt", ".arrow", ".gz", ".zip", ".bz2", ".xz")
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
        splits: Split name (``"train"``, ``"validation"``, ``"test"``) to its rows. Each row holds every
            column of its split as read (None where the row has no value), with the label normalised
            (see the module docstring).
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
class _Split:
    """The rows of one split, where they came from (a hub name or a file) and, for a file, its path."""

    source: str
    rows: list[dict[str, Any]]
    path: Path | None = None

    def where(self, index: int) -> str:
        """Names row ``index`` (0-based) in messages."""
        return _row_location(self.path, index) if self.path else f"{self.source}, row {index + 1}"


def _format_labels(labels: Iterable[Label]) -> str:
    return ", ".join(repr(label) for label in labels)


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[Any]:
    """Gives the ``datasets`` module with its progress bars and log messages off, then restores both."""
    import datasets

    bars, verbosity = datasets.is_progress_bar_enabled(), datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield datasets
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


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


def _read_file(path: Path) -> list[dict[str, Any]]:
    """Reads every row of a data file with ``datasets``; raises :class:`DataError` on a bad or empty file."""
    _check_file(path)
    suffix = path.suffix.lower()
    try:
        with path.open("rb") as file:
            if suffix == ".jsonl" and file.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
                raise ValueError("a JSON array in a JSON lines file")  # datasets would read it as an array
        with _quiet_datasets() as datasets, tempfile.TemporaryDirectory(prefix="aptune-data-") as cache:
            builder = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv"}.get(suffix, "json")
            options = _csv_options(path, datasets) if builder == "csv" else {}
            # a throw-away cache, so that a file edited since the last load is always read afresh
            loaded = datasets.load_dataset(
                builder, data_files=str(path), split="train", cache_dir=cache, keep_in_memory=True, **options
            )
            rows = list(loaded)
    except Exception as exc:  # datasets, pandas and pyarrow raise many kinds; the user gets one line
        raise _unreadable(path, exc) from None
    if not rows:
        raise DataError(f"{path} is empty (no data rows)")
    return rows


def _csv_options(path: Path, datasets: Any) -> dict[str, Any]:
    """Options for ``load_dataset("csv")`` that keep every cell as the text written, an empty one missing."""
    import pandas

    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    columns = pandas.read_csv(path, sep=delimiter, index_col=False, nrows=0).columns
    return {
        "delimiter": delimiter,
        "features": datasets.Features({name: datasets.Value("string") for name in columns}),
        "keep_default_na": False,  # "NA", "null", "None", ... are text like any other
        "na_values": [""],
        "index_col": False,  # surplus cells in a row are never taken for row labels
    }


def _unreadable(path: Path, error: Exception) -> DataError:
    """The one-line error for a file that could not be loaded, naming the line at fault when it can."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet

        with contextlib.suppress(Exception):
            if pyarrow.parquet.read_metadata(path).num_rows == 0:
                return DataError(f"{path} is empty (no data rows)")
    else:
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as exc:
            return DataError(f"{path}: not valid UTF-8 text (byte {exc.start})")
        except OSError as exc:
            return DataError(f"{path}: cannot read the file ({exc.strerror or exc})")
        if not text.strip() or (suffix in (".csv", ".tsv") and len(text.strip().splitlines()) < 2):
            return DataError(f"{path} is empty (no data rows)")
        if suffix in (".json", ".jsonl") and (problem := _json_problem(path, text)):
            return DataError(problem)
    cause = error.__cause__ or error
    reason = str(cause).strip().splitlines()[0] if str(cause).strip() else "no details"
    return DataError(f"{path}: cannot read the file ({type(cause).__name__}: {reason})")


def _json_problem(path: Path, text: str) -> str | None:
    """The first fault in the text of a JSON file, as ``"<file>, line N: ..."``; None if none is found."""
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            return f"{path}, line {exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})"
        for number, item in enumerate(items, start=1):
            if not isinstance(item, dict):
                return f"{path}, item {number}: expected a JSON object, got {type(item).__name__}"
        return None
    for number, line in _numbered_lines(text):
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            return f"{path}, line {number}: invalid JSON ({exc.msg} at column {exc.colno})"
        if not isinstance(value, dict):
            return f"{path}, line {number}: expected a JSON object, got {type(value).__name__}"
    return None


def _numbered_lines(text: str) -> list[tuple[int, str]]:
    """The non-blank lines of a JSON lines text with their line numbers.

    Split on "\\n" only: str.splitlines() would also split on characters such as U+2028 that JSON allows
    unescaped inside strings. A trailing "\\r" is JSON whitespace.
    """
    return [(number, line) for number, line in enumerate(text.split("\n"), start=1) if line.strip()]


def _row_location(path: Path, index: int) -> str:
    """Names row ``index`` (0-based) of a data file as an editor counts: the line a JSON line is on or a
    CSV row ends on (a quoted cell may span lines), the item number in a JSON array, the row in Parquet."""
    suffix = path.suffix.lower()
    text = "" if suffix == ".parquet" else path.read_text(encoding="utf-8-sig")
    if suffix == ".json" and text.lstrip().startswith("["):
        return f"{path}, item {index + 1}"
    lines: list[int] = []
    if suffix in (".csv", ".tsv"):
        reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",")
        with contextlib.suppress(csv.Error):  # pandas read it; fall back to the row number if csv cannot
            lines = [reader.line_num for record in reader if record][1:]  # not the header nor blank lines
    elif suffix != ".parquet":
        lines = [number for number, _ in _numbered_lines(text)]
    return f"{path}, line {lines[index]}" if index < len(lines) else f"{path}, row {index + 1}"


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


def _normalise_label(value: Any) -> Label | None:
    """Turns a raw label into an int or a str (see the module docstring); None if it cannot be a label."""
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
    return None


def _check_row(split: _Split, index: int, text_fields: Sequence[str], label_field: str) -> None:
    """Checks that a row has its text and label fields, and normalises its label in place."""
    row = split.rows[index]
    for name in (*text_fields, label_field):
        if row.get(name) is None:
            present = ", ".join(key for key, value in row.items() if value is not None) or "none"
            raise DataError(f"{split.where(index)}: missing field {name!r} (fields present: {present})")
    for name in text_fields:
        if not isinstance(row[name], str):
            raise DataError(
                f"{split.where(index)}: field {name!r} must be a string, got {type(row[name]).__name__}"
            )
    label = _normalise_label(row[label_field])
    if label is None:
        raise DataError(
            f"{split.where(index)}: field {label_field!r} must be an integer or a non-empty string, "
            f"got {row[label_field]!r}"
        )
    row[label_field] = label


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
    splits: Mapping[str, _Split],
    *,
    text_fields: Sequence[str] | str | None,
    label_field: str,
    labels: Sequence[Label] | None,
) -> TextClassificationSplits:
    """Validates the rows of each split and builds the task and its splits."""
    if not splits:
        raise DataError("no data given: pass at least a training file")
    first = splits["train"] if "train" in splits else next(iter(splits.values()))
    if text_fields is None:
        text_fields = detect_text_fields(first.rows[0], source=first.source)
    elif isinstance(text_fields, str):
        text_fields = (text_fields,)
    text_fields = tuple(text_fields)

    for split in splits.values():
        for index in range(len(split.rows)):
            _check_row(split, index, text_fields, label_field)

    explicit_labels = labels is not None
    if labels is None:
        if "train" not in splits:
            raise DataError("cannot build the label list without a training split; pass labels explicitly")
        labels = _sorted_labels({row[label_field] for row in splits["train"].rows}, splits["train"].source)
        checked_splits = [name for name in splits if name != "train"]
    else:
        normalised = [_normalise_label(label) for label in labels]
        if None in normalised:
            bad = labels[normalised.index(None)]
            raise DataError(f"labels must be integers or non-empty strings, got {bad!r}")
        labels = tuple(normalised)  # type: ignore[arg-type]
        checked_splits = list(splits)
    task = TextClassificationData(text_fields=text_fields, labels=tuple(labels), label_field=label_field)

    known = set(task.labels)
    origin = "the given labels" if explicit_labels else "the training split"
    for name in checked_splits:
        split = splits[name]
        for index, row in enumerate(split.rows):
            if row[label_field] not in known:
                raise DataError(
                    f"{split.where(index)}: unknown label {row[label_field]!r} (not in {origin}; "
                    f"known labels: {_format_labels(task.labels)})"
                )
    return TextClassificationSplits(
        task=task,
        splits={name: split.rows for name, split in splits.items()},
        sources={name: split.source for name, split in splits.items()},
    )


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
        train: Training file (``.jsonl``, ``.json``, ``.csv``, ``.tsv`` or ``.parquet``). Needed unless
            ``labels`` is given.
        validation: Optional validation file.
        test: Optional test file.
        text_fields: The text column(s); detected when None (see :func:`detect_text_fields`).
        label_field: The label column.
        labels: The label list; when None, the sorted labels of the training split.

    Returns:
        The task and its rows, split by split.

    Raises:
        DataFileNotFoundError: if a file does not exist.
        DataError: for an unsupported extension, an unreadable or empty file, a row without a needed
            field, or a label that the training split (or ``labels``) does not have.
    """
    paths = {
        name: Path(path)
        for name, path in zip(SPLITS, (train, validation, test), strict=True)
        if path is not None
    }
    splits = {name: _Split(str(path), _read_file(path), path) for name, path in paths.items()}
    return _build_splits(splits, text_fields=text_fields, label_field=label_field, labels=labels)


def find_split_files(
    directory: str | os.PathLike[str], extensions: Sequence[str] = SUPPORTED_EXTENSIONS
) -> dict[str, Path]:
    """Finds ``train``, ``validation`` (or ``dev``) and ``test`` files in a directory.

    Each file is named after its split with one of ``extensions``, e.g. ``train.jsonl``; the first
    extension found wins. A training file is required.

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
            candidates = [directory / f"{name}{ext}" for ext in extensions]
            existing = [path for path in candidates if path.is_file()]
            if existing:
                found[split] = existing[0]
                break
    if "train" not in found:
        raise DataFileNotFoundError(
            f"no training file in {directory} (expected train{{{','.join(extensions)}}})"
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


def load_hub_splits(name: str) -> Any:
    """``datasets.load_dataset`` of a hub name, trying each reading of ``name`` (:func:`_hub_candidates`).

    Raises:
        DataError: "could not load '<name>' from the Hugging Face hub (no network?); ..." when ``datasets``
            cannot be imported or every reading fails (the last error is the ``__cause__``).
    """
    try:
        import datasets
    except ImportError as exc:
        raise _hub_error(name) from exc
    last_error: Exception | None = None
    for path, config in _hub_candidates(name):
        try:
            return datasets.load_dataset(path, config) if config else datasets.load_dataset(path)
        except Exception as exc:  # no network, unknown name, ...: all end in the same clear message
            last_error = exc
    raise _hub_error(name) from last_error


def load_hub_dataset(
    name: str,
    *,
    text_fields: Sequence[str] | str | None = None,
    label_field: str = "label",
    labels: Sequence[Label] | None = None,
) -> TextClassificationSplits:
    """Loads a text classification task from the Hugging Face hub with ``datasets.load_dataset``.

    ``name`` is tried as a data set name first; ``a/b`` is then tried as data set ``a`` with config ``b``
    (``glue/sst2``), and ``a:b`` always means data set ``a`` with config ``b``. Splits called
    ``validation_matched``/``dev`` and ``test_matched`` are used when ``validation``/``test`` are missing,
    and a split whose labels are all -1 (hidden test labels, as in GLUE) is dropped.

    Raises:
        DataError: "could not load '<name>' from the Hugging Face hub (no network?); ..." when
            ``datasets`` cannot be imported or loading fails (the original error is the ``__cause__``);
            otherwise as :func:`load_split_files` for bad rows.
    """
    loaded = load_hub_splits(name)
    splits: dict[str, _Split] = {}
    for split, aliases in _HUB_SPLIT_ALIASES.items():
        hub_split = next((alias for alias in aliases if alias in loaded), None)
        if hub_split is None:
            continue
        rows = [dict(values) for values in loaded[hub_split]]
        if rows and any(row.get(label_field) != -1 for row in rows):
            splits[split] = _Split(f"{name} [{hub_split}]", rows)
    if "train" not in splits and labels is None:
        raise DataError(f"'{name}' has no usable training split; pass labels explicitly or local files")
    return _build_splits(splits, text_fields=text_fields, label_field=label_field, labels=labels)


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

    Given a ``tokenizer`` (as :meth:`from_tokenizer` does when the tokenizer has a padding token), this
    is transformers' ``DataCollatorWithPadding``: the tokenizer pads. Otherwise (no tokenizer, or one
    without a padding token, such as GPT-2's or LLaMA's), ``input_ids`` are padded with ``pad_token_id``
    and ``attention_mask`` and ``token_type_ids`` with 0. Either way all values are ``torch.long``
    tensors and ``labels`` has shape ``(batch,)``.

    Attributes:
        pad_token_id: Padding id for ``input_ids``.
        padding_side: ``"right"`` (pad after the tokens) or ``"left"``.
        pad_to_multiple_of: If set, the padded length is rounded up to a multiple of it (GPU-friendly).
        tokenizer: The tokenizer that pads, or None; it takes no part in comparing collators.
    """

    pad_token_id: int = 0
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None
    tokenizer: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {self.padding_side!r}")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be positive, got {self.pad_to_multiple_of}")

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, pad_to_multiple_of: int | None = None) -> PaddingCollator:
        """A collator with the tokenizer's padding id and side, padding with the tokenizer if it can."""
        return cls(
            pad_token_id=resolve_pad_token_id(tokenizer),
            padding_side=getattr(tokenizer, "padding_side", "right") or "right",
            pad_to_multiple_of=pad_to_multiple_of,
            tokenizer=tokenizer if getattr(tokenizer, "pad_token", None) is not None else None,
        )

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        if self.tokenizer is not None:
            collate = DataCollatorWithPadding(self.tokenizer, pad_to_multiple_of=self.pad_to_multiple_of)
            return dict(collate(list(examples)))
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
    """Tokenises rows of a task with ``datasets.Dataset.map``, truncating to ``max_length`` tokens.

    Sentence pairs are encoded as pairs (``tokenizer(first, second)``, truncating the longer text
    first), so BERT-style tokenizers add ``[SEP]`` between them and set ``token_type_ids``. Nothing is
    padded here; the collator pads each batch.

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
    label2id = task.label2id
    raw_labels = [row[task.label_field] for row in rows]
    labels = [label2id[label] if label in label2id else task.label_id(label) for label in raw_labels]

    def tokenize(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        texts = [batch[name] for name in task.text_fields]
        encoded = tokenizer(*texts, truncation=True, max_length=max_length, return_attention_mask=True)
        return {key: encoded[key] for key in MODEL_INPUT_KEYS if key in encoded}

    with _quiet_datasets() as datasets:
        texts = datasets.Dataset.from_dict({name: [row[name] for row in rows] for name in task.text_fields})
        encoded = texts.map(tokenize, batched=True, remove_columns=list(task.text_fields))
        examples = encoded.add_column("labels", labels).to_list()
    return EncodedDataset(examples, PaddingCollator.from_tokenizer(tokenizer))


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
