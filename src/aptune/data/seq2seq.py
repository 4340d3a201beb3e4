"""Sequence-to-sequence data (summarisation, translation, ...): source/target rows for encoder-decoder models.

Rows
    One source text and one target text per row. The columns are found by name (:data:`SEQ2SEQ_COLUMNS`, in
    order: ``source``/``target``, ``document``/``summary`` as in XSum, ``article``/``highlights`` as in
    CNN/DailyMail, ``src``/``tgt``), or named with ``text_fields=(source, target)`` (``--text-fields``).
    Files load as for the other tasks (:func:`aptune.data.causal_lm.load_dataset_splits`).

Encoding
    The source is tokenised (with an optional ``source_prefix`` such as T5's ``"summarize: "``) and cut to
    ``max_length`` tokens; the target, tokenised as a target (``text_target=``), is cut to
    ``max_target_length`` and becomes ``labels``. Batches are padded by transformers'
    ``DataCollatorForSeq2Seq`` (labels padded with -100, which the loss ignores); the model builds its
    decoder inputs by shifting the labels right (teacher forcing).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aptune.data.causal_lm import load_dataset_splits
from aptune.data.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    from datasets import Dataset

SEQ2SEQ_COLUMNS: tuple[tuple[str, str], ...] = (
    ("source", "target"),
    ("document", "summary"),
    ("article", "highlights"),
    ("src", "tgt"),
)


def detect_seq2seq_columns(columns: Sequence[str], source: str = "the data") -> tuple[str, str]:
    """The (source, target) column names of a split, from :data:`SEQ2SEQ_COLUMNS`."""
    present = set(columns)
    for pair in SEQ2SEQ_COLUMNS:
        if set(pair) <= present:
            return pair
    if "label" in present or "labels" in present:
        hint = "it looks like classification data (a label column); use --task classification"
    elif {"question", "context", "answers"} <= present:
        hint = "it looks like extractive QA data; use --task qa"
    else:
        hint = "name them with --text-fields SOURCE TARGET"
    pairs = ", ".join("/".join(p) for p in SEQ2SEQ_COLUMNS)
    raise DataError(f"{source} has no source/target columns ({pairs}; columns: {', '.join(columns)}); {hint}")


@dataclass
class Seq2SeqSplits:
    """Splits with exactly two string columns, ``source`` and ``target``."""

    splits: dict[str, Dataset]
    sources: dict[str, str]
    columns: tuple[str, str]  # the user's column names


def load_seq2seq_splits(
    data: str | os.PathLike[str] | None = None,
    *,
    train: str | os.PathLike[str] | None = None,
    validation: str | os.PathLike[str] | None = None,
    test: str | os.PathLike[str] | None = None,
    text_fields: Sequence[str] | None = None,
) -> Seq2SeqSplits:
    """Load source/target splits (see the module docstring).

    Raises:
        DataError: ``text_fields`` not two names or not columns of a split, undetectable columns (with a hint
            when the data is classification or QA data), or a row whose source or target is not a string.
    """
    if text_fields is not None and len(text_fields) != 2:
        raise DataError(f"the seq2seq task takes two text fields (source, target), got {list(text_fields)}")
    loaded, where = load_dataset_splits(data, train=train, validation=validation, test=test)
    out: dict[str, Dataset] = {}
    columns: tuple[str, str] | None = None
    for split, dataset in loaded.items():
        names = dataset.column_names
        if text_fields is not None:
            missing = [c for c in text_fields if c not in names]
            if missing:
                raise DataError(f"{where[split]} has no column {missing[0]!r} (columns: {', '.join(names)})")
            pair = (text_fields[0], text_fields[1])
        else:
            pair = detect_seq2seq_columns(names, where[split])
        columns = columns or pair
        dataset = dataset.select_columns(list(pair))
        for row, values in enumerate(zip(dataset[pair[0]], dataset[pair[1]], strict=True)):
            if not all(isinstance(v, str) for v in values):
                raise DataError(f"{where[split]} row {row + 1}: {pair[0]} and {pair[1]} must be strings")
        if pair != ("source", "target"):
            dataset = dataset.rename_columns({pair[0]: "source", pair[1]: "target"})
        out[split] = dataset
    assert columns is not None
    return Seq2SeqSplits(out, where, columns)


def encode_seq2seq(
    tokenizer: Any,
    dataset: Dataset,
    max_length: int,
    max_target_length: int,
    source_prefix: str = "",
) -> list[dict[str, list[int]]]:
    """Tokenised rows: ``input_ids``, ``attention_mask`` and ``labels`` (unpadded)."""
    sources = [source_prefix + s for s in dataset["source"]]
    targets = list(dataset["target"])
    enc = tokenizer(sources, max_length=max_length, truncation=True)
    labels = tokenizer(text_target=targets, max_length=max_target_length, truncation=True)["input_ids"]
    return [
        {"input_ids": ids, "attention_mask": mask, "labels": label}
        for ids, mask, label in zip(enc["input_ids"], enc["attention_mask"], labels, strict=True)
    ]


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F-measures in percent (Google's ``rouge-score``, with Porter stemming, as
    the summarisation literature reports them), averaged over the rows."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("no rows to score")
    kinds = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
    sums = dict.fromkeys(kinds, 0.0)
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(reference, prediction)
        for kind in kinds:
            sums[kind] += scores[kind].fmeasure
    return {kind: 100.0 * total / len(predictions) for kind, total in sums.items()}
