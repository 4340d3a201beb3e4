"""Extractive question answering data (SQuAD format): loading, checking, windowing and answer extraction.

Rows
    ``question``, ``context`` and ``answers`` = ``{"text": [...], "answer_start": [...]}`` (character offsets
    into the context), plus an optional ``id`` (made up from the row number when missing). This is the
    Hugging Face ``squad`` / ``squad_v2`` schema and that of ``shared/data/squad``. A row whose answer lists are
    empty is unanswerable (SQuAD v2); when any row of the data is, the model may also answer "no answer".

Offsets
    Every gold answer must sit at its ``answer_start``. SQuAD v1.1 itself holds a few spans whose start is one
    character off (15 of its 10,570 dev answers, mostly a text with a leading space): a span found within
    :data:`OFFSET_TOLERANCE` characters of its stated start is moved there and counted in
    :attr:`QASplits.repaired`; anything further off is a :class:`DataError` naming the row.

Windows
    A context longer than ``max_length`` tokens (question and special tokens included) is split into
    overlapping windows: consecutive windows share ``stride`` context tokens (transformers' overflowing
    tokens; the question is repeated in every window and never truncated beyond ``max_length``). A training
    window whose context holds the whole first gold answer is labelled with that answer's first and last
    token; any other window is labelled with the first token (``[CLS]``), the usual "not in this window"
    label. Evaluation keeps every window and its token-to-character offsets.

Answers
    :func:`best_answers` takes the start/end logits of every window of a question and returns the
    highest-scoring span (start + end logit, start <= end, at most ``max_answer_tokens`` tokens, inside the
    context) over all its windows, or "" when unanswerable questions exist and the "no answer" score
    (the first token's start + end logits) beats it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from aptune.data.causal_lm import load_dataset_splits
from aptune.data.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    from datasets import Dataset

QA_COLUMNS = ("question", "context", "answers")
OFFSET_TOLERANCE = 2  # characters a gold span may sit away from its stated answer_start (SQuAD quirks)
MAX_ANSWER_TOKENS = 30
N_BEST = 20  # candidate starts and ends tried per window


@dataclass
class QASplits:
    """Checked QA splits (``datasets`` data sets with ``id``, ``question``, ``context``, ``answers``)."""

    splits: dict[str, Dataset]
    sources: dict[str, str]
    repaired: int = 0  # gold spans moved to where their text really starts (within OFFSET_TOLERANCE)
    unanswerable: int = 0  # rows without an answer (SQuAD v2 style), over all splits

    @property
    def allow_no_answer(self) -> bool:
        return self.unanswerable > 0


def _check_columns(columns: Sequence[str], source: str) -> None:
    missing = [c for c in QA_COLUMNS if c not in columns]
    if not missing:
        return
    if "label" in columns or "labels" in columns:
        raise DataError(
            f"{source} looks like classification data (it has a label column); the QA task needs question, "
            "context and answers {text, answer_start} (the SQuAD format); use --task classification for it"
        )
    raise DataError(
        f"{source} has no {', '.join(repr(c) for c in missing)} column (columns: {', '.join(columns)}); "
        "the QA task needs question, context and answers {text, answer_start} (the SQuAD format)"
    )


def locate_answer(context: str, text: str, start: int) -> int | None:
    """Where ``text`` really starts in ``context``: ``start`` when it is there, else the nearest position
    within :data:`OFFSET_TOLERANCE` characters of ``start`` (the text taken without surrounding whitespace),
    else None."""
    if start >= 0 and context[start : start + len(text)] == text:
        return start
    core = text.strip()
    if not core:
        return None
    lead = len(text) - len(text.lstrip())
    for shift in sorted(range(-OFFSET_TOLERANCE - lead, OFFSET_TOLERANCE + lead + 1), key=abs):
        at = start + lead + shift
        if at >= 0 and context[at : at + len(core)] == core:
            return at
    return None


def _checked_rows(dataset: Dataset, source: str) -> tuple[dict[str, list], int, int]:
    """The columns of ``dataset`` with every gold span checked (and repaired within tolerance)."""
    ids = dataset["id"] if "id" in dataset.column_names else [str(i) for i in range(len(dataset))]
    questions, contexts, answers = dataset["question"], dataset["context"], dataset["answers"]
    repaired = unanswerable = 0
    fixed_answers = []
    for row, (qid, question, context, answer) in enumerate(
        zip(ids, questions, contexts, answers, strict=True)
    ):
        where = f"{source} row {row + 1} (id {qid})"
        if not isinstance(question, str) or not isinstance(context, str):
            raise DataError(f"{where}: question and context must be strings")
        if not isinstance(answer, dict) or "text" not in answer or "answer_start" not in answer:
            raise DataError(
                f"{where}: answers must be {{'text': [...], 'answer_start': [...]}}, got {answer!r}"
            )
        texts, starts = list(answer["text"] or []), list(answer["answer_start"] or [])
        if len(texts) != len(starts):
            raise DataError(f"{where}: answers has {len(texts)} texts but {len(starts)} answer_start offsets")
        if not texts:
            unanswerable += 1
        new_texts, new_starts = [], []
        for text, start in zip(texts, starts, strict=True):
            if not isinstance(text, str) or not isinstance(start, int) or isinstance(start, bool):
                raise DataError(f"{where}: answer texts must be strings and answer_start integers")
            at = locate_answer(context, text, start)
            if at is None:
                shown = context[max(start, 0) : max(start, 0) + len(text)]
                raise DataError(
                    f"{where}: the answer {text!r} is not at answer_start {start} of its context "
                    f"(the context there reads {shown!r})"
                )
            if at != start:
                repaired += 1
            new_texts.append(text if at == start else text.strip())
            new_starts.append(at)
        fixed_answers.append({"text": new_texts, "answer_start": new_starts})
    columns = {
        "id": [str(i) for i in ids],
        "question": [q.lstrip() for q in questions],  # leading blanks only waste window tokens
        "context": list(contexts),
        "answers": fixed_answers,
    }
    return columns, repaired, unanswerable


def load_qa_splits(
    data: str | os.PathLike[str] | None = None,
    *,
    train: str | os.PathLike[str] | None = None,
    validation: str | os.PathLike[str] | None = None,
    test: str | os.PathLike[str] | None = None,
) -> QASplits:
    """Load and check SQuAD-format splits (a folder, a file, split files or a hub name such as ``squad``).

    Raises:
        DataError: classification data or other missing columns, malformed answers, or a gold span that is
            not at its ``answer_start`` (beyond :data:`OFFSET_TOLERANCE`); file errors as
            :func:`aptune.data.causal_lm.load_dataset_splits`.
    """
    import datasets

    loaded, sources = load_dataset_splits(data, train=train, validation=validation, test=test)
    out: dict[str, Dataset] = {}
    repaired = unanswerable = 0
    for split, dataset in loaded.items():
        _check_columns(dataset.column_names, sources[split])
        columns, fixed, empty = _checked_rows(dataset, sources[split])
        out[split] = datasets.Dataset.from_dict(columns)
        repaired += fixed
        unanswerable += empty
    return QASplits(out, sources, repaired, unanswerable)


# -- windows ---------------------------------------------------------------------------------------------


def _windows(tokenizer: Any, questions: list[str], contexts: list[str], max_length: int, stride: int):
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            "extractive QA needs a fast tokenizer (token offsets); this model's tokenizer is a slow one"
        )
    if getattr(tokenizer, "padding_side", "right") == "left":
        raise DataError("extractive QA expects question-first windows padded on the right")
    return tokenizer(
        questions,
        contexts,
        truncation="only_second",
        max_length=max_length,
        stride=stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )


def check_window_settings(tokenizer: Any, questions: Sequence[str], max_length: int, stride: int) -> None:
    """A clear error when ``stride`` or ``max_length`` leave no room for context in a window."""
    if stride < 0:
        raise DataError(f"doc_stride must be >= 0, got {stride}")
    longest = max((len(tokenizer(q, add_special_tokens=False)["input_ids"]) for q in questions), default=0)
    room = max_length - longest - tokenizer.num_special_tokens_to_add(pair=True)
    if room <= stride:
        raise DataError(
            f"max_length {max_length} leaves {room} context tokens next to the longest question "
            f"({longest} tokens), which must be more than doc_stride {stride}; raise --max-length or lower "
            "--doc-stride"
        )


def encode_qa_train(tokenizer: Any, dataset: Dataset, max_length: int, stride: int) -> list[dict[str, Any]]:
    """Training windows with ``start_positions``/``end_positions`` (see the module docstring)."""
    questions, contexts = list(dataset["question"]), list(dataset["context"])
    check_window_settings(tokenizer, questions, max_length, stride)
    enc = _windows(tokenizer, questions, contexts, max_length, stride)
    answers = list(dataset["answers"])
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    out = []
    for w, example in enumerate(enc["overflow_to_sample_mapping"]):
        offsets, sequence = enc["offset_mapping"][w], enc.sequence_ids(w)
        start_token = end_token = 0
        gold = answers[example]
        if gold["text"]:
            first = gold["answer_start"][0]
            last = first + len(gold["text"][0])
            context_tokens = [i for i, s in enumerate(sequence) if s == 1]
            lo, hi = context_tokens[0], context_tokens[-1]
            if offsets[lo][0] <= first and offsets[hi][1] >= last:
                start_token = next(i for i in range(lo, hi + 1) if offsets[i][1] > first)
                end_token = next(i for i in range(hi, lo - 1, -1) if offsets[i][0] < last)
        row = {k: enc[k][w] for k in keys}
        row["start_positions"], row["end_positions"] = start_token, end_token
        out.append(row)
    return out


@dataclass
class QAEvalWindows:
    """Evaluation windows of one split: model inputs, and what turns their logits back into answer texts."""

    features: list[dict[str, Any]]  # model inputs only
    example: list[int]  # window -> row of the split
    offsets: list[list[tuple[int, int] | None]]  # window token -> context characters (None: not context)
    ids: list[str]
    contexts: list[str]
    references: list[list[str]]  # gold answer texts per row (empty: unanswerable)
    extra: dict[str, Any] = field(default_factory=dict)


def encode_qa_eval(tokenizer: Any, dataset: Dataset, max_length: int, stride: int) -> QAEvalWindows:
    """Every window of every row, with the offsets :func:`best_answers` needs."""
    questions, contexts = list(dataset["question"]), list(dataset["context"])
    check_window_settings(tokenizer, questions, max_length, stride)
    enc = _windows(tokenizer, questions, contexts, max_length, stride)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    features, offsets = [], []
    for w in range(len(enc["input_ids"])):
        sequence = enc.sequence_ids(w)
        features.append({k: enc[k][w] for k in keys})
        offsets.append(
            [tuple(o) if s == 1 else None for o, s in zip(enc["offset_mapping"][w], sequence, strict=True)]
        )
    return QAEvalWindows(
        features=features,
        example=list(enc["overflow_to_sample_mapping"]),
        offsets=offsets,
        ids=list(dataset["id"]),
        contexts=contexts,
        references=[list(a["text"]) for a in dataset["answers"]],
    )


def best_answers(
    windows: QAEvalWindows,
    start_logits: Sequence[np.ndarray],
    end_logits: Sequence[np.ndarray],
    allow_no_answer: bool = False,
    max_answer_tokens: int = MAX_ANSWER_TOKENS,
    n_best: int = N_BEST,
) -> list[str]:
    """The predicted answer text of every row (see the module docstring), in row order."""
    best: list[tuple[float, str]] = [(-np.inf, "")] * len(windows.ids)
    null: list[float] = [np.inf] * len(windows.ids)
    for w, row in enumerate(windows.example):
        starts, ends, offsets = np.asarray(start_logits[w]), np.asarray(end_logits[w]), windows.offsets[w]
        n = min(len(offsets), len(starts))
        starts, ends = starts[:n], ends[:n]
        null[row] = min(null[row], float(starts[0] + ends[0]))
        for i in np.argsort(starts)[::-1][:n_best]:
            if offsets[i] is None:
                continue
            for j in np.argsort(ends)[::-1][:n_best]:
                if offsets[j] is None or j < i or j - i + 1 > max_answer_tokens:
                    continue
                score = float(starts[i] + ends[j])
                if score > best[row][0]:
                    best[row] = (score, windows.contexts[row][offsets[i][0] : offsets[j][1]])
    answers = []
    for row, (score, text) in enumerate(best):
        if allow_no_answer and null[row] > score:
            text = ""
        answers.append(text)
    return answers


def squad_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """SQuAD exact match and F1 in percent, as the official scripts define them.

    Answerable questions are scored by ``torchmetrics``' SQuAD metric (the official v1.1 normalisation:
    lower case, no punctuation, no articles, single spaces; the best score over the gold answers). An
    unanswerable question (no gold answer, SQuAD v2) scores 100 for both when the prediction is empty and 0
    otherwise, as in the official v2 script. Returns ``exact_match``, ``f1`` and the counts.
    """
    from torchmetrics.functional.text import squad

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} questions")
    if not predictions:
        raise ValueError("no questions to score")
    answerable = [i for i, gold in enumerate(references) if gold]
    unanswerable = [i for i, gold in enumerate(references) if not gold]
    em_sum = f1_sum = 0.0
    if answerable:
        preds = [{"prediction_text": predictions[i], "id": str(i)} for i in answerable]
        target = [
            {"answers": {"text": list(references[i]), "answer_start": [0] * len(references[i])}, "id": str(i)}
            for i in answerable
        ]
        scores = squad(preds, target)
        em_sum += float(scores["exact_match"]) * len(answerable)
        f1_sum += float(scores["f1"]) * len(answerable)
    right = sum(1 for i in unanswerable if not predictions[i].strip())
    em_sum += 100.0 * right
    f1_sum += 100.0 * right
    total = len(predictions)
    return {
        "exact_match": em_sum / total,
        "f1": f1_sum / total,
        "questions": total,
        "unanswerable": len(unanswerable),
    }
