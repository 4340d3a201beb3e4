"""Tasks: what a run trains for (see :class:`Task`). One module per task; ``TASKS`` maps names to them.

``infer_task`` picks the task from the data and the model when that is unambiguous: ``question``, ``context``
and ``answers`` columns (the SQuAD format) mean extractive QA; source/target columns (``source``/``target``,
``document``/``summary``, ...) mean seq2seq; a label column means classification; chat columns (``messages``, ``conversations``, ``prompt``/``response``, ``instruction``/
``output``) or a lone ``text`` column mean causal LM; otherwise the model's class decides (a ``...ForCausalLM``
checkpoint means causal LM, a ``...ForQuestionAnswering`` one QA, a ``...ForConditionalGeneration`` one seq2seq). ``--task`` always overrides it.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import ConfigError
from ..data.causal_lm import detect_lm_format
from ..data.errors import DataError
from ..data.seq2seq import SEQ2SEQ_COLUMNS
from .base import Task, TaskData
from .causal_lm import CausalLMTask
from .classification import ClassificationTask
from .qa import QuestionAnsweringTask
from .seq2seq import Seq2SeqTask

TASKS: dict[str, type[Task]] = {
    "classification": ClassificationTask,
    "causal-lm": CausalLMTask,
    "qa": QuestionAnsweringTask,
    "seq2seq": Seq2SeqTask,
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name]()


def _first_file(data: str | None, train: str | None) -> Path | None:
    if train:
        return Path(train)
    if data is None:
        return None
    path = Path(data)
    if path.is_file():
        return path
    if path.is_dir():
        for f in sorted(path.iterdir()):
            if f.stem == "train":
                return f
    return None


def peek_columns(path: Path) -> set[str] | None:
    """The column names of a local data file, from its first row (None when unknown)."""
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".json"):
            with path.open() as f:
                head = f.read(1 << 20).lstrip()
            if head.startswith("["):
                return None  # a JSON array: let the loader decide
            first = head.splitlines()[0] if head else ""
            row = json.loads(first) if first else {}
            return set(row) if isinstance(row, dict) else None
        if suffix in (".csv", ".tsv"):
            with path.open() as f:
                header = f.readline().strip()
            return set(header.split("\t" if suffix == ".tsv" else ","))
        if suffix == ".txt":
            return {"text"}
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return set(pq.read_schema(path).names)
    except (OSError, ValueError):
        return None
    return None


def _model_architectures(model_path: str) -> list[str]:
    config = Path(model_path) / "config.json"
    if not config.is_file():
        return []
    return list(json.loads(config.read_text()).get("architectures") or [])


def infer_task(data: str | None, train: str | None, model_path: str, label_field: str = "label") -> str:
    """The task name for this data and model (see the module docstring)."""
    path = _first_file(data, train)
    columns = peek_columns(path) if path is not None else None
    if columns:
        if {"question", "context", "answers"} <= columns:
            return "qa"
        if any(set(pair) <= columns for pair in SEQ2SEQ_COLUMNS):
            return "seq2seq"
        if label_field in columns:
            return "classification"
        try:
            detect_lm_format(columns)  # chat columns, or plain text without a label
            return "causal-lm"
        except DataError:
            pass
    architectures = _model_architectures(model_path)
    if any(a.endswith("ForCausalLM") for a in architectures):
        return "causal-lm"
    if any(a.endswith("ForQuestionAnswering") for a in architectures):
        return "qa"
    if any(a.endswith("ForConditionalGeneration") for a in architectures):
        return "seq2seq"
    return "classification"


__all__ = [
    "TASKS",
    "CausalLMTask",
    "ClassificationTask",
    "QuestionAnsweringTask",
    "Seq2SeqTask",
    "Task",
    "TaskData",
    "get_task",
    "infer_task",
    "peek_columns",
]
