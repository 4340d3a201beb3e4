"""What a task is: the model class it loads, how rows become batches, its loss, and the validation metric.

The training loop (:func:`aptune.train`) and ``aptune bench`` only talk to a :class:`Task`. A task's batches
carry ``labels`` in the form its model class scores, so the model's own loss is the task loss (cross-entropy
over classes for classification; next-token cross-entropy over the labelled tokens for a causal LM). A task
adds what is specific to it: the metric that picks the best checkpoint (and whether higher is better), the
metrics of the final model, and the inference-speed comparison against the dense starting model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from ..train import TrainConfig


def load_pretrained(auto_class: str, source: str, what: str, **kwargs: Any) -> nn.Module:
    """``transformers.<auto_class>.from_pretrained(source, **kwargs)``; a model that does not load is a one-line
    FileNotFoundError naming ``what`` (a causal LM, a question-answering model, ...)."""
    import transformers

    try:
        return getattr(transformers, auto_class).from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"could not load {what} from {source!r}: {str(e).splitlines()[0]}") from None


def training_loaders(dataset: Any, config: TrainConfig, collate: Any) -> dict[str, Any]:
    """The ``train`` loader and the ``calibration`` loader (the same rows in a separate shuffle, for the methods
    that calibrate on training batches, so the training order stays as it is)."""
    from ..data import make_dataloader

    return {
        "train": make_dataloader(
            dataset, config.batch_size, shuffle=True, seed=config.seed, collate_fn=collate
        ),
        "calibration": make_dataloader(
            dataset, config.batch_size, shuffle=True, seed=config.seed + 1, collate_fn=collate
        ),
    }


class Rows(torch.utils.data.Dataset):
    """Encoded rows (dicts of token lists) as a data set; ``targets`` optionally holds per-row reference texts."""

    def __init__(self, rows: list[dict[str, Any]], targets: list[str] | None = None):
        self.rows = rows
        self.targets = targets

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.rows[index]


@dataclass
class TaskData:
    """The loaders of one run and what the task learned about the data (labels, format, ...)."""

    loaders: dict[str, Any]  # train, calibration, validation and (when present) test
    info: dict[str, Any] = field(default_factory=dict)
    raw: Any = None  # the task's own view of the splits (texts for perplexity, ...)


class Task:
    """Base class of a task. Subclasses set the class attributes and implement the methods."""

    name = "base"
    metric = "metric"  # the validation metric that picks the best checkpoint
    greater_is_better = True
    auto_class = "AutoModel"  # the transformers auto class that loads the model

    def load_data(self, config: TrainConfig, tokenizer: Any) -> TaskData:
        raise NotImplementedError

    def load_model(self, source: str, data: TaskData, dtype: torch.dtype = torch.float32) -> nn.Module:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, loader: Any, device: torch.device) -> float:
        """The validation metric of ``model`` over ``loader``."""
        raise NotImplementedError

    def final_metrics(
        self, model: nn.Module, data: TaskData, config: TrainConfig, device: torch.device, tokenizer: Any
    ) -> dict[str, Any]:
        """Metrics of the final (compacted) model, e.g. on the test split."""
        return {}

    def compare_speed(
        self, dense_path: str, model: nn.Module, data: TaskData, config: TrainConfig, device: torch.device
    ) -> dict[str, Any]:
        """Inference speed of the final model against the dense starting model."""
        return {}

    def better(self, value: float, than: float | None) -> bool:
        """Whether ``value`` beats ``than`` (None: anything does)."""
        if than is None:
            return True
        return value > than if self.greater_is_better else value < than

    def selection_score(self, value: float) -> float:
        """The metric as "higher is better", for methods that compare validation results."""
        return value if self.greater_is_better else -value
