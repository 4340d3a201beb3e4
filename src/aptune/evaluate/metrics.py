"""Task metrics computed over a data loader."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .. import distributed


@torch.no_grad()
def accuracy(
    model: nn.Module, batches: Iterable[dict], device: torch.device | str | None = None, shared: bool = False
) -> float:
    """Classification accuracy of ``model`` over ``batches`` (dicts with ``labels``). Restores train mode.

    ``shared``: every process of a multi-process run calls this; each scores its share of the batches and
    the counts are summed, so all get the accuracy over every batch."""
    was_training = model.training
    model.eval()
    right = total = 0
    for batch in distributed.my_share(batches) if shared else batches:
        batch = {k: (v.to(device) if device is not None else v) for k, v in batch.items()}
        labels = batch.pop("labels")  # a copy: the caller's batch is left as it was
        logits = model(**batch).logits
        right += int((logits.argmax(-1) == labels).sum())
        total += len(labels)
    model.train(was_training)
    if shared:
        right, total = distributed.sum_over_processes([right, total])
    if total == 0:
        raise ValueError("accuracy() got no examples")
    return right / total
