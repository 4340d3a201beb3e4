"""Tasks: what a run trains for (see :class:`Task`). One module per task; ``TASKS`` maps names to them.

``infer_task`` picks the task from the data and the model when that is unambiguous: a label column means
classification; chat columns (``messages``, ``conversations``, ``prompt``/``response``, ``instruction``/
``output``) or a lone ``text`` column mean causal LM; otherwise the model's class decides (a ``...ForCausalLM``
checkpoint means causal LM). ``--task`` always overrides it.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import ConfigError
from ..data.causal_lm import detect_lm_format
from ..data.errors import DataError
from .base import Task, TaskData
from .causal_lm import CausalLMTask
from .classification import ClassificationTask

TASKS: dict[str, type[Task]] = {"classification": ClassificationTask, "causal-lm": CausalLMTask}


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


def _model_is_causal_lm(model_path: str) -> bool | None:
    config = Path(model_path) / "config.json"
    if not config.is_file():
        return None
    architectures = json.loads(config.read_text()).get("architectures") or []
    if not architectures:
        return None
    return any(a.endswith("ForCausalLM") for a in architectures)


def infer_task(data: str | None, train: str | None, model_path: str, label_field: str = "label") -> str:
    """The task name for this data and model (see the module docstring)."""
    path = _first_file(data, train)
    columns = peek_columns(path) if path is not None else None
    if columns:
        if label_field in columns:
            return "classification"
        try:
            detect_lm_format(columns)  # chat columns, or plain text without a label
            return "causal-lm"
        except DataError:
            pass
    causal = _model_is_causal_lm(model_path)
    if causal:
        return "causal-lm"
    return "classification"


__all__ = [
    "TASKS",
    "CausalLMTask",
    "ClassificationTask",
    "Task",
    "TaskData",
    "get_task",
    "infer_task",
    "peek_columns",
]
