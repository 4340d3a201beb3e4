"""Tests of aptune.data.causal_lm: loading, format detection, packing, chat labels, batching, errors."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch
from tiny_lm import tiny_bos_tokenizer, tiny_tokenizer

from aptune.data import (
    LM_FORMATS,
    DataError,
    DataFileNotFoundError,
    detect_lm_format,
    encode_chat,
    encode_lm_splits,
    lm_collator,
    load_lm_splits,
    make_lm_dataloader,
    to_messages,
    tokenize_chat,
    tokenize_text_blocks,
)
from aptune.data.causal_lm import resolve_bos, tokenizer_adds_bos

BROWN = Path(__file__).resolve().parents[2] / "shared" / "data" / "brown"
END = "<|im_end|>"

SYSTEM = "Be brief."
TURNS = [("what is two plus two?", "four."), ("and the cat?", "The cat sat on the mat.")]
MESSAGES = [{"role": "system", "content": SYSTEM}] + [
    message
    for user, assistant in TURNS
    for message in ({"role": "user", "content": user}, {"role": "assistant", "content": assistant})
]
CONVERSATIONS = [{"from": "system", "value": SYSTEM}] + [
    turn for user, gpt in TURNS for turn in ({"from": "human", "value": user}, {"from": "gpt", "value": gpt})
]
DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "A language model predicts the next token.",
    "",
    "Pruning removes attention heads,\nneurons and hidden channels.",
    "hello",
    "The cat sat on the mat. The dog ran in the park. Birds sing in the morning.",
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def bos_tok():
    """Adds ``<bos>`` first to every plain encode, as Gemma's tokenizer does."""
    return tiny_bos_tokenizer()


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def labelled_spans(row: dict[str, list[int]]) -> list[list[int]]:
    """The runs of consecutive labelled tokens; checks every label equals its input id."""
    spans: list[list[int]] = []
    previous = False
    for token, label in zip(row["input_ids"], row["labels"], strict=True):
        labelled = label != -100
        if labelled:
            assert label == token
            if not previous:
                spans.append([])
            spans[-1].append(token)
        previous = labelled
    return spans


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------------------------------
# Format detection and messages
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        (["id", "genre", "text"], "text"),
        (["messages"], "messages"),
        (["messages", "text", "label"], "messages"),
        (["conversations", "id"], "conversations"),
        (["prompt", "response"], "prompt_response"),
        (["prompt", "completion"], "prompt_response"),
        (["instruction", "input", "output"], "prompt_response"),
        (["system", "instruction", "output"], "prompt_response"),
    ],
)
def test_detect_lm_format(columns, expected):
    assert detect_lm_format(columns, source="x.jsonl") == expected
    assert expected in LM_FORMATS


@pytest.mark.parametrize(
    "columns", [["text", "label"], ["premise", "hypothesis", "label"], ["sentence", "labels"]]
)
def test_detect_classification_data_is_an_error(columns):
    with pytest.raises(DataError) as excinfo:
        detect_lm_format(columns, source="train.csv")
    message = one_line_error(excinfo)
    assert message.startswith("train.csv looks like classification data")
    assert "use --task classification" in message


def test_detect_unknown_columns_lists_them():
    with pytest.raises(DataError) as excinfo:
        detect_lm_format(["question", "answer_text"], source="qa.jsonl")
    message = one_line_error(excinfo)
    assert "qa.jsonl" in message and "(question, answer_text)" in message
    assert (
        "'messages'" in message and "'prompt'+'response'" in message and "'instruction'+'output'" in message
    )


def test_to_messages_for_each_format():
    assert to_messages({"messages": MESSAGES}, "messages") == MESSAGES
    assert to_messages({"conversations": CONVERSATIONS}, "conversations") == MESSAGES
    sharegpt_roles = [{"from": "user", "value": "a"}, {"from": "assistant", "value": "b"}]
    assert to_messages({"conversations": sharegpt_roles}, "conversations") == [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
    ]
    assert to_messages({"prompt": "p", "response": "r"}, "prompt_response") == [
        {"role": "user", "content": "p"},
        {"role": "assistant", "content": "r"},
    ]
    alpaca = {"instruction": "Add.", "input": "2 and 2", "output": "4", "system": "Be brief."}
    assert to_messages(alpaca, "prompt_response") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Add.\n\n2 and 2"},
        {"role": "assistant", "content": "4"},
    ]
    assert to_messages({"instruction": "Add.", "input": "", "output": "4"}, "prompt_response")[0] == {
        "role": "user",
        "content": "Add.",
    }
    # Arrow fills missing struct fields with None: extra keys are dropped
    with_extra = [{"role": "user", "content": "a", "name": None}, {"role": "assistant", "content": "b"}]
    assert to_messages({"messages": with_extra}, "messages")[0] == {"role": "user", "content": "a"}


def test_to_messages_errors():
    with pytest.raises(DataError, match=r"conversations\[1\]: unknown from 'robot'"):
        to_messages(
            {"conversations": [{"from": "human", "value": "a"}, {"from": "robot", "value": "b"}]},
            "conversations",
        )
    with pytest.raises(DataError, match=r"messages\[0\]: 'content' must be a string"):
        to_messages({"messages": [{"role": "user", "content": None}]}, "messages")
    with pytest.raises(DataError, match="field 'prompt' must be a string"):
        to_messages({"prompt": None, "response": "r"}, "prompt_response")
    with pytest.raises(DataError, match="plain-text rows have no chat messages"):
        to_messages({"text": "a"}, "text")


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------


def test_load_folder_with_mixed_file_types(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"id": i, "text": f"document {i}\nsecond line"} for i in range(5)])
    write_csv(tmp_path / "dev.csv", [{"text": "a dev document"}, {"text": "another one"}])
    (tmp_path / "test.txt").write_text("line one\nline two\nline three\n", encoding="utf-8")
    splits = load_lm_splits(tmp_path)
    assert isinstance(splits, datasets.DatasetDict)
    assert list(splits) == ["train", "validation", "test"]
    assert [len(splits[name]) for name in splits] == [5, 2, 3]
    assert splits["train"][0]["text"] == "document 0\nsecond line"  # one document per JSON line
    assert splits["test"]["text"] == ["line one", "line two", "line three"]  # one row per text line


def test_load_individual_files_json_array_and_parquet(tmp_path):
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(4)]
    (tmp_path / "chat.json").write_text(json.dumps(rows), encoding="utf-8")
    datasets.Dataset.from_list(rows[:2]).to_parquet(str(tmp_path / "val.parquet"))
    splits = load_lm_splits(train=tmp_path / "chat.json", validation=tmp_path / "val.parquet")
    assert list(splits) == ["train", "validation"]
    assert splits["train"][3] == rows[3]
    assert splits["validation"]["prompt"] == ["q0", "q1"]
    only_train = load_lm_splits(tmp_path / "chat.json")  # a single file is the training split
    assert list(only_train) == ["train"] and len(only_train["train"]) == 4


def test_load_text_field_selects_one_column(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"body": "some words", "label": 1}, {"body": "more", "label": 0}])
    with pytest.raises(DataError, match="cannot tell the causal-LM format"):
        load_lm_splits(tmp_path)  # body + label: no known text column
    splits = load_lm_splits(tmp_path, text_field="body")
    assert splits["train"].column_names == ["text"]
    assert splits["train"]["text"] == ["some words", "more"]
    with pytest.raises(DataError, match="no text field 'missing'"):
        load_lm_splits(tmp_path, text_field="missing")


def test_load_hub_name_without_network(monkeypatch):
    """Hub names go through datasets.load_dataset (stubbed here: tests never use the network)."""
    calls = []
    hub = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"text": ["a b", "c d"]}),
        valid=datasets.Dataset.from_dict({"text": ["e"]}),
    )

    def fake_load_dataset(path, config=None, **kwargs):
        calls.append((path, config))
        if path == "someone/corpus":
            return hub
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    splits = load_lm_splits("someone/corpus")
    assert list(splits) == ["train", "validation"] and splits["validation"]["text"] == ["e"]
    with pytest.raises(DataError) as excinfo:
        load_lm_splits("wikitext:wikitext-2-raw-v1")
    assert one_line_error(excinfo).startswith(
        "could not load 'wikitext:wikitext-2-raw-v1' from the Hugging Face hub"
    )
    assert calls[-1] == ("wikitext", "wikitext-2-raw-v1")


def test_load_errors(tmp_path):
    with pytest.raises(DataFileNotFoundError, match="data folder or file not found"):
        load_lm_splits(tmp_path / "nowhere" / "data.jsonl")
    with pytest.raises(DataFileNotFoundError, match="data file not found: .*missing.jsonl"):
        load_lm_splits(train=tmp_path / "missing.jsonl")

    no_train = tmp_path / "no_train"
    no_train.mkdir()
    write_jsonl(no_train / "validation.jsonl", [{"text": "a"}])
    with pytest.raises(DataFileNotFoundError, match="no training file in"):
        load_lm_splits(no_train)
    with pytest.raises(DataError, match="no training split"):
        load_lm_splits(validation=no_train / "validation.jsonl")
    with pytest.raises(DataError, match="no data given"):
        load_lm_splits()
    with pytest.raises(DataError, match="not both"):
        load_lm_splits(no_train, train=no_train / "validation.jsonl")

    empty = tmp_path / "empty"
    empty.mkdir()
    write_jsonl(empty / "train.jsonl", [{"text": "a"}])
    (empty / "validation.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(DataError) as excinfo:
        load_lm_splits(empty)
    assert one_line_error(excinfo).startswith("the validation split is empty")
    (tmp_path / "header_only.csv").write_text("text\n", encoding="utf-8")
    with pytest.raises(DataError, match="the train split is empty"):
        load_lm_splits(train=tmp_path / "header_only.csv")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(DataError, match="could not read .*bad.jsonl"):
        load_lm_splits(train=tmp_path / "bad.jsonl")
    (tmp_path / "notes.md").write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match="unsupported file extension '.md'"):
        load_lm_splits(train=tmp_path / "notes.md")


def test_load_classification_and_unknown_files(tmp_path):
    classification = write_csv(tmp_path / "sst.csv", [{"sentence": "great film", "label": 1}])
    with pytest.raises(DataError) as excinfo:
        load_lm_splits(train=classification)
    message = one_line_error(excinfo)
    assert "sst.csv looks like classification data" in message and "--task classification" in message

    unknown = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as excinfo:
        load_lm_splits(train=unknown)
    assert "(question, answer)" in one_line_error(excinfo)

    mixed_train = write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}])
    mixed_val = write_jsonl(tmp_path / "v.jsonl", [{"prompt": "p", "response": "r"}])
    with pytest.raises(DataError, match="all splits must share one format"):
        load_lm_splits(train=mixed_train, validation=mixed_val)


# ----------------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------------


def expected_stream(tok, docs: list[str]) -> list[int]:
    stream: list[int] = []
    for doc in docs:
        if doc.strip():
            stream += tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return stream


@pytest.mark.parametrize("block_size", [1, 7, 16])
def test_packing_blocks_equal_the_token_stream(tok, block_size):
    stream = expected_stream(tok, DOCS)
    assert stream.count(tok.eos_token_id) == 5  # the empty document adds nothing
    packed = tokenize_text_blocks(datasets.Dataset.from_dict({"text": DOCS}), tok, block_size)
    assert packed.column_names == ["input_ids", "attention_mask", "labels"]
    blocks = packed["input_ids"]
    assert len(blocks) == len(stream) // block_size
    assert all(len(block) == block_size for block in blocks)
    assert sum(blocks, []) == stream[: len(blocks) * block_size]  # the remainder is dropped
    assert packed["labels"] == blocks
    assert all(mask == [1] * block_size for mask in packed["attention_mask"])


def test_packing_short_split_keeps_one_block(tok):
    stream = expected_stream(tok, DOCS[:2])
    packed = tokenize_text_blocks(datasets.Dataset.from_dict({"text": DOCS[:2]}), tok, len(stream) + 50)
    assert packed["input_ids"] == [stream]
    assert packed["labels"] == [stream]
    with pytest.raises(DataError, match="every document of the split is empty"):
        tokenize_text_blocks(datasets.Dataset.from_dict({"text": ["", "  "]}), tok, 8)
    with pytest.raises(DataError, match="needs a 'text' column"):
        tokenize_text_blocks(datasets.Dataset.from_dict({"body": ["a"]}), tok, 8)


def test_bos_detection_and_resolution(tok, bos_tok):
    assert not tokenizer_adds_bos(tok) and resolve_bos(tok) is None and resolve_bos(None) is None
    assert tokenizer_adds_bos(bos_tok) and resolve_bos(bos_tok) == bos_tok.bos_token_id
    assert resolve_bos(bos_tok, False) is None and resolve_bos(bos_tok, True) == bos_tok.bos_token_id
    # a BOS token that a plain encode does not add (SmolLM2's <|im_start|>): auto leaves it out
    named = tiny_tokenizer()
    named.add_special_tokens({"bos_token": "<|im_start|>"})
    assert named("a")["input_ids"][0] != named.bos_token_id
    assert not tokenizer_adds_bos(named) and resolve_bos(named) is None
    assert resolve_bos(named, True) == named.bos_token_id
    with pytest.raises(DataError, match="no beginning-of-sequence token"):
        resolve_bos(tok, True)


@pytest.mark.parametrize("block_size", [2, 7, 16])
def test_packed_blocks_start_with_bos_when_the_tokenizer_adds_one(tok, bos_tok, block_size):
    bos = bos_tok.bos_token_id
    stream = expected_stream(bos_tok, DOCS)
    assert stream == expected_stream(tok, DOCS)  # the same text tokens: only <bos> differs
    packed = tokenize_text_blocks(datasets.Dataset.from_dict({"text": DOCS}), bos_tok, block_size)
    blocks = packed["input_ids"]
    assert len(blocks) == len(stream) // (block_size - 1)
    for block, labels, mask in zip(blocks, packed["labels"], packed["attention_mask"], strict=True):
        assert len(block) == block_size and block[0] == bos and bos not in block[1:]
        assert labels == [-100, *block[1:]]
        assert mask == [1] * block_size
    text = [token for block in blocks for token in block[1:]]
    assert text == stream[: len(text)]  # every text token once, in order
    assert len(stream) - len(text) < block_size - 1  # only the remainder shorter than a block is dropped

    # bos=False gives the plain packing, bos=True the automatic one; the plain tokenizer adds none
    docs = datasets.Dataset.from_dict({"text": DOCS})
    plain = tokenize_text_blocks(docs, tok, block_size)
    assert tokenize_text_blocks(docs, bos_tok, block_size, bos=False)["input_ids"] == plain["input_ids"]
    assert tokenize_text_blocks(docs, bos_tok, block_size, bos=True)["input_ids"] == blocks
    assert all(tok.bos_token_id is None and block[:1] != [bos] for block in plain["input_ids"])


def test_packing_with_bos_short_split_and_errors(bos_tok):
    bos = bos_tok.bos_token_id
    stream = expected_stream(bos_tok, DOCS[:2])
    docs = datasets.Dataset.from_dict({"text": DOCS[:2]})
    packed = tokenize_text_blocks(docs, bos_tok, len(stream) + 50)
    assert packed["input_ids"] == [[bos, *stream]]
    assert packed["labels"] == [[-100, *stream]]
    exact = tokenize_text_blocks(docs, bos_tok, len(stream) + 1)  # one block holds <bos> and the whole stream
    assert exact["input_ids"] == [[bos, *stream]]
    with pytest.raises(DataError, match="at least 2"):
        tokenize_text_blocks(docs, bos_tok, 1)
    assert tokenize_text_blocks(docs, bos_tok, 1, bos=False)["input_ids"] == [[token] for token in stream]
    with pytest.raises(DataError, match="no beginning-of-sequence token"):
        tokenize_text_blocks(docs, tiny_tokenizer(), 8, bos=True)


# ----------------------------------------------------------------------------------------------------
# Chat rendering
# ----------------------------------------------------------------------------------------------------


CHAT_ROWS = {
    "messages": {"messages": MESSAGES},
    "conversations": {"conversations": CONVERSATIONS},
}


@pytest.mark.parametrize("fmt", ["messages", "conversations"])
def test_chat_labels_are_exactly_the_assistant_turns(tok, fmt):
    encoded = tokenize_chat(datasets.Dataset.from_list([CHAT_ROWS[fmt]]), tok, 512, fmt)
    row = encoded[0]
    assert row["input_ids"] == tok.apply_chat_template(MESSAGES, tokenize=True)["input_ids"]
    assert row["attention_mask"] == [1] * len(row["input_ids"])
    decoded = [tok.decode(span) for span in labelled_spans(row)]
    assert decoded == [assistant + END for _, assistant in TURNS]
    labelled_text = "".join(decoded)
    for text in (SYSTEM, *(user for user, _ in TURNS), "<|im_start|>", "user", "system"):
        assert text not in labelled_text
    assert encoded.num_dropped == 0


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": "what is two plus two?", "response": "four."},
        {"instruction": "what is two plus two?", "output": "four."},
        {"instruction": "what is", "input": "two plus two?", "output": "four."},
    ],
)
def test_prompt_response_labels(tok, row):
    encoded = tokenize_chat(datasets.Dataset.from_list([row]), tok, 512, "prompt_response")[0]
    assert [tok.decode(span) for span in labelled_spans(encoded)] == ["four." + END]
    user = "what is\n\ntwo plus two?" if "input" in row else "what is two plus two?"
    assert tok.decode(encoded["input_ids"]) == (
        f"<|im_start|>user\n{user}{END}\n<|im_start|>assistant\nfour.{END}\n"
    )


def test_three_formats_give_identical_tokens(tok):
    single = MESSAGES[:3]  # system, user, assistant
    rows = {
        "messages": {"messages": single},
        "conversations": {"conversations": CONVERSATIONS[:3]},
        "prompt_response": {"system": SYSTEM, "prompt": TURNS[0][0], "response": TURNS[0][1]},
    }
    encoded = {
        fmt: tokenize_chat(datasets.Dataset.from_list([row]), tok, 512, fmt)[0] for fmt, row in rows.items()
    }
    assert encoded["messages"] == encoded["conversations"] == encoded["prompt_response"]
    alpaca = {"system": SYSTEM, "instruction": TURNS[0][0], "input": "", "output": TURNS[0][1]}
    assert (
        tokenize_chat(datasets.Dataset.from_list([alpaca]), tok, 512, "prompt_response")[0]
        == encoded["messages"]
    )
    # multi-turn: messages and ShareGPT agree too
    multi = {
        fmt: tokenize_chat(datasets.Dataset.from_list([row]), tok, 512, fmt)[0]
        for fmt, row in CHAT_ROWS.items()
    }
    assert multi["messages"] == multi["conversations"]


def test_truncation_keeps_labels_aligned_and_drops_rows_without_labels(tok, caplog):
    full = encode_chat(tok, MESSAGES)
    spans = labelled_spans(full)
    # cut in the middle of the second assistant turn, three tokens before its end
    cut = max(i for i, label in enumerate(full["labels"]) if label != -100) - 2
    rows = [{"messages": MESSAGES}, {"messages": [{"role": "user", "content": "x " * 80}, MESSAGES[2]]}]
    with caplog.at_level(logging.WARNING, logger="aptune.data.causal_lm"):
        encoded = tokenize_chat(datasets.Dataset.from_list(rows), tok, cut, "messages")
    assert len(encoded) == 1 and encoded.num_dropped == 1
    assert "dropped 1 of 2 chat rows" in caplog.text
    row = encoded[0]
    assert row["input_ids"] == full["input_ids"][:cut]
    assert row["labels"] == full["labels"][:cut]
    truncated_spans = labelled_spans(row)
    assert truncated_spans[0] == spans[0]
    assert truncated_spans[1] == spans[1][: len(truncated_spans[1])] and len(truncated_spans[1]) < len(
        spans[1]
    )


def test_chat_errors(tok):
    rows = [{"messages": MESSAGES}, {"messages": [MESSAGES[0], MESSAGES[1]]}]
    with pytest.raises(DataError) as excinfo:
        tokenize_chat(datasets.Dataset.from_list(rows), tok, 128, "messages")
    assert one_line_error(excinfo).startswith("row 1 has no assistant turn")

    bad_speaker = [{"conversations": [{"from": "robot", "value": "hi"}]}]
    with pytest.raises(DataError, match=r"^row 0: conversations\[0\]: unknown from 'robot'"):
        tokenize_chat(datasets.Dataset.from_list(bad_speaker), tok, 128, "conversations")

    plain = tiny_tokenizer(chat_template=False)
    for call in (
        lambda: tokenize_chat(datasets.Dataset.from_list(rows[:1]), plain, 128, "messages"),
        lambda: encode_lm_splits(
            datasets.DatasetDict(train=datasets.Dataset.from_list(rows[:1])), plain, max_length=64
        ),
    ):
        with pytest.raises(DataError) as excinfo:
            call()
        message = one_line_error(excinfo)
        assert message.startswith("the tokenizer has no chat template;")
        assert "pass --tokenizer with one or use plain text" in message


def test_template_breaking_the_prefix_property_is_an_error(tok):
    counting = tiny_tokenizer()
    # the header counts the messages, so a shorter rendering is no prefix of a longer one
    counting.chat_template = "{{ messages | length }}\n" + tok.chat_template
    with pytest.raises(DataError) as excinfo:
        tokenize_chat(datasets.Dataset.from_list([{"messages": MESSAGES}]), counting, 128, "messages")
    message = one_line_error(excinfo)
    assert message.startswith(
        "row 0: the tokenizer's chat template does not render conversations incrementally"
    )


@pytest.mark.parametrize("template_bos", [True, False])
def test_chat_rows_get_the_template_bos_and_never_a_second(tok, bos_tok, template_bos):
    bos = bos_tok.bos_token_id
    with_bos = tiny_bos_tokenizer(chat_template=False)
    with_bos.chat_template = ("{{ bos_token }}" if template_bos else "") + tok.chat_template
    rows = datasets.Dataset.from_list([CHAT_ROWS["messages"], {"messages": MESSAGES[1:3]}])
    splits = datasets.DatasetDict(train=rows)
    runs = [
        (tokenize_chat(rows, with_bos, 512, "messages"), tokenize_chat(rows, tok, 512, "messages")),
        # bos forced on: it concerns plain-text blocks only, chat rows keep the template's tokens
        (
            encode_lm_splits(splits, with_bos, max_length=512, bos=True)["train"],
            encode_lm_splits(splits, tok, max_length=512)["train"],
        ),
    ]
    for encoded, plain in runs:
        for row, reference in zip(encoded, plain, strict=True):
            ids, labels = list(row["input_ids"]), list(row["labels"])
            head = [bos] if template_bos else []
            assert ids == head + list(reference["input_ids"])  # one <bos> from the template, or none
            assert labels == [-100] * len(head) + list(reference["labels"])
            assert ids.count(bos) == len(head)


def test_bos_blocks_through_splits_and_batches(bos_tok, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": doc} for doc in DOCS])
    write_jsonl(tmp_path / "validation.jsonl", [{"text": doc} for doc in DOCS[:2]])
    encoded = encode_lm_splits(load_lm_splits(tmp_path), bos_tok, max_length=8)
    for split in ("train", "validation"):
        batch = next(iter(make_lm_dataloader(encoded[split], 4, collate_fn=lm_collator(bos_tok))))
        assert batch["input_ids"][:, 0].eq(bos_tok.bos_token_id).all()
        assert batch["labels"][:, 0].eq(-100).all()
        assert torch.equal(batch["labels"][:, 1:], batch["input_ids"][:, 1:])


# ----------------------------------------------------------------------------------------------------
# Splits, collation, loading batches
# ----------------------------------------------------------------------------------------------------


def test_encode_splits_and_batches(tok, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": doc} for doc in DOCS])
    write_jsonl(tmp_path / "validation.jsonl", [{"text": doc} for doc in DOCS[:2]])
    encoded = encode_lm_splits(load_lm_splits(tmp_path), tok, max_length=8)
    assert set(encoded) == {"train", "validation"}
    item = encoded["train"][0]
    assert isinstance(item["input_ids"], torch.Tensor) and item["input_ids"].shape == (8,)
    loader = make_lm_dataloader(encoded["train"], 4, collate_fn=lm_collator(tok))
    batch = next(iter(loader))
    assert batch["input_ids"].shape == batch["labels"].shape == (4, 8)
    assert torch.equal(batch["input_ids"], batch["labels"])

    chat_rows = [{"messages": MESSAGES}, {"messages": MESSAGES[:3]}, {"messages": MESSAGES[1:3]}]
    chat = encode_lm_splits(
        datasets.DatasetDict(train=datasets.Dataset.from_list(chat_rows)), tok, max_length=512
    )
    lengths = [len(row["input_ids"]) for row in chat["train"]]
    batch = lm_collator(tok)([chat["train"][i] for i in range(3)])
    assert batch["input_ids"].shape == (3, max(lengths)) and batch["input_ids"].dtype == torch.int64
    for i, length in enumerate(lengths):
        assert batch["attention_mask"][i].tolist() == [1] * length + [0] * (max(lengths) - length)
        assert batch["input_ids"][i, length:].eq(tok.pad_token_id).all()
        assert batch["labels"][i, length:].eq(-100).all()
        assert torch.equal(batch["labels"][i, :length], chat["train"][i]["labels"])

    shuffled = [
        [
            b["input_ids"].tolist()
            for b in make_lm_dataloader(chat["train"], 1, shuffle=True, seed=3, collate_fn=lm_collator(tok))
        ]
        for _ in range(2)
    ]
    assert shuffled[0] == shuffled[1]


def test_collator_without_pad_token_pads_with_eos():
    tok = tiny_tokenizer()
    tok.pad_token = None
    assert tok.pad_token_id is None
    collate = lm_collator(tok)
    assert tok.pad_token_id is None  # the caller's tokenizer is unchanged
    batch = collate(
        [
            {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [5, 6, 7]},
            {"input_ids": [9], "attention_mask": [1], "labels": [-100]},
        ]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [9, tok.eos_token_id, tok.eos_token_id]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [-100, -100, -100]]


@pytest.mark.skipif(not BROWN.is_dir(), reason="shared Brown corpus not present")
def test_brown_folder(tok):
    splits = load_lm_splits(BROWN)
    assert {name: len(split) for name, split in splits.items()} == {
        "train": 450,
        "validation": 25,
        "test": 25,
    }
    assert set(splits["train"].column_names) == {"id", "genre", "text"}
    packed = tokenize_text_blocks(splits["validation"], tok, 256)
    assert len(packed) > 10
    assert all(len(block) == 256 for block in packed["input_ids"])
    stream = expected_stream(tok, splits["validation"]["text"])
    assert sum(packed["input_ids"], []) == stream[: len(packed) * 256]
