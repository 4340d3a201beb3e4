"""Tests of aptune.data: loading, field detection, labels, errors, encoding, batching, rt-polarity."""

from __future__ import annotations

import csv
import io
import json
import os
import random
import sys
import tarfile
import types
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import BertTokenizerFast

from aptune.data import (
    DataError,
    DataFileNotFoundError,
    EncodedDataset,
    PaddingCollator,
    TextClassificationData,
    detect_text_fields,
    encode_rows,
    encode_splits,
    load_hub_dataset,
    load_split_files,
    load_text_classification,
    looks_like_hub_name,
    make_dataloader,
)
from aptune.data import rt_polarity as rt

SHARED_RT = Path("/work/shared/data/rt-polarity")
HUB_MESSAGE = (
    "could not load '{name}' from the Hugging Face hub (no network?); "
    "pass local files with --train/--validation/--test"
)
VOCAB = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "the",
    "movie",
    "is",
    "good",
    "bad",
    "a",
    "plot",
    "dull",
]
ID = {token: index for index, token in enumerate(VOCAB)}


# ----------------------------------------------------------------------------------------------------
# Helpers and fixtures
# ----------------------------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_csv(path: Path, header: list[str], rows: list[list], delimiter: str = ",") -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=delimiter, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    path.write_text(buffer.getvalue(), encoding="utf-8")
    return path


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> BertTokenizerFast:
    """A tiny WordPiece tokenizer built from a local vocab file (no download).

    transformers 5 ignores ``vocab_file=`` (the tokenizer silently has only the special tokens), so
    the vocab path is passed as ``vocab=``; the assertion guards against that pitfall.
    """
    vocab_file = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab_file.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    tok = BertTokenizerFast(vocab=str(vocab_file))
    assert tok.convert_tokens_to_ids(["the", "movie"]) == [ID["the"], ID["movie"]]
    assert tok.pad_token_id == 0
    return tok


@pytest.fixture
def sentiment_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    train = write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"text": "the movie is good", "label": 1, "score": 2.5},
            {"text": "the plot is dull", "label": 0, "score": -1.0},
            {"text": "a bad movie", "label": 0, "score": -3.0},
        ],
    )
    validation = write_jsonl(tmp_path / "validation.jsonl", [{"text": "good", "label": 1}])
    test = write_jsonl(tmp_path / "test.jsonl", [{"text": "bad", "label": 0}, {"text": "dull", "label": 0}])
    return train, validation, test


# ----------------------------------------------------------------------------------------------------
# Task description
# ----------------------------------------------------------------------------------------------------


def test_task_properties() -> None:
    task = TextClassificationData(text_fields=["premise", "hypothesis"], labels=["no", "yes"])
    assert task.text_fields == ("premise", "hypothesis")  # lists become tuples
    assert task.labels == ("no", "yes")
    assert task.is_pair and task.num_labels == 2
    assert task.label2id == {"no": 0, "yes": 1}
    assert task.id2label == {0: "no", 1: "yes"}
    assert task.label_id("yes") == 1
    single = TextClassificationData(text_fields="text", labels=(0, 1))
    assert single.text_fields == ("text",) and not single.is_pair
    with pytest.raises(AttributeError):
        single.labels = (1, 2)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"text_fields": (), "labels": (0, 1)}, "one or two columns, got 0"),
        ({"text_fields": ("a", "b", "c"), "labels": (0, 1)}, "one or two columns, got 3"),
        ({"text_fields": ("a", "a"), "labels": (0, 1)}, "two different columns"),
        ({"text_fields": ("text",), "labels": (0, 1), "label_field": "text"}, "also a text field"),
        ({"text_fields": ("text",), "labels": ()}, "at least one label"),
        ({"text_fields": ("text",), "labels": (0, "pos")}, "mix integers and strings"),
        ({"text_fields": ("text",), "labels": (1, 1)}, "labels repeat"),
        ({"text_fields": ("text",), "labels": (0.5,)}, "integers or strings"),
        ({"text_fields": ("",), "labels": (0, 1)}, "non-empty strings"),
    ],
)
def test_task_validation(kwargs: dict, fragment: str) -> None:
    with pytest.raises(DataError) as error:
        TextClassificationData(**kwargs)
    assert fragment in one_line(error)


def test_label_id_unknown_names_known_labels() -> None:
    task = TextClassificationData(text_fields=("text",), labels=("neg", "pos"))
    with pytest.raises(DataError) as error:
        task.label_id("neutral")
    assert one_line(error) == "unknown label 'neutral'; known labels: 'neg', 'pos'"


# ----------------------------------------------------------------------------------------------------
# Loading and detection
# ----------------------------------------------------------------------------------------------------


def test_load_jsonl_single_sentence(sentiment_files: tuple[Path, Path, Path]) -> None:
    data = load_split_files(*sentiment_files)
    assert data.task == TextClassificationData(text_fields=("text",), labels=(0, 1), label_field="label")
    assert [len(data[name]) for name in ("train", "validation", "test")] == [3, 1, 2]
    assert data["train"][0] == {"text": "the movie is good", "label": 1, "score": 2.5}  # extra fields kept
    assert data.sources["test"] == str(sentiment_files[2])
    assert "test" in data and data.get("missing") is None


def test_missing_split_access_is_clear(sentiment_files: tuple[Path, Path, Path]) -> None:
    data = load_split_files(sentiment_files[0])
    with pytest.raises(DataError) as error:
        data["test"]
    assert one_line(error) == "no 'test' split was loaded (available: train)"


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        ({"text": "x", "label": 0}, ("text",)),
        ({"sentence": "x", "label": 0}, ("sentence",)),
        ({"text": "x", "sentence": "y", "label": 0}, ("text",)),
        ({"premise": "p", "hypothesis": "h", "label": 0}, ("premise", "hypothesis")),
        ({"sentence1": "a", "sentence2": "b", "idx": 3, "label": 0}, ("sentence1", "sentence2")),
        ({"question": "q", "sentence": "s", "label": 0}, ("question", "sentence")),  # pair beats single
        ({"question1": "q", "question2": "r", "label": 0}, ("question1", "question2")),
    ],
)
def test_detect_text_fields(columns: dict, expected: tuple[str, ...], tmp_path: Path) -> None:
    assert detect_text_fields(columns) == expected
    data = load_split_files(write_jsonl(tmp_path / "train.jsonl", [columns]))
    assert data.task.text_fields == expected
    assert data.task.is_pair == (len(expected) == 2)


def test_detect_text_fields_failure_lists_columns(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [{"review": "x", "label": 0}])
    with pytest.raises(DataError) as error:
        load_split_files(path)
    message = one_line(error)
    assert str(path) in message and "columns: label, review" in message and "text_fields" in message


def test_explicit_fields(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "train.jsonl", [{"review": "good", "stars": "5"}, {"review": "bad", "stars": "1"}]
    )
    data = load_split_files(path, text_fields="review", label_field="stars")
    assert data.task.text_fields == ("review",) and data.task.label_field == "stars"
    assert data.task.labels == (1, 5)  # digit strings become integers, sorted numerically
    assert [row["stars"] for row in data["train"]] == [5, 1]


def test_string_labels_sorted_from_training(tmp_path: Path) -> None:
    train = write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"text": t, "label": lab}
            for t, lab in [("a", "pos"), ("b", "neutral"), ("c", "neg"), ("d", "pos")]
        ],
    )
    validation = write_jsonl(tmp_path / "dev.jsonl", [{"text": "e", "label": "neg"}])
    data = load_split_files(train, validation)
    assert data.task.labels == ("neg", "neutral", "pos")
    assert data.task.label2id == {"neg": 0, "neutral": 1, "pos": 2}


def test_integer_labels_sorted_numerically_and_normalised(tmp_path: Path) -> None:
    rows = [
        {"text": "a", "label": 10},
        {"text": "b", "label": 2},
        {"text": "c", "label": True},
        {"text": "d", "label": 2.0},
    ]
    data = load_split_files(write_jsonl(tmp_path / "train.jsonl", rows))
    assert data.task.labels == (1, 2, 10)
    assert [row["label"] for row in data["train"]] == [10, 2, 1, 2]


def test_explicit_labels_keep_order_and_check_train(tmp_path: Path) -> None:
    train = write_jsonl(
        tmp_path / "train.jsonl", [{"text": "a", "label": "yes"}, {"text": "b", "label": "no"}]
    )
    data = load_split_files(train, labels=["yes", "no"])
    assert data.task.labels == ("yes", "no") and data.task.label_id("no") == 1
    with pytest.raises(DataError) as error:
        load_split_files(train, labels=["yes"])
    message = one_line(error)
    assert (
        f"{train}, line 2" in message and "unknown label 'no'" in message and "known labels: 'yes'" in message
    )


def test_load_csv_and_tsv(tmp_path: Path) -> None:
    train = write_csv(
        tmp_path / "train.csv",
        ["sentence", "label"],
        [["good, really good", 1], ['a "bad" movie', 0], ["multi\nline", 1]],
    )
    validation = write_csv(
        tmp_path / "validation.tsv", ["sentence", "label"], [["dull\tplot", 0]], delimiter="\t"
    )
    data = load_split_files(train, validation)
    assert data.task.text_fields == ("sentence",) and data.task.labels == (0, 1)
    assert [row["sentence"] for row in data["train"]] == ["good, really good", 'a "bad" movie', "multi\nline"]
    assert [row["label"] for row in data["train"]] == [1, 0, 1]  # CSV strings "1" become ints
    assert data["validation"] == [{"sentence": "dull\tplot", "label": 0}]


def test_csv_and_jsonl_give_the_same_task(tmp_path: Path) -> None:
    rows = [("p1", "h1", "entailment"), ("p2", "h2", "neutral")]
    from_csv = load_split_files(write_csv(tmp_path / "train.csv", ["premise", "hypothesis", "label"], rows))
    from_jsonl = load_split_files(
        write_jsonl(
            tmp_path / "train.jsonl",
            [dict(zip(("premise", "hypothesis", "label"), r, strict=True)) for r in rows],
        )
    )
    assert from_csv.task == from_jsonl.task
    assert from_csv["train"] == from_jsonl["train"]


def test_json_array_and_json_lines_with_json_extension(tmp_path: Path) -> None:
    rows = [{"text": "a", "label": 1}, {"text": "b", "label": 0}]
    array = tmp_path / "array.json"
    array.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    lines = write_jsonl(tmp_path / "lines.json", rows)
    assert load_split_files(array)["train"] == rows
    assert load_split_files(lines)["train"] == rows


def test_jsonl_blank_lines_bom_crlf_and_u2028(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    text = '\ufeff{"text": "a\u2028b", "label": 1}\r\n\r\n{"text": "c", "label": 0}\r\n'
    path.write_text(text, encoding="utf-8")
    data = load_split_files(path)
    assert [row["text"] for row in data["train"]] == ["a\u2028b", "c"]


def test_load_parquet_split(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    train = tmp_path / "train.parquet"
    pq.write_table(
        pa.table({"sentence": ["good film", "dull plot", None], "label": [1, 0, 1], "idx": [0, 1, 2]}), train
    )
    validation = write_jsonl(tmp_path / "dev.jsonl", [{"sentence": "fine", "label": 1}])
    with pytest.raises(DataError) as error:
        load_split_files(train)
    assert one_line(error) == f"{train}, row 3: missing field 'sentence' (fields present: label, idx)"

    pq.write_table(pa.table({"sentence": ["good film", "dull plot"], "label": [1, 0], "idx": [0, 1]}), train)
    data = load_split_files(train, validation)
    assert data.task == TextClassificationData(text_fields=("sentence",), labels=(0, 1))
    assert data["train"] == [
        {"sentence": "good film", "label": 1, "idx": 0},
        {"sentence": "dull plot", "label": 0, "idx": 1},
    ]
    assert list(load_text_classification(tmp_path).splits) == ["train", "validation"]  # train.parquet found

    pq.write_table(
        pa.table({"sentence": pa.array([], pa.string()), "label": pa.array([], pa.int64())}), train
    )
    with pytest.raises(DataError) as error:
        load_split_files(train)
    assert one_line(error) == f"{train} is empty (no data rows)"


def test_json_array_file(tmp_path: Path) -> None:
    path = tmp_path / "train.json"
    rows = [
        {"premise": "p", "hypothesis": "h", "label": "yes", "id": 7},
        {"premise": "q", "hypothesis": "i", "label": "no"},
    ]
    path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    data = load_split_files(path)
    assert data.task == TextClassificationData(text_fields=("premise", "hypothesis"), labels=("no", "yes"))
    assert data["train"][0] == rows[0]
    assert data["train"][1] == {**rows[1], "id": None}  # every row holds every column of the file

    path.write_text(json.dumps([{"premise": "p", "hypothesis": "h", "label": 1}, {"premise": "q"}]))
    with pytest.raises(DataError) as error:
        load_split_files(path)
    assert one_line(error) == f"{path}, item 2: missing field 'hypothesis' (fields present: premise)"


def test_changed_file_is_read_again(tmp_path: Path) -> None:
    """Loading goes through datasets' cache; an edited file must not come back from a stale copy, even when
    its size and modification time are unchanged."""
    for path, before, after in [
        (tmp_path / "train.jsonl", '{"text": "aa", "label": 0}\n', '{"text": "bb", "label": 1}\n'),
        (tmp_path / "train.csv", "text,label\naa,0\n", "text,label\nbb,1\n"),
    ]:
        path.write_text(before, encoding="utf-8")
        stat = path.stat()
        assert load_split_files(path)["train"] == [{"text": "aa", "label": 0}]
        path.write_text(after, encoding="utf-8")
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
        assert load_split_files(path)["train"] == [{"text": "bb", "label": 1}]


def test_csv_cells_are_text(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "train.csv",
        ["text", "label", "score"],
        [["NA", "1", "007"], ["null", "0", "1e5"], ["42", "1", ""]],
    )
    data = load_split_files(path)
    assert [row["text"] for row in data["train"]] == ["NA", "null", "42"]  # no guessing of types or NaN
    assert [row["score"] for row in data["train"]] == ["007", "1e5", None]  # an empty cell is missing
    assert data.task.labels == (0, 1)


def test_loading_is_quiet(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    import datasets

    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 1}])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": 0}\n{"text": \n', encoding="utf-8")
    capfd.readouterr()
    datasets.enable_progress_bars()
    load_split_files(path)
    with pytest.raises(DataError):
        load_split_files(bad)
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""  # no progress bars, no logged errors
    assert datasets.is_progress_bar_enabled()  # and the settings are restored


# ----------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "train.jsonl"
    with pytest.raises(DataFileNotFoundError) as error:
        load_split_files(missing)
    assert one_line(error) == f"data file not found: {missing}"
    assert isinstance(error.value, FileNotFoundError) and isinstance(error.value, ValueError)


def test_missing_validation_file(sentiment_files: tuple[Path, Path, Path], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        load_split_files(sentiment_files[0], tmp_path / "valid.jsonl")
    assert "valid.jsonl" in one_line(error)


def test_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "train.txt"
    path.write_text("good\t1\n", encoding="utf-8")
    with pytest.raises(DataError) as error:
        load_split_files(path)
    message = one_line(error)
    assert "unsupported file extension '.txt'" in message and str(path) in message and ".jsonl" in message


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(DataError) as error:
        load_split_files(tmp_path)
    assert "is a directory" in one_line(error)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_jsonl(tmp_path: Path, content: str) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as error:
        load_split_files(path)
    assert one_line(error) == f"{path} is empty (no data rows)"


def test_empty_csv_with_header_only(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "train.csv", ["text", "label"], [])
    with pytest.raises(DataError) as error:
        load_split_files(path)
    assert one_line(error) == f"{path} is empty (no data rows)"


def test_empty_validation_file(sentiment_files: tuple[Path, Path, Path], tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(DataError) as error:
        load_split_files(sentiment_files[0], empty)
    assert str(empty) in one_line(error)


def test_row_missing_label_names_file_line_and_field(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "train.jsonl",
        [{"text": "a", "label": 0}, {"text": "b", "label": 1}, {"text": "c", "score": 0.5}],
    )
    with pytest.raises(DataError) as error:
        load_split_files(path)
    assert one_line(error) == f"{path}, line 3: missing field 'label' (fields present: text, score)"


def test_row_missing_text_in_pair_task(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "train.jsonl",
        [{"premise": "p", "hypothesis": "h", "label": 0}, {"premise": "p2", "hypothesis": None, "label": 1}],
    )
    with pytest.raises(DataError) as error:
        load_split_files(path)
    assert one_line(error).startswith(f"{path}, line 2: missing field 'hypothesis'")


def test_csv_row_missing_cell_names_line(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text("text,label\ngood,1\nbad,0\nshort\n", encoding="utf-8")
    with pytest.raises(DataError) as error:
        load_split_files(path)
    # "fields present" lists the fields that hold a value in that row; the empty label cell is not one
    assert one_line(error) == f"{path}, line 4: missing field 'label' (fields present: text)"


def test_text_must_be_a_string(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": 42, "label": 0}])
    with pytest.raises(DataError) as error:
        load_split_files(path)
    assert one_line(error) == f"{path}, line 1: field 'text' must be a string, got int"


@pytest.mark.parametrize("label", [0.5, [1], ""])
def test_bad_label_value(tmp_path: Path, label: object) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": label}])
    with pytest.raises(DataError) as error:
        load_split_files(path)
    assert one_line(error).startswith(
        f"{path}, line 1: field 'label' must be an integer or a non-empty string"
    )


def test_mixed_label_types(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": "pos"}])
    with pytest.raises(DataError) as error:
        load_split_files(path)
    assert one_line(error) == f"labels in {path} mix integers and strings (e.g. 1 and 'pos')"


def test_unknown_label_in_validation(sentiment_files: tuple[Path, Path, Path], tmp_path: Path) -> None:
    validation = write_jsonl(
        tmp_path / "val.jsonl", [{"text": "good", "label": 1}, {"text": "meh", "label": 2}]
    )
    with pytest.raises(DataError) as error:
        load_split_files(sentiment_files[0], validation)
    assert one_line(error) == (
        f"{validation}, line 2: unknown label 2 (not in the training split; known labels: 0, 1)"
    )


def test_unknown_string_label_in_test_csv(tmp_path: Path) -> None:
    train = write_csv(tmp_path / "train.csv", ["text", "label"], [["a", "neg"], ["b", "pos"]])
    test = write_csv(tmp_path / "test.csv", ["text", "label"], [["c", "pos"], ["d", "neutral"]])
    with pytest.raises(DataError) as error:
        load_split_files(train, test=test)
    message = one_line(error)
    assert message.startswith(f"{test}, line 3: unknown label 'neutral'")
    assert "known labels: 'neg', 'pos'" in message


def test_invalid_json_line(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a", "label": 0}\n{"text": "b", label: 1}\n', encoding="utf-8")
    with pytest.raises(DataError) as error:
        load_split_files(path)
    assert one_line(error).startswith(f"{path}, line 2: invalid JSON")


def test_json_line_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('["a", 0]\n', encoding="utf-8")
    with pytest.raises(DataError) as error:
        load_split_files(path)
    assert one_line(error) == f"{path}, line 1: expected a JSON object, got list"


def test_malformed_json_line_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a", "label": 0}\n\n{"text": "b", "label": 1}\n{"text": "c" "label": 0}\n')
    with pytest.raises(DataError) as error:
        load_split_files(path)
    assert one_line(error) == f"{path}, line 4: invalid JSON (Expecting ',' delimiter at column 14)"
    assert error.value.__cause__ is None and error.value.__suppress_context__  # no pyarrow traceback

    array = tmp_path / "train.json"
    array.write_text('[\n  {"text": "a", "label": 0},\n  {"text": "b", label: 1}\n]\n')
    with pytest.raises(DataError) as error:
        load_split_files(array)
    assert one_line(error).startswith(f"{array}, line 3: invalid JSON")
    array.write_text('[{"text": "a", "label": 0}, "b"]')
    with pytest.raises(DataError) as error:
        load_split_files(array)
    assert one_line(error) == f"{array}, item 2: expected a JSON object, got str"


def test_line_numbers_count_blank_lines_and_multiline_cells(tmp_path: Path) -> None:
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text('{"text": "a", "label": 0}\n\n\n{"text": "b"}\n', encoding="utf-8")
    with pytest.raises(DataError) as error:
        load_split_files(jsonl)
    assert one_line(error).startswith(f"{jsonl}, line 4: missing field 'label'")
    table = tmp_path / "train.csv"
    table.write_text('text,label\n"two\nlines",0\n\nc,\n', encoding="utf-8")
    with pytest.raises(DataError) as error:
        load_split_files(table)
    assert one_line(error).startswith(f"{table}, line 5: missing field 'label'")


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("train.csv", 'text,label\n"unterminated,1\n'),
        ("train.csv", "text,label\na,1\nb,0,extra\n"),
        ("train.parquet", "not a parquet file"),
        ("train.jsonl", "\u00e9t\u00e9"),
    ],
)
def test_malformed_files_give_one_line(tmp_path: Path, name: str, content: str) -> None:
    path = tmp_path / name
    path.write_bytes(content.encode("latin-1" if name.endswith(".jsonl") else "utf-8"))
    with pytest.raises(DataError) as error:
        load_split_files(path)
    message = one_line(error)
    assert message.startswith(f"{path}: ") and error.value.__cause__ is None


def test_labels_needed_without_train(tmp_path: Path) -> None:
    test = write_jsonl(tmp_path / "test.jsonl", [{"text": "a", "label": 0}])
    with pytest.raises(DataError) as error:
        load_split_files(test=test)
    assert "without a training split" in one_line(error)
    data = load_split_files(test=test, labels=[0, 1])
    assert data.task.labels == (0, 1) and list(data.splits) == ["test"]


def test_no_files_given() -> None:
    with pytest.raises(DataError) as error:
        load_split_files()
    assert "no data given" in one_line(error)


# ----------------------------------------------------------------------------------------------------
# load_text_classification and the hub
# ----------------------------------------------------------------------------------------------------


def test_load_from_directory(sentiment_files: tuple[Path, Path, Path]) -> None:
    directory = sentiment_files[0].parent
    data = load_text_classification(directory)
    assert {name: len(rows) for name, rows in data.splits.items()} == {"train": 3, "validation": 1, "test": 2}


def test_load_directory_with_dev_and_csv(tmp_path: Path) -> None:
    write_csv(tmp_path / "train.csv", ["text", "label"], [["a", 0], ["b", 1]])
    write_csv(tmp_path / "dev.csv", ["text", "label"], [["c", 1]])
    data = load_text_classification(str(tmp_path))
    assert list(data.splits) == ["train", "validation"]


def test_load_directory_without_train(tmp_path: Path) -> None:
    with pytest.raises(DataFileNotFoundError) as error:
        load_text_classification(tmp_path)
    assert f"no training file in {tmp_path}" in one_line(error)


def test_load_single_file_and_split_keywords(sentiment_files: tuple[Path, Path, Path]) -> None:
    train, validation, test = sentiment_files
    assert list(load_text_classification(train).splits) == ["train"]
    data = load_text_classification(train=train, validation=validation, test=test)
    assert list(data.splits) == ["train", "validation", "test"]
    with pytest.raises(DataError) as error:
        load_text_classification(train, train=train)
    assert "not both" in one_line(error)


def test_load_missing_path_is_not_a_hub_name(tmp_path: Path) -> None:
    for missing in (str(tmp_path / "train.jsonl"), "data/train.jsonl", "train.csv", "./foo", "../x/y/z"):
        with pytest.raises(DataFileNotFoundError) as error:
            load_text_classification(missing)
        assert missing in one_line(error)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("rotten_tomatoes", True),
        ("glue/sst2", True),
        ("stanfordnlp/imdb", True),
        ("glue:sst2", True),
        ("owner/data-v1.0", True),
        ("data/train.jsonl", False),
        ("train.csv", False),
        ("notes.txt", False),
        ("./local", False),
        ("/abs/path", False),
        ("a/b/c", False),
        ("my data", False),
    ],
)
def test_looks_like_hub_name(name: str, expected: bool) -> None:
    assert looks_like_hub_name(name) is expected


def test_hub_without_datasets_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(DataError) as error:
        load_text_classification("glue/sst2")
    assert one_line(error) == HUB_MESSAGE.format(name="glue/sst2")
    assert isinstance(error.value.__cause__, ImportError)


def fake_datasets(load_dataset: object) -> types.ModuleType:
    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset  # type: ignore[attr-defined]
    return module


def test_hub_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple] = []

    def offline(*args: object) -> None:
        calls.append(args)
        raise ConnectionError("Couldn't reach 'glue' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(offline))
    with pytest.raises(DataError) as error:
        load_text_classification("glue/sst2")
    assert one_line(error) == HUB_MESSAGE.format(name="glue/sst2")
    assert isinstance(error.value.__cause__, ConnectionError)
    assert calls == [("glue/sst2",), ("glue", "sst2")]  # as a repo name, then as dataset/config

    calls.clear()
    with pytest.raises(DataError):
        load_hub_dataset("rotten_tomatoes")
    assert calls == [("rotten_tomatoes",)]


def test_hub_loaded_splits(monkeypatch: pytest.MonkeyPatch) -> None:
    def load_dataset(path: str, config: str | None = None) -> dict:
        if config is None:
            raise FileNotFoundError(path)
        assert (path, config) == ("glue", "sst2")
        return {
            "train": [{"sentence": "good", "label": 1, "idx": 0}, {"sentence": "bad", "label": 0, "idx": 1}],
            "validation": [{"sentence": "fine", "label": 1, "idx": 0}],
            "test": [{"sentence": "hidden", "label": -1, "idx": 0}],  # GLUE hides test labels
        }

    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(load_dataset))
    data = load_text_classification("glue/sst2")
    assert data.task == TextClassificationData(text_fields=("sentence",), labels=(0, 1))
    assert list(data.splits) == ["train", "validation"]
    assert data.sources == {"train": "glue/sst2 [train]", "validation": "glue/sst2 [validation]"}


def test_hub_unknown_label_names_row(monkeypatch: pytest.MonkeyPatch) -> None:
    def load_dataset(path: str) -> dict:
        return {
            "train": [{"premise": "p", "hypothesis": "h", "label": 0}],
            "validation_matched": [{"premise": "p", "hypothesis": "h", "label": 0}] * 2
            + [{"premise": "p", "hypothesis": "h", "label": 2}],
        }

    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(load_dataset))
    with pytest.raises(DataError) as error:
        load_hub_dataset("nyu-mll/multi_nli")
    assert one_line(error).startswith("nyu-mll/multi_nli [validation_matched], row 3: unknown label 2")


# ----------------------------------------------------------------------------------------------------
# Encoding and batching
# ----------------------------------------------------------------------------------------------------


def test_encode_single_sentence(
    tokenizer: BertTokenizerFast, sentiment_files: tuple[Path, Path, Path]
) -> None:
    data = load_split_files(*sentiment_files)
    encoded = encode_rows(tokenizer, data["train"], data.task, max_length=16)
    assert isinstance(encoded, EncodedDataset) and len(encoded) == 3
    first = encoded[0]
    cls, sep = ID["[CLS]"], ID["[SEP]"]
    assert first["input_ids"] == [cls, ID["the"], ID["movie"], ID["is"], ID["good"], sep]
    assert first["attention_mask"] == [1] * 6
    assert first["token_type_ids"] == [0] * 6
    assert first["labels"] == 1
    assert encoded[2]["input_ids"] == [cls, ID["a"], ID["bad"], ID["movie"], sep]
    assert encoded.collator == PaddingCollator(pad_token_id=0, padding_side="right")


def test_encode_sentence_pairs(tokenizer: BertTokenizerFast, tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "train.jsonl",
        [{"premise": "the movie is good", "hypothesis": "good", "label": "yes"}],
    )
    data = load_split_files(path)
    example = encode_rows(tokenizer, data["train"], data.task, max_length=32)[0]
    cls, sep = ID["[CLS]"], ID["[SEP]"]
    assert example["input_ids"] == [cls, ID["the"], ID["movie"], ID["is"], ID["good"], sep, ID["good"], sep]
    assert example["token_type_ids"] == [0, 0, 0, 0, 0, 0, 1, 1]
    assert example["labels"] == 0


def test_encode_truncates(tokenizer: BertTokenizerFast) -> None:
    task = TextClassificationData(text_fields=("text",), labels=(0, 1))
    rows = [{"text": "the movie is good the plot is dull", "label": 0}]
    example = encode_rows(tokenizer, rows, task, max_length=5)[0]
    assert example["input_ids"] == [ID["[CLS]"], ID["the"], ID["movie"], ID["is"], ID["[SEP]"]]
    pair_task = TextClassificationData(text_fields=("a", "b"), labels=(0,))
    pair = encode_rows(
        tokenizer, [{"a": "the movie is good", "b": "bad", "label": 0}], pair_task, max_length=6
    )[0]
    assert len(pair["input_ids"]) == 6 and pair["input_ids"][-2:] == [ID["bad"], ID["[SEP]"]]
    with pytest.raises(ValueError, match="max_length"):
        encode_rows(tokenizer, rows, task, max_length=0)


def test_encode_splits_and_empty_rows(
    tokenizer: BertTokenizerFast, sentiment_files: tuple[Path, Path, Path]
) -> None:
    data = load_split_files(*sentiment_files)
    encoded = encode_splits(tokenizer, data, max_length=8)
    assert {name: len(ds) for name, ds in encoded.items()} == {"train": 3, "validation": 1, "test": 2}
    assert len(encode_rows(tokenizer, [], data.task)) == 0


def test_collate_pads_to_longest(
    tokenizer: BertTokenizerFast, sentiment_files: tuple[Path, Path, Path]
) -> None:
    data = load_split_files(*sentiment_files)
    encoded = encode_rows(tokenizer, data["train"], data.task, max_length=16)
    assert encoded.collator.tokenizer is tokenizer  # it has a pad token: transformers' collator pads
    batch = encoded.collator([encoded[0], encoded[2]])
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["input_ids"].shape == (2, 6) and batch["input_ids"].dtype == torch.long
    assert batch["input_ids"][1].tolist() == [ID["[CLS]"], ID["a"], ID["bad"], ID["movie"], ID["[SEP]"], 0]
    assert batch["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 1, 1, 0]]
    assert batch["token_type_ids"].tolist() == [[0] * 6, [0] * 6]
    assert batch["labels"].tolist() == [1, 0] and batch["labels"].dtype == torch.long


def test_collate_left_padding_multiple_and_no_token_types() -> None:
    examples = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": 1},
        {"input_ids": [8], "attention_mask": [1], "labels": 0},
    ]
    batch = PaddingCollator(pad_token_id=9, padding_side="left")(examples)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].tolist() == [[5, 6, 7], [9, 9, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    rounded = PaddingCollator(pad_token_id=0, pad_to_multiple_of=4)(examples)
    assert rounded["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    with pytest.raises(ValueError, match="padding_side"):
        PaddingCollator(padding_side="middle")


def test_collator_pad_id_falls_back_to_eos() -> None:
    tok = types.SimpleNamespace(pad_token_id=None, eos_token_id=2, padding_side="left")
    assert PaddingCollator.from_tokenizer(tok) == PaddingCollator(pad_token_id=2, padding_side="left")


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=12), min_size=1, max_size=8))
def test_collate_shapes_property(lengths: list[int]) -> None:
    examples = [
        {
            "input_ids": list(range(1, n + 1)),
            "attention_mask": [1] * n,
            "token_type_ids": [0] * n,
            "labels": i % 2,
        }
        for i, n in enumerate(lengths)
    ]
    batch = PaddingCollator(pad_token_id=0)(examples)
    assert batch["input_ids"].shape == (len(lengths), max(lengths))
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    assert ((batch["input_ids"] != 0) == batch["attention_mask"].bool()).all()
    assert batch["labels"].tolist() == [i % 2 for i in range(len(lengths))]


def label_order(loader: torch.utils.data.DataLoader) -> list[int]:
    return [label for batch in loader for label in batch["labels"].tolist()]


def test_dataloader_seeded_shuffle_is_reproducible() -> None:
    examples = [
        {"input_ids": [1] * (1 + i % 5), "attention_mask": [1] * (1 + i % 5), "labels": i} for i in range(40)
    ]
    dataset = EncodedDataset(examples)
    plain = make_dataloader(dataset, batch_size=8)
    assert label_order(plain) == list(range(40))

    first = make_dataloader(dataset, batch_size=8, shuffle=True, seed=123)
    second = make_dataloader(dataset, batch_size=8, shuffle=True, seed=123)
    other = make_dataloader(dataset, batch_size=8, shuffle=True, seed=124)
    epoch1 = label_order(first)
    assert sorted(epoch1) == list(range(40)) and epoch1 != list(range(40))
    assert epoch1 == label_order(second)
    assert epoch1 != label_order(other)
    epoch2 = label_order(first)
    assert epoch2 != epoch1 and epoch2 == label_order(second)  # new order per epoch, still reproducible

    torch.manual_seed(0)  # the global random state does not matter
    assert label_order(make_dataloader(dataset, batch_size=8, shuffle=True, seed=123)) == epoch1

    batches = list(make_dataloader(dataset, batch_size=16, drop_last=True))
    assert len(batches) == 2 and batches[0]["input_ids"].shape == (16, 5)
    with pytest.raises(ValueError, match="batch_size"):
        make_dataloader(dataset, batch_size=0)


def test_dataloader_end_to_end(
    tokenizer: BertTokenizerFast, sentiment_files: tuple[Path, Path, Path]
) -> None:
    data = load_split_files(*sentiment_files)
    loader = make_dataloader(encode_rows(tokenizer, data["train"], data.task, 16), batch_size=2)
    shapes = [tuple(batch["input_ids"].shape) for batch in loader]
    assert shapes == [(2, 6), (1, 5)]


# ----------------------------------------------------------------------------------------------------
# rt-polarity
# ----------------------------------------------------------------------------------------------------

GROUND_TRUTH = (
    "1\t2.26666666667\tA fine film.\r\n"
    "2\t-0.0588235294118\t  Too long.  \r\n"
    "3\t0\tIt is a movie.\r\n"
    "4\t1.5\tA fine film.\r\n"
    "\r\n"
    "5\t-3.25\tLoud and boring; caf\u00e9 \u2019style\u2019.\r\n"
    "6\t0.0\tNeutral again.\r\n"
    "7\t3\tGreat\tfun.\r\n"
)


def test_parse_ground_truth() -> None:
    rows = rt.parse_ground_truth(GROUND_TRUTH)
    # score-0 rows go; the first "A fine film." is kept and its repeat (score 1.5) dropped
    assert rows == [
        {"text": "A fine film.", "label": 1, "score": 2.26666666667},
        {"text": "Too long.", "label": 0, "score": -0.0588235294118},  # whitespace stripped
        {"text": "Loud and boring; caf\u00e9 \u2019style\u2019.", "label": 0, "score": -3.25},
        {"text": "Great\tfun.", "label": 1, "score": 3.0},  # tabs after the second stay in the sentence
    ]


def test_parse_ground_truth_bad_lines() -> None:
    with pytest.raises(DataError) as error:
        rt.parse_ground_truth("1\t1.0\tok\n2\tno score here\n")
    assert one_line(error) == f"{rt.GROUND_TRUTH_FILE}, line 2: expected id, score and sentence"
    with pytest.raises(DataError) as error:
        rt.parse_ground_truth("1\tabc\tsentence\n")
    assert "bad score 'abc'" in one_line(error)


def test_split_rows() -> None:
    rows = [{"text": f"s{i}", "label": i % 2, "score": float(i)} for i in range(20)]
    splits = rt.split_rows(rows, seed=7, n_validation=3, n_test=4)
    assert [len(splits[name]) for name in ("train", "validation", "test")] == [13, 3, 4]
    expected = list(rows)
    random.Random(7).shuffle(expected)
    assert splits["validation"] == expected[:3]
    assert splits["test"] == expected[3:7]
    assert splits["train"] == expected[7:]
    assert rows[0]["text"] == "s0"  # input untouched
    assert rt.split_rows(rows, seed=7, n_validation=3, n_test=4) == splits
    assert rt.split_rows(rows, seed=8, n_validation=3, n_test=4) != splits


def test_write_jsonl_format(tmp_path: Path) -> None:
    path = tmp_path / "out" / "x.jsonl"
    rt.write_jsonl([{"text": "caf\u00e9 \u2019", "label": 0, "score": -0.0588235294118}], path)
    assert path.read_bytes() == b'{"text": "caf\\u00e9 \\u2019", "label": 0, "score": -0.0588235294118}\n'
    assert not path.with_name("x.jsonl.tmp").exists()


def make_sdist(path: Path, ground_truth: bytes) -> Path:
    """A fake vaderSentiment sdist: an outer tar.gz holding the inner tar.gz with the ground truth."""
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as archive:
        info = tarfile.TarInfo(f"hutto_ICWSM_2014/{rt.GROUND_TRUTH_FILE}")
        info.size = len(ground_truth)
        archive.addfile(info, io.BytesIO(ground_truth))
    with tarfile.open(path, "w:gz") as archive:
        info = tarfile.TarInfo(f"vaderSentiment-3.3.2/{rt.INNER_ARCHIVE}")
        info.size = len(inner.getvalue())
        archive.addfile(info, io.BytesIO(inner.getvalue()))
    return path


def test_read_ground_truth_checks_sha256(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sdist = make_sdist(tmp_path / rt.SDIST_NAME, GROUND_TRUTH.encode())
    with pytest.raises(DataError) as error:
        rt.read_ground_truth(sdist)
    assert "has SHA-256" in one_line(error)
    import hashlib

    monkeypatch.setattr(rt, "GROUND_TRUTH_SHA256", hashlib.sha256(GROUND_TRUTH.encode()).hexdigest())
    assert rt.read_ground_truth(sdist) == GROUND_TRUTH


def test_read_ground_truth_missing_inner_archive(tmp_path: Path) -> None:
    sdist = tmp_path / "empty.tar.gz"
    with tarfile.open(sdist, "w:gz"):
        pass
    with pytest.raises(DataError) as error:
        rt.read_ground_truth(sdist)
    assert f"has no {rt.INNER_ARCHIVE}" in one_line(error)


def test_download_failure_is_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_run(command: list[str], **kwargs: object) -> types.SimpleNamespace:
        assert command[:4] == [sys.executable, "-m", "pip", "download"]
        assert "vaderSentiment==3.3.2" in command and ":all:" in command
        return types.SimpleNamespace(
            returncode=1, stdout="", stderr="WARNING: retrying\nERROR: No matching distribution"
        )

    monkeypatch.setattr(rt.subprocess, "run", failing_run)
    with pytest.raises(DataError) as error:
        rt.download_sdist(tmp_path)
    assert one_line(error) == (
        "could not download vaderSentiment==3.3.2 from PyPI to rebuild rt-polarity (no network?): "
        "ERROR: No matching distribution"
    )


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("APTUNE_CACHE", str(tmp_path))
    assert rt.cache_dir() == tmp_path / "rt-polarity"
    monkeypatch.delenv("APTUNE_CACHE")
    assert rt.cache_dir() == Path.home() / ".cache" / "aptune" / "rt-polarity"


def make_rt_folder(directory: Path) -> rt.RtPolarityFiles:
    directory.mkdir(parents=True, exist_ok=True)
    files = rt.RtPolarityFiles(*(directory / f"{name}.jsonl" for name in ("train", "validation", "test")))
    for path in files:
        write_jsonl(
            path, [{"text": path.stem, "label": 1, "score": 1.0}, {"text": "x", "label": 0, "score": -1.0}]
        )
    return files


def test_rt_polarity_files_prefers_shared_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    shared = make_rt_folder(tmp_path / "shared" / "data" / "rt-polarity")
    monkeypatch.setenv("APTUNE_SHARED_DATA", str(tmp_path / "shared" / "data"))
    monkeypatch.setenv("APTUNE_CACHE", str(tmp_path / "cache"))
    assert rt.rt_polarity_files() == shared
    data = load_text_classification("rt-polarity")
    assert data["validation"][0]["text"] == "validation"


def test_rt_polarity_files_candidates_include_repo_and_cwd(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("APTUNE_SHARED_DATA", raising=False)
    work = tmp_path / "checkout"
    work.mkdir()
    monkeypatch.chdir(work)
    candidates = rt.shared_data_candidates()
    assert tmp_path / "shared" / "data" in candidates  # <cwd>/../shared/data
    assert work / "shared" / "data" in candidates
    repo = Path(rt.__file__).resolve().parents[3]
    assert (repo / "pyproject.toml").is_file() and repo.parent / "shared" / "data" in candidates
    shared = make_rt_folder(tmp_path / "shared" / "data" / "rt-polarity")
    monkeypatch.setattr(rt, "_repo_root", lambda: None)  # ignore the real ../shared next to this checkout
    assert rt.rt_polarity_files(rebuild=False) == shared


def test_rt_polarity_files_uses_cache_then_refuses(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(rt, "shared_data_candidates", lambda: [])
    monkeypatch.setenv("APTUNE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataError) as error:
        rt.rt_polarity_files(rebuild=False)
    assert "rt-polarity not found" in one_line(error)
    cached = make_rt_folder(tmp_path / "cache" / "rt-polarity")
    assert rt.rt_polarity_files(rebuild=False) == cached


def test_rt_polarity_files_rebuilds_when_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(rt, "shared_data_candidates", lambda: [])
    monkeypatch.setenv("APTUNE_CACHE", str(tmp_path / "cache"))
    calls: list[None] = []

    def fake_rebuild(directory: Path | None = None) -> rt.RtPolarityFiles:
        calls.append(None)
        return make_rt_folder(rt.cache_dir())

    monkeypatch.setattr(rt, "rebuild_rt_polarity", fake_rebuild)
    files = rt.rt_polarity_files()
    assert calls == [None] and files.train == tmp_path / "cache" / "rt-polarity" / "train.jsonl"
    assert rt.rt_polarity_files() == files and calls == [None]  # second call finds the cache


@pytest.mark.skipif(
    os.environ.get("APTUNE_TEST_NETWORK") != "1", reason="set APTUNE_TEST_NETWORK=1 to download from PyPI"
)
def test_rebuild_from_pypi(tmp_path: Path) -> None:
    files = rt.rebuild_rt_polarity(tmp_path / "rt-polarity")
    sizes = [sum(1 for _ in path.open(encoding="utf-8")) for path in files]
    assert sizes == [8566, 1000, 1000]
    if SHARED_RT.is_dir():
        for path in files:
            assert path.read_bytes() == (SHARED_RT / path.name).read_bytes(), path.name


@pytest.mark.skipif(not SHARED_RT.is_dir(), reason="shared rt-polarity data not present")
def test_shared_rt_polarity_loads(tokenizer: BertTokenizerFast) -> None:
    data = load_split_files(*(SHARED_RT / f"{name}.jsonl" for name in ("train", "validation", "test")))
    assert {name: len(rows) for name, rows in data.splits.items()} == {
        "train": 8566,
        "validation": 1000,
        "test": 1000,
    }
    assert data.task == TextClassificationData(text_fields=("text",), labels=(0, 1))
    for rows in data.splits.values():
        assert {row["label"] for row in rows} == {0, 1}
        assert all((row["score"] > 0) == (row["label"] == 1) for row in rows)
    encoded = encode_rows(tokenizer, data["validation"][:64], data.task, max_length=64)
    batch = next(iter(make_dataloader(encoded, batch_size=32)))
    assert batch["input_ids"].shape[0] == 32 and batch["input_ids"].shape[1] <= 64
