"""Causal language-model data: loading, format detection, packing, chat rendering with assistant-only loss.

Everything is built on Hugging Face ``datasets``: files and hub data sets load with
:func:`datasets.load_dataset`, tokenisation runs through :meth:`datasets.Dataset.map`, and batches are padded
with transformers' :class:`~transformers.DataCollatorForSeq2Seq`.

Loading (:func:`load_lm_splits`)
    A folder holding ``train.*``, ``validation.*`` (or ``dev.*``) and ``test.*`` files, single files per split,
    or a hub name. File endings: ``.jsonl``, ``.json`` (JSON lines or one array of objects), ``.csv``,
    ``.tsv``, ``.parquet`` and ``.txt``. A ``.txt`` file loads with the ``text`` builder: one *line* per row
    (blank lines give empty rows, which packing skips). A JSON lines file with a ``text`` field keeps one
    *document* per row, whatever newlines the text holds: the Brown corpus files under
    ``shared/data/brown/*.jsonl`` (fields ``id``, ``genre``, ``text``; 450/25/25 documents of a few
    paragraphs each) load as one row per document, and their ``id``/``genre`` columns are ignored.

Formats (:data:`LM_FORMATS`, :func:`detect_lm_format`)
    ``text``: a ``text`` column of plain documents, packed into fixed-size blocks
    (:func:`tokenize_text_blocks`). ``messages``: a list of ``{"role", "content"}``. ``conversations``:
    ShareGPT, a list of ``{"from", "value"}`` with ``from`` in human/gpt/system (user/assistant also
    accepted). ``prompt_response``: ``prompt`` + ``response`` (or ``completion``), or Alpaca's
    ``instruction`` + ``output`` with an optional ``input`` appended to the instruction after a blank line;
    an optional ``system`` column becomes a system turn. The three chat formats are rendered with the
    tokenizer's chat template and train only on the assistant turns (:func:`tokenize_chat`).

Beginning-of-sequence token (:func:`resolve_bos`)
    Models whose tokenizer puts a BOS token first on a plain encode (Gemma, LLaMA 2 and 3, ...) are
    trained and evaluated with it first in every sequence: packed plain-text blocks start with ``<bos>``
    (``bos=None``, the default, means exactly when the tokenizer adds one; ``True``/``False`` force it). A
    tokenizer that adds none (GPT-2, Qwen, SmolLM2) gets the blocks it always got. Chat rows are what the chat
    template renders: a template that writes ``<bos>`` (Gemma's, LLaMA 3's) gives one, none is added.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch.utils.data import DataLoader

from aptune.data.classification import (
    PAIR_TEXT_FIELDS,
    SINGLE_TEXT_FIELDS,
    _quiet_datasets,
    find_split_files,
    load_hub_splits,
    looks_like_hub_name,
    make_dataloader,
)
from aptune.data.errors import DataError, DataFileNotFoundError

if TYPE_CHECKING:  # datasets is imported lazily: importing aptune.data does not need it
    from datasets import Dataset, DatasetDict

logger = logging.getLogger(__name__)

LM_FORMATS: tuple[str, ...] = ("text", "messages", "prompt_response", "conversations")
"""The causal-LM data formats :func:`detect_lm_format` recognises."""

LM_SPLITS: tuple[str, ...] = ("train", "validation", "test")
"""The split names :func:`load_lm_splits` returns, in order."""

LM_EXTENSIONS: dict[str, tuple[str, dict[str, Any]]] = {
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"sep": "\t"}),
    ".parquet": ("parquet", {}),
    ".txt": ("text", {}),
}
"""File ending -> (``datasets`` builder, builder options) used by :func:`load_lm_splits`."""

IGNORE_INDEX = -100
"""The label of tokens that carry no loss (prompt, user and system tokens, padding)."""

ROLE_ALIASES: dict[str, str] = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
}
"""Accepted speaker names (``role`` of ``messages``, ``from`` of ShareGPT ``conversations``) -> chat role."""

_HUB_SPLIT_ALIASES: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "validation": ("validation", "valid", "dev"),
    "test": ("test",),
}
_PROMPT_PAIRS: tuple[tuple[str, str], ...] = (
    ("prompt", "response"),
    ("prompt", "completion"),
    ("instruction", "output"),
)
_LABEL_COLUMNS = ("label", "labels")
_CLASSIFICATION_TEXT_COLUMNS = frozenset(
    [*SINGLE_TEXT_FIELDS, *(name for pair in PAIR_TEXT_FIELDS for name in pair)]
)
_ACCEPTED = (
    "'text', 'messages' (role/content), 'conversations' (ShareGPT from/value), "
    "'prompt'+'response' or 'instruction'+'output' (+'input')"
)


# ----------------------------------------------------------------------------------------------------
# Format detection and chat messages
# ----------------------------------------------------------------------------------------------------


def detect_lm_format(columns: Iterable[str], *, source: str = "the data") -> str:
    """Tells which of :data:`LM_FORMATS` a data set with these columns holds.

    Tried in order: ``messages``; ``conversations``; ``prompt`` + ``response`` (or ``completion``), or
    ``instruction`` + ``output`` -> ``"prompt_response"``; ``text``. Columns a format does not use are
    ignored.

    Args:
        columns: The column names.
        source: Names the data (a file, a hub name) in error messages.

    Raises:
        DataError: if the data looks like text classification (a ``label`` column beside a text column
            such as ``text``, ``sentence`` or ``premise``, and no chat column), or matches no format.
    """
    names = list(columns)
    present = set(names)
    chat = None
    if "messages" in present:
        chat = "messages"
    elif "conversations" in present:
        chat = "conversations"
    elif any(first in present and second in present for first, second in _PROMPT_PAIRS):
        chat = "prompt_response"
    if chat is not None:
        return chat
    if present & set(_LABEL_COLUMNS) and present & _CLASSIFICATION_TEXT_COLUMNS:
        raise DataError(
            f"{source} looks like classification data (columns: {', '.join(names)}); "
            f"use --task classification, or name the column to model as plain text (text_field)"
        )
    if "text" in present:
        return "text"
    raise DataError(
        f"{source}: cannot tell the causal-LM format from its columns ({', '.join(names) or 'none'}); "
        f"expected {_ACCEPTED}"
    )


def _string(row: Mapping[str, Any], field: str) -> str:
    value = row.get(field)
    if not isinstance(value, str):
        raise DataError(f"field {field!r} must be a string, got {value!r}")
    return value


def _turns(value: Any, field: str, role_key: str, content_key: str) -> list[dict[str, str]]:
    if not isinstance(value, list | tuple):
        raise DataError(f"field {field!r} must be a list of {{{role_key}, {content_key}}}, got {value!r}")
    messages = []
    for position, turn in enumerate(value):
        if not isinstance(turn, Mapping):
            raise DataError(f"{field}[{position}] must be an object with {role_key!r} and {content_key!r}")
        speaker, content = turn.get(role_key), turn.get(content_key)
        role = ROLE_ALIASES.get(speaker.lower()) if isinstance(speaker, str) else None
        if role is None:
            raise DataError(
                f"{field}[{position}]: unknown {role_key} {speaker!r} (accepted: {', '.join(ROLE_ALIASES)})"
            )
        if not isinstance(content, str):
            raise DataError(f"{field}[{position}]: {content_key!r} must be a string, got {content!r}")
        messages.append({"role": role, "content": content})
    return messages


def to_messages(row: Mapping[str, Any], fmt: str) -> list[dict[str, str]]:
    """Converts one chat record to a list of ``{"role", "content"}`` with roles system, user and assistant.

    ``messages`` keeps only each turn's role and content; ``conversations`` maps ShareGPT's ``from``
    (human -> user, gpt -> assistant, system) and ``value``; ``prompt_response`` gives an optional system
    turn (``system`` column, when not empty), a user turn (``prompt``, or ``instruction`` followed by a blank
    line and ``input`` when ``input`` is not empty) and an assistant turn (``response``, ``completion`` or
    ``output``).

    Raises:
        DataError: for the ``text`` format, a missing or non-string field, or an unknown speaker.
    """
    if fmt == "messages":
        return _turns(row.get("messages"), "messages", "role", "content")
    if fmt == "conversations":
        return _turns(row.get("conversations"), "conversations", "from", "value")
    if fmt == "prompt_response":
        messages = []
        system = row.get("system")
        if isinstance(system, str) and system:
            messages.append({"role": "system", "content": system})
        if row.get("instruction") is not None and row.get("output") is not None:
            prompt = _string(row, "instruction")
            extra = row.get("input")
            if isinstance(extra, str) and extra.strip():
                prompt = f"{prompt}\n\n{extra}"
            answer = _string(row, "output")
        else:
            prompt = _string(row, "prompt")
            answer = _string(row, "response" if row.get("response") is not None else "completion")
        messages.append({"role": "user", "content": prompt})
        messages.append({"role": "assistant", "content": answer})
        return messages
    if fmt == "text":
        raise DataError("plain-text rows have no chat messages; use tokenize_text_blocks for format 'text'")
    raise DataError(f"unknown causal-LM format {fmt!r}; expected one of {', '.join(LM_FORMATS)}")


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _has_content(path: Path) -> bool:
    """True unless the file holds only whitespace (reads no further than the first other byte)."""
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 16):
            if chunk.strip():
                return True
    return False


def _load_file(split: str, path: str | os.PathLike[str]) -> Dataset:
    import datasets

    path = Path(path).expanduser()
    if not path.exists():
        raise DataFileNotFoundError(f"data file not found: {path}")
    if path.is_dir():
        raise DataError(f"{path} is a directory, expected a data file ({', '.join(LM_EXTENSIONS)})")
    suffix = path.suffix.lower()
    if suffix not in LM_EXTENSIONS:
        raise DataError(
            f"unsupported file extension {path.suffix or '(none)'!r} for {path}; "
            f"expected one of {', '.join(LM_EXTENSIONS)}"
        )
    if not _has_content(path):
        raise DataError(f"the {split} split is empty: {path} has no data rows")
    builder, options = LM_EXTENSIONS[suffix]
    try:
        # quiet, and through a throw-away cache: an edited file is never served from a stale cache entry
        with _quiet_datasets(), tempfile.TemporaryDirectory(prefix="aptune-data-") as cache:
            loaded = datasets.load_dataset(
                builder,
                data_files={split: str(path)},
                split=split,
                cache_dir=cache,
                keep_in_memory=True,
                **options,
            )
    except Exception as exc:  # malformed JSON/CSV, header-only CSV, ...: one clear line naming the file
        if builder == "csv" and "corresponds to no data" in str(exc):
            raise DataError(f"the {split} split is empty: {path} has no data rows") from exc
        raise DataError(f"could not read {path}: {_first_line(exc)}") from exc
    if len(loaded) == 0:
        raise DataError(f"the {split} split is empty: {path} has no data rows")
    return loaded


def _load_hub(name: str) -> dict[str, Dataset]:
    loaded = load_hub_splits(name)
    splits: dict[str, Dataset] = {}
    for split, aliases in _HUB_SPLIT_ALIASES.items():
        hub_split = next((alias for alias in aliases if alias in loaded), None)
        if hub_split is None:
            continue
        if len(loaded[hub_split]) == 0:
            raise DataError(f"the {split} split of '{name}' ({hub_split}) is empty")
        splits[split] = loaded[hub_split]
    return splits


def _select_text_field(dataset: Dataset, text_field: str, source: str) -> Dataset:
    if text_field not in dataset.column_names:
        raise DataError(
            f"{source}: no text field {text_field!r} (columns: {', '.join(dataset.column_names)})"
        )
    dataset = dataset.select_columns([text_field])
    return dataset if text_field == "text" else dataset.rename_column(text_field, "text")


def load_dataset_splits(
    data: str | os.PathLike[str] | None = None,
    *,
    train: str | os.PathLike[str] | None = None,
    validation: str | os.PathLike[str] | None = None,
    test: str | os.PathLike[str] | None = None,
) -> tuple[dict[str, Dataset], dict[str, str]]:
    """The splits a user named, as ``datasets`` data sets, and where each came from (for messages).

    The file mechanics shared by every task that reads rows of named columns (causal LM, extractive QA,
    seq2seq): either ``data`` (a folder of ``train``/``validation`` (or ``dev``)/``test`` files, one file taken
    as the training split, or a hub name) or the split files, not both. The caller checks the columns.

    Raises:
        DataFileNotFoundError: a missing folder or file, or a folder without a training file.
        DataError: no data or both kinds given, no training split, an empty split or an unreadable file.
    """
    sources: dict[str, str] = {}
    splits: dict[str, Dataset] = {}
    files = {"train": train, "validation": validation, "test": test}
    if data is None:
        if all(path is None for path in files.values()):
            raise DataError(
                "no data given: name a data folder or set, or pass --train/--validation/--test files"
            )
        if train is None:
            raise DataError("no training split: pass a training file (--train)")
        for split, path in files.items():
            if path is not None:
                splits[split] = _load_file(split, path)
                sources[split] = str(path)
    else:
        if any(path is not None for path in files.values()):
            raise DataError(
                "give either a data folder or set, or split files (--train/--validation/--test), not both"
            )
        name = os.fspath(data)
        path = Path(name).expanduser()
        if path.is_dir():
            for split, file in find_split_files(path, tuple(LM_EXTENSIONS)).items():
                splits[split] = _load_file(split, file)
                sources[split] = str(file)
        elif path.exists():
            splits["train"] = _load_file("train", path)
            sources["train"] = str(path)
        elif looks_like_hub_name(name):
            splits = _load_hub(name)
            sources = {split: f"'{name}' [{split}]" for split in splits}
            if "train" not in splits:
                raise DataError(f"'{name}' has no training split (splits: {', '.join(splits) or 'none'})")
        else:
            raise DataFileNotFoundError(f"data folder or file not found: {name}")

    return splits, sources


def load_lm_splits(
    data: str | os.PathLike[str] | None = None,
    *,
    train: str | os.PathLike[str] | None = None,
    validation: str | os.PathLike[str] | None = None,
    test: str | os.PathLike[str] | None = None,
    text_field: str | None = None,
) -> DatasetDict:
    """Loads causal-LM data as a :class:`datasets.DatasetDict` with splits among train, validation, test.

    Either ``data`` or the split files are given, not both. ``data`` is, in this order: an existing folder
    holding ``train.*``, ``validation.*`` (or ``dev.*``) and ``test.*`` files (only ``train`` is required;
    when two files share a stem the first ending of :data:`LM_EXTENSIONS` wins); an existing file, loaded as
    the training split; or a hub name (``name``, ``owner/name``, ``name/config`` or ``name:config``; its
    ``validation``/``valid``/``dev`` split is the validation split). See the module docstring for the file
    formats. Every split's columns must match one of :data:`LM_FORMATS`, the same as the training split's.

    Args:
        data: A folder, a file or a hub name.
        train: Training file.
        validation: Optional validation file.
        test: Optional test file.
        text_field: Model this column as plain text: each split keeps only it, renamed ``text`` (format
            ``"text"``). Use it for a document column not called ``text`` or to skip format detection.

    Raises:
        DataFileNotFoundError: a missing folder or file, or a folder without a training file.
        DataError: no data or both kinds given, no training split, an empty split, an unreadable file, a
            missing ``text_field``, or columns of no known format (classification data included).
    """
    import datasets

    splits, sources = load_dataset_splits(data, train=train, validation=validation, test=test)
    if text_field is not None:
        splits = {split: _select_text_field(ds, text_field, sources[split]) for split, ds in splits.items()}
    train_format = detect_lm_format(splits["train"].column_names, source=sources["train"])
    for split, dataset in splits.items():
        fmt = detect_lm_format(dataset.column_names, source=sources[split])
        if fmt != train_format:
            raise DataError(
                f"{sources[split]} holds {fmt!r} data but the training split holds {train_format!r}; "
                f"all splits must share one format"
            )
    return datasets.DatasetDict({split: splits[split] for split in LM_SPLITS if split in splits})


# ----------------------------------------------------------------------------------------------------
# Tokenisation: plain-text packing
# ----------------------------------------------------------------------------------------------------


def _eos_id(tokenizer: Any, why: str) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if not isinstance(eos, int):
        raise DataError(f"the tokenizer has no end-of-sequence token; {why}")
    return eos


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """True when the tokenizer puts its BOS token first on a plain encode (``tokenizer(text)``).

    Checked on a one-letter text: the encoding with the default special tokens starts with ``bos_token_id``
    and the encoding without them does not. Gemma's, LLaMA 2's and 3's tokenizers add one; GPT-2's, Qwen's
    and SmolLM2's do not (SmolLM2 has a BOS token, ``<|im_start|>``, but never adds it).
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if not isinstance(bos, int):
        return False
    default = list(tokenizer("a", verbose=False)["input_ids"])
    plain = list(tokenizer("a", add_special_tokens=False, verbose=False)["input_ids"])
    return default[:1] == [bos] and plain[:1] != [bos]


def resolve_bos(tokenizer: Any, bos: bool | None = None) -> int | None:
    """The token id to put first in packed blocks and perplexity windows, or None for none.

    ``bos=None`` (auto): the tokenizer's BOS token when :func:`tokenizer_adds_bos` (none for a None
    tokenizer); ``True``: its BOS token in any case; ``False``: none.

    Raises:
        DataError: ``bos=True`` and the tokenizer has no BOS token.
    """
    if bos is None:
        return tokenizer.bos_token_id if tokenizer is not None and tokenizer_adds_bos(tokenizer) else None
    if not bos:
        return None
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if not isinstance(bos_id, int):
        raise DataError("bos=True but the tokenizer has no beginning-of-sequence token")
    return bos_id


def tokenize_text_blocks(
    dataset: Dataset,
    tokenizer: Any,
    block_size: int,
    *,
    num_proc: int | None = None,
    bos: bool | None = None,
) -> Dataset:
    """Tokenizes plain documents and packs them into blocks of ``block_size`` tokens (GPT-2/run_clm style).

    Each document of the ``text`` column is tokenized without special tokens and followed by the EOS token;
    empty or whitespace-only documents (and missing values) are skipped. The token streams of the whole
    split are concatenated in row order and cut into consecutive pieces of ``block_size`` tokens, or of
    ``block_size - 1`` tokens when blocks start with a BOS token (see ``bos``): such a block is ``<bos>``
    followed by its piece, so it still holds ``block_size`` tokens, and the BOS is context only (label -100).
    Every text token of the kept pieces is in exactly one block; the remainder shorter than a piece is
    dropped. When the whole split is shorter than one piece, it is kept as a single shorter block rather
    than giving nothing (handy for tiny validation sets).

    Args:
        dataset: A :class:`datasets.Dataset` with a ``text`` column.
        tokenizer: A transformers tokenizer with an EOS token.
        block_size: Tokens per block (at least 2 with a BOS).
        num_proc: Processes for the tokenizing :meth:`~datasets.Dataset.map`.
        bos: Put the tokenizer's BOS token first in every block: None (default) when the tokenizer adds one
            to a plain encode (:func:`tokenizer_adds_bos`), or True/False to force it (:func:`resolve_bos`).

    Returns:
        A :class:`datasets.Dataset` with columns ``input_ids``, ``attention_mask`` (all ones) and
        ``labels`` (equal to ``input_ids``, except -100 at a leading BOS).

    Raises:
        DataError: no ``text`` column, no EOS token, no text at all, ``block_size`` below 2 with a BOS, or
            ``bos=True`` without a BOS token.
    """
    import datasets
    import pyarrow as pa

    if not isinstance(block_size, int) or block_size < 1:
        raise DataError(f"block_size must be a positive integer, got {block_size!r}")
    if "text" not in dataset.column_names:
        raise DataError(f"plain-text data needs a 'text' column (columns: {', '.join(dataset.column_names)})")
    eos = _eos_id(tokenizer, "packing needs one to separate documents")
    bos_id = resolve_bos(tokenizer, bos)
    piece = block_size if bos_id is None else block_size - 1
    if piece < 1:
        raise DataError("block_size must be at least 2 when blocks start with a BOS token")

    def tokenize(batch: dict[str, list[Any]]) -> dict[str, list[list[int]]]:
        docs = [doc for doc in batch["text"] if isinstance(doc, str) and doc.strip()]
        if not docs:
            return {"input_ids": []}
        encoded = tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]
        return {"input_ids": [ids + [eos] for ids in encoded]}

    tokenized = dataset.map(
        tokenize,
        batched=True,
        remove_columns=dataset.column_names,
        num_proc=num_proc,
        features=datasets.Features({"input_ids": datasets.List(datasets.Value("int64"))}),
        desc="Tokenizing documents",
    )
    column = tokenized.with_format("arrow")[:].column("input_ids")
    flat = [chunk.flatten() for chunk in column.chunks]
    values = pa.concat_arrays(flat).to_numpy() if flat else np.zeros(0, dtype=np.int64)
    if values.size == 0:
        raise DataError("no text to pack: every document of the split is empty")
    count = values.size // piece
    values = values.astype(np.int64, copy=False)
    pieces = values[None, :] if count == 0 else values[: count * piece].reshape(count, piece)
    ids = labels = pieces
    if bos_id is not None:
        first = np.full((len(pieces), 1), bos_id, dtype=np.int64)
        ids = np.concatenate([first, pieces], axis=1)
        labels = np.concatenate([np.full_like(first, IGNORE_INDEX), pieces], axis=1)
    offsets = pa.array(np.arange(0, ids.size + 1, ids.shape[1], dtype=np.int32))

    def blocks(array: np.ndarray) -> Any:
        return pa.ListArray.from_arrays(offsets, pa.array(array.ravel()))

    return datasets.Dataset.from_dict(
        {
            "input_ids": blocks(ids),
            "attention_mask": blocks(np.ones_like(ids)),
            "labels": blocks(labels),
        }
    )


# ----------------------------------------------------------------------------------------------------
# Tokenisation: chat rendering with assistant-only labels
# ----------------------------------------------------------------------------------------------------


def _require_chat_template(tokenizer: Any, fmt: str) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            f"the tokenizer has no chat template; chat data (format {fmt!r}) needs one: "
            f"pass --tokenizer with one or use plain text"
        )


def _special_ids(tokenizer: Any) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", None) or ())
    for token_id, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(token, "special", False):
            ids.add(int(token_id))
    return ids


def _render(
    tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool, row: int
) -> list[int]:
    try:
        encoded = tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=True
        )
    except Exception as exc:  # a template that rejects the conversation (role order, ...)
        raise DataError(
            f"row {row}: the chat template failed on this conversation: {_first_line(exc)}"
        ) from exc
    return list(encoded["input_ids"])


def _assistant_span(tokenizer: Any, span: list[int], special: set[int]) -> list[int]:
    """Drops whitespace-only tokens after the span's last special token (``<|im_end|>`` + ``"\\n"``)."""
    last = max((index for index, token in enumerate(span) if token in special), default=None)
    if last is None or last == len(span) - 1:
        return span
    if all(not tokenizer.decode([token]).strip() for token in span[last + 1 :]):
        return span[: last + 1]
    return span


def _prefix_error(row: int, turn: int) -> DataError:
    return DataError(
        f"row {row}: the tokenizer's chat template does not render conversations incrementally (the tokens "
        f"of the first {turn} turns are not a prefix of the tokens of the longer conversation), so the "
        f"assistant tokens cannot be found; use a tokenizer with another chat template or plain text"
    )


def encode_chat(
    tokenizer: Any, messages: list[dict[str, str]], max_length: int | None = None, *, row: int = 0
) -> dict[str, list[int]]:
    """Renders one conversation with the tokenizer's chat template; labels only the assistant turns.

    For each assistant turn ``i`` the template renders ``messages[:i]`` with the generation prompt and
    ``messages[:i + 1]`` without it; the tokens the second adds to the first are the turn's labelled tokens
    (its content and the end-of-turn token(s), e.g. ``<|im_end|>``; whitespace-only tokens the template
    emits after its last special token, such as ChatML's newline, are left unlabelled). Every shorter
    rendering must be a token prefix of the longer one and of the whole conversation. ``labels`` is
    ``IGNORE_INDEX`` (-100) everywhere else. The result is truncated to ``max_length`` tokens.

    Raises:
        DataError: naming ``row`` when there is no assistant turn, the template fails, or the prefix
            property does not hold.
    """
    if not any(message["role"] == "assistant" for message in messages):
        raise DataError(f"row {row} has no assistant turn; chat records need at least one assistant message")
    special = _special_ids(tokenizer)
    full = _render(tokenizer, messages, False, row)
    labels = [IGNORE_INDEX] * len(full)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:index], True, row)
        after = _render(tokenizer, messages[: index + 1], False, row)
        if after[: len(before)] != before or full[: len(after)] != after:
            raise _prefix_error(row, index)
        span = _assistant_span(tokenizer, after[len(before) :], special)
        labels[len(before) : len(before) + len(span)] = span
    if max_length is not None:
        full, labels = full[:max_length], labels[:max_length]
    return {"input_ids": full, "attention_mask": [1] * len(full), "labels": labels}


def tokenize_chat(dataset: Dataset, tokenizer: Any, max_length: int, fmt: str) -> Dataset:
    """Renders chat records with the tokenizer's chat template, with loss only on the assistant turns.

    Each row goes through :func:`to_messages` and :func:`encode_chat` (see it for the labelling rule) in a
    :meth:`~datasets.Dataset.map`, is truncated to ``max_length`` tokens, and rows left with no labelled
    token after truncation are dropped: their count is logged as a warning and kept in the returned data
    set's ``num_dropped`` attribute. The tokens are the template's alone: a BOS token is there only when the
    template writes one (Gemma's and LLaMA 3's do), never added a second time.

    Args:
        dataset: A :class:`datasets.Dataset` of chat records.
        tokenizer: A transformers tokenizer with a chat template.
        max_length: Most tokens per row.
        fmt: ``"messages"``, ``"conversations"`` or ``"prompt_response"``.

    Returns:
        A :class:`datasets.Dataset` with columns ``input_ids``, ``attention_mask`` and ``labels``.

    Raises:
        DataError: no chat template; a row (named by its index) with a bad record, no assistant turn, or a
            template that breaks the prefix property.
    """
    import datasets

    if fmt not in LM_FORMATS or fmt == "text":
        raise DataError(
            f"tokenize_chat needs a chat format (messages, conversations, prompt_response), got {fmt!r}"
        )
    if not isinstance(max_length, int) or max_length < 1:
        raise DataError(f"max_length must be a positive integer, got {max_length!r}")
    _require_chat_template(tokenizer, fmt)

    def encode(row: dict[str, Any], index: int) -> dict[str, Any]:
        try:
            messages = to_messages(row, fmt)
        except DataError as exc:
            raise DataError(f"row {index}: {exc}") from None
        encoded = encode_chat(tokenizer, messages, max_length, row=index)
        encoded["num_labelled"] = sum(label != IGNORE_INDEX for label in encoded["labels"])
        return encoded

    ids = datasets.List(datasets.Value("int64"))
    features = datasets.Features(
        {"input_ids": ids, "attention_mask": ids, "labels": ids, "num_labelled": datasets.Value("int64")}
    )
    encoded = dataset.map(
        encode,
        with_indices=True,
        remove_columns=dataset.column_names,
        features=features,
        desc="Rendering conversations",
    )
    kept = encoded.filter(lambda count: count > 0, input_columns="num_labelled").remove_columns(
        "num_labelled"
    )
    dropped = len(encoded) - len(kept)
    if dropped:
        logger.warning(
            "dropped %d of %d chat rows with no assistant token left after truncation to %d tokens",
            dropped,
            len(encoded),
            max_length,
        )
    kept.num_dropped = dropped
    return kept


# ----------------------------------------------------------------------------------------------------
# Splits, batching
# ----------------------------------------------------------------------------------------------------


def encode_lm_splits(
    splits: Mapping[str, Dataset],
    tokenizer: Any,
    *,
    max_length: int,
    fmt: str | None = None,
    bos: bool | None = None,
) -> dict[str, Dataset]:
    """Tokenizes every split: packing for ``"text"`` (blocks of ``max_length``), chat rendering otherwise.

    Args:
        splits: A :class:`datasets.DatasetDict` (or mapping of split name to data set) with a ``train``
            split when ``fmt`` is None.
        tokenizer: A transformers tokenizer.
        max_length: Block size for packing, most tokens per row for chat data.
        fmt: One of :data:`LM_FORMATS`; detected from the training split's columns when None.
        bos: Plain text only: a BOS token first in every packed block (see :func:`tokenize_text_blocks`;
            None: when the tokenizer adds one). Chat rows keep what the chat template renders.

    Returns:
        Split name -> :class:`datasets.Dataset` in torch format (``input_ids``, ``attention_mask``,
        ``labels``; chat data sets also carry ``num_dropped``).
    """
    if fmt is None:
        if "train" not in splits:
            raise DataError("cannot detect the data format without a training split; pass fmt")
        fmt = detect_lm_format(splits["train"].column_names, source="the training split")
    if fmt not in LM_FORMATS:
        raise DataError(f"unknown causal-LM format {fmt!r}; expected one of {', '.join(LM_FORMATS)}")
    if fmt != "text":
        _require_chat_template(tokenizer, fmt)
    encoded: dict[str, Dataset] = {}
    for name, dataset in splits.items():
        if fmt == "text":
            result = tokenize_text_blocks(dataset, tokenizer, max_length, bos=bos)
        else:
            result = tokenize_chat(dataset, tokenizer, max_length, fmt)
        result.set_format("torch", columns=["input_ids", "attention_mask", "labels"])
        encoded[name] = result
    return encoded


class LMCollator:
    """Pads causal-LM rows: ``input_ids`` with the pad id, ``attention_mask`` with 0, ``labels`` with -100.

    A thin wrapper of transformers' :class:`~transformers.DataCollatorForSeq2Seq` (no model, dynamic padding
    to the longest row, on the tokenizer's padding side, PyTorch tensors out) that first turns tensor or
    array values into lists, so rows of a torch-formatted :class:`datasets.Dataset` pad as fast as lists.
    """

    def __init__(self, tokenizer: Any) -> None:
        from transformers import DataCollatorForSeq2Seq

        self.tokenizer = tokenizer
        self.collator = DataCollatorForSeq2Seq(
            tokenizer, model=None, label_pad_token_id=IGNORE_INDEX, padding=True, return_tensors="pt"
        )

    def __call__(self, features: list[Mapping[str, Any]]) -> dict[str, Any]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        rows = [
            {key: value.tolist() if hasattr(value, "tolist") else value for key, value in feature.items()}
            for feature in features
        ]
        return dict(self.collator(rows))


def lm_collator(tokenizer: Any) -> LMCollator:
    """A collator that pads ``input_ids`` with the pad id, ``attention_mask`` with 0 and ``labels`` with -100.

    See :class:`LMCollator`; it takes rows of lists or tensors and returns a dict of ``(batch, longest)``
    int64 tensors. A tokenizer without a pad token pads with its EOS token (on a copy; the given tokenizer
    is not changed).

    Raises:
        DataError: if the tokenizer has neither a pad nor an EOS token.
    """
    if getattr(tokenizer, "pad_token_id", None) is None:
        _eos_id(tokenizer, "padding needs a pad or end-of-sequence token")
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.pad_token = tokenizer.eos_token
    return LMCollator(tokenizer)


def make_lm_dataloader(
    dataset: Any,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int | None = 0,
    collate_fn: Callable[[list[dict[str, Any]]], dict[str, Any]],
) -> DataLoader:
    """A DataLoader over an encoded split; ``seed`` fixes the shuffling order (see
    :func:`aptune.data.classification.make_dataloader`), ``collate_fn`` is usually :func:`lm_collator`."""
    return make_dataloader(dataset, batch_size, shuffle=shuffle, seed=seed, collate_fn=collate_fn)
