"""Adaptive tuning (method spec §6): the most salient adapters grow their rank to meet the budget."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .adapter import APTLinear
from .schedule import grow_rank_fill


def adapter_params(adapters: Sequence[APTLinear]) -> int:
    return sum(a.lora_A.numel() + a.lora_B.numel() for a in adapters)


def grow_ranks(
    adapters: Sequence[APTLinear],
    importance: Sequence[float],
    budget: float,
    max_rank: int = 64,
    generator: torch.Generator | None = None,
) -> dict[int, int]:
    """Grow the top half of the adapters (by importance, among those below ``max_rank``) to fill ``budget``.

    "Top half" is half of *all* adapters (spec §6.2). Each selected adapter gets
    ``r' = int(r (1 + (budget - P_now) / P_selected))`` capped at ``max_rank``. Returns {index: new rank} of
    the adapters that grew. New ranks leave the model's outputs unchanged (zero columns in B).
    """
    if len(adapters) != len(importance):
        raise ValueError(f"{len(adapters)} adapters but {len(importance)} importance values")
    now = adapter_params(adapters)
    if budget <= now or not adapters:
        return {}
    candidates = sorted(
        (i for i, a in enumerate(adapters) if a.rank < max_rank), key=lambda i: -importance[i]
    )
    chosen = candidates[: max(1, len(adapters) // 2)]
    selected = adapter_params([adapters[i] for i in chosen])
    grown = {}
    for i in chosen:
        new = grow_rank_fill(adapters[i].rank, budget, now, selected, max_rank)
        if new > adapters[i].rank:
            adapters[i].grow(new, generator)
            grown[i] = new
    return grown


def importance_of(rank_scores: Tensor | None) -> float:
    """An adapter's importance: the mean of its per-rank salience moving average (0 without history)."""
    return 0.0 if rank_scores is None or rank_scores.numel() == 0 else float(rank_scores.mean())
