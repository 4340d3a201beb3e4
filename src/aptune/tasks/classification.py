"""Text classification (single sentences and sentence pairs): ``AutoModelForSequenceClassification``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..config import ConfigError
from ..evaluate import accuracy, compare_throughput, quiet_transformers
from .base import Task, TaskData, training_loaders

if TYPE_CHECKING:  # pragma: no cover
    from ..train import TrainConfig


def load_classifier(source: str, labels: list, dtype: torch.dtype = torch.float32) -> nn.Module:
    from transformers import AutoModelForSequenceClassification

    id2label = {i: str(label) for i, label in enumerate(labels)}
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            source,
            num_labels=len(labels),
            id2label=id2label,
            label2id={v: k for k, v in id2label.items()},
            dtype=dtype,
        )
    except OSError as e:
        raise FileNotFoundError(f"could not load model {source!r}: {str(e).splitlines()[0]}") from None


class ClassificationTask(Task):
    name = "classification"
    metric = "accuracy"
    greater_is_better = True
    auto_class = "AutoModelForSequenceClassification"

    def load_data(self, config: TrainConfig, tokenizer: Any) -> TaskData:
        from ..data import PaddingCollator, encode_splits, load_text_classification, make_dataloader

        if config.train is None and config.data is None:
            raise ConfigError("pass --data NAME_OR_FOLDER, or --train FILE (with --validation FILE)")
        data = load_text_classification(
            config.data,
            train=config.train,
            validation=config.validation,
            test=config.test,
            text_fields=config.text_fields,
            label_field=config.label_field,
        )
        if data.get("validation") is None:
            raise ConfigError("a validation split is needed for evaluation and checkpoint selection")
        encoded = encode_splits(tokenizer, data, max_length=config.max_length)
        collate = PaddingCollator.from_tokenizer(tokenizer)
        loaders = training_loaders(encoded["train"], config, collate)
        for split in ("validation", "test"):
            if split in encoded:
                loaders[split] = make_dataloader(encoded[split], config.eval_batch_size, collate_fn=collate)
        return TaskData(loaders, {"labels": list(data.task.labels)}, data)

    def load_model(self, source: str, data: TaskData, dtype: torch.dtype = torch.float32) -> nn.Module:
        return load_classifier(source, data.info["labels"], dtype)

    def evaluate(self, model: nn.Module, loader: Any, device: torch.device) -> float:
        return accuracy(model, loader, device, shared=True)

    def final_metrics(
        self, model: nn.Module, data: TaskData, config: TrainConfig, device: torch.device, tokenizer: Any
    ) -> dict[str, Any]:
        if "test" not in data.loaders:
            return {}
        return {"test_at_best": accuracy(model, data.loaders["test"], device)}

    def compare_speed(
        self, dense_path: str, model: nn.Module, data: TaskData, config: TrainConfig, device: torch.device
    ) -> dict[str, Any]:
        """Dense starting model against the final one, alternately (:func:`aptune.evaluate.compare_throughput`),
        at batch 32 and the training length. The dense model loads quietly: its new classifier is "missing"
        from the checkpoint, which is expected here."""
        return compare_speed(dense_path, model, model.config.num_labels, device, 32, config.max_length)


def compare_speed(
    dense_path: str,
    model: nn.Module,
    num_labels: int,
    device,
    batch_size: int,
    length: int,
    warmup: int = 3,
    runs: int = 10,
) -> dict:
    """Throughput of the dense starting model vs the final model, same batch, length and device.

    The two run alternately (dense, final, dense, final, ...; :func:`aptune.evaluate.compare_throughput`),
    so a change in machine load lands on both. ``speedup`` is the median of the per-pair throughput ratios
    final / dense, ``speedup_spread`` their extremes and quartiles; ``dense`` and ``final`` hold each
    model's median throughput. The dense model is loaded without transformers' load report (its new
    classifier head is "missing" from the checkpoint, which is expected here).
    """
    with quiet_transformers():
        dense = load_classifier(dense_path, list(range(num_labels)))
    if getattr(dense.config, "pad_token_id", None) is None:
        dense.config.pad_token_id = getattr(model.config, "pad_token_id", None)
    result = compare_throughput(dense, model, batch_size, length, warmup=warmup, runs=runs, device=device)
    del dense
    return result.report()
