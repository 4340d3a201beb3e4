"""Extractive question answering (SQuAD format): ``AutoModelForQuestionAnswering``.

Data and windows are :mod:`aptune.data.qa`: a context longer than ``max_length`` is split into windows that
share ``doc_stride`` tokens. The model's own loss (cross-entropy of the gold start and end tokens) is the
training loss. Validation and test are scored on answer *texts*: the best span over all windows of a question
(:func:`aptune.data.qa.best_answers`) against the gold answers, SQuAD exact match and F1 (torchmetrics'
implementation of the official normalisation; v2's "no answer" scored as the official v2 script does). The
validation metric is F1. Speed: the final model against the dense starting model at batch 32 and the
training ``max_length``, as for classification.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .. import distributed
from ..config import ConfigError
from ..evaluate import compare_throughput, quiet_transformers
from .base import Rows, Task, TaskData, load_pretrained, training_loaders

if TYPE_CHECKING:  # pragma: no cover
    from ..data.qa import QAEvalWindows
    from ..train import TrainConfig


def load_qa_model(source: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    return load_pretrained("AutoModelForQuestionAnswering", source, "a question-answering model", dtype=dtype)


class QAWindowsDataset(torch.utils.data.Dataset):
    """The evaluation windows of a split as a data set of model inputs; ``windows`` turns logits into answers."""

    def __init__(self, windows: QAEvalWindows):
        self.windows = windows

    def __len__(self) -> int:
        return len(self.windows.features)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.windows.features[index]


@torch.no_grad()
def window_logits(
    model: nn.Module, loader: Any, device: torch.device | None = None, shared: bool = False
) -> tuple[list, list]:
    """Start and end logits of every window of ``loader`` (unpadded, as numpy arrays), in window order.

    ``shared``: each process of a multi-process run scores its share of the batches and all get every window.
    """
    was_training = model.training
    model.eval()
    mine: list[tuple[int, list, list]] = []
    batches = enumerate(loader)
    for index, batch in distributed.my_share(batches) if shared else batches:
        lengths = batch["attention_mask"].sum(-1).tolist()
        batch = {k: v.to(device) if device is not None else v for k, v in batch.items()}
        out = model(**batch)
        starts, ends = out.start_logits.float().cpu(), out.end_logits.float().cpu()
        mine.append(
            (
                index,
                [s[:n].numpy() for s, n in zip(starts, lengths, strict=True)],
                [e[:n].numpy() for e, n in zip(ends, lengths, strict=True)],
            )
        )
    model.train(was_training)
    parts = distributed.gather_shares(mine) if shared else mine
    parts.sort(key=lambda p: p[0])
    return [s for p in parts for s in p[1]], [e for p in parts for e in p[2]]


def qa_scores(
    model: nn.Module, loader: Any, device: torch.device | None, allow_no_answer: bool, shared: bool = False
) -> dict[str, Any]:
    """SQuAD exact match and F1 of ``model`` on the windows of ``loader`` (a :class:`QAWindowsDataset`)."""
    from ..data.qa import best_answers, squad_scores

    windows = loader.dataset.windows
    starts, ends = window_logits(model, loader, device, shared=shared)
    answers = best_answers(windows, starts, ends, allow_no_answer=allow_no_answer)
    return squad_scores(answers, windows.references)


class QuestionAnsweringTask(Task):
    name = "qa"
    metric = "f1"
    greater_is_better = True
    auto_class = "AutoModelForQuestionAnswering"

    def load_data(self, config: TrainConfig, tokenizer: Any) -> TaskData:
        from transformers import DataCollatorWithPadding

        from ..data import make_dataloader
        from ..data.qa import encode_qa_eval, encode_qa_train, load_qa_splits

        if config.train is None and config.data is None:
            raise ConfigError("pass --data NAME_OR_FOLDER, or --train FILE (with --validation FILE)")
        data = load_qa_splits(config.data, train=config.train, validation=config.validation, test=config.test)
        if "validation" not in data.splits:
            raise ConfigError("a validation split is needed for evaluation and checkpoint selection")
        stride = config.doc_stride
        train = Rows(encode_qa_train(tokenizer, data.splits["train"], config.max_length, stride))
        collate = DataCollatorWithPadding(tokenizer)
        loaders = training_loaders(train, config, collate)
        windows = {"train": len(train)}
        for split in ("validation", "test"):
            if split in data.splits:
                encoded = encode_qa_eval(tokenizer, data.splits[split], config.max_length, stride)
                encoded.extra["allow_no_answer"] = data.allow_no_answer
                loaders[split] = make_dataloader(
                    QAWindowsDataset(encoded), config.eval_batch_size, collate_fn=collate
                )
                windows[split] = len(encoded.features)
        info = {
            "allow_no_answer": data.allow_no_answer,
            "unanswerable": data.unanswerable,
            "repaired_offsets": data.repaired,
            "windows": windows,
            "questions": {split: len(rows) for split, rows in data.splits.items()},
            "doc_stride": stride,
        }
        return TaskData(loaders, info, data)

    def load_model(self, source: str, data: TaskData, dtype: torch.dtype = torch.float32) -> nn.Module:
        return load_qa_model(source, dtype)

    def evaluate(self, model: nn.Module, loader: Any, device: torch.device) -> float:
        # every process gets the same validation score (all windows' logits are gathered)
        return qa_scores(model, loader, device, self._allow_no_answer(loader), shared=True)["f1"]

    @staticmethod
    def _allow_no_answer(loader: Any) -> bool:
        return bool(loader.dataset.windows.extra.get("allow_no_answer", False))

    def final_metrics(
        self, model: nn.Module, data: TaskData, config: TrainConfig, device: torch.device, tokenizer: Any
    ) -> dict[str, Any]:
        metrics: dict[str, Any] = {"qa_data": data.info}
        if "test" in data.loaders:
            scores = qa_scores(model, data.loaders["test"], device, data.info["allow_no_answer"])
            metrics["test_at_best"] = scores["f1"]
            metrics["test_f1"] = scores["f1"]
            metrics["test_exact_match"] = scores["exact_match"]
        return metrics

    def compare_speed(
        self, dense_path: str, model: nn.Module, data: TaskData, config: TrainConfig, device: torch.device
    ) -> dict[str, Any]:
        """Dense starting model against the final one, alternately, at batch 32 and the training length."""
        with quiet_transformers():
            dense = load_qa_model(dense_path)
        result = compare_throughput(dense, model, 32, config.max_length, warmup=3, runs=10, device=device)
        del dense
        return result.report()
