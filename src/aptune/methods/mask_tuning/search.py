"""Mask search and mask rearrangement on the Fisher information of the masks.

Removing the set ``P`` of a site's blocks raises the loss by about ``1/2 1_P^T F 1_P`` (second-order Taylor
expansion around the trained model, where the gradient vanishes; ``F`` the site's empirical Fisher). The search
keeps the blocks with the largest diagonal ``F_ii`` under the parameter budget (the shared selector); the
rearrangement then keeps each site's *number* of blocks and chooses *which* ones with the full matrix, which
accounts for interactions between the blocks of a site.
"""

from __future__ import annotations

import torch
from torch import Tensor


def removal_cost(fisher: Tensor, keep: Tensor) -> float:
    """``1_P^T F 1_P`` for the removed set ``P = ~keep``."""
    removed = (~keep.bool()).to(fisher.dtype)
    return float(removed @ fisher @ removed)


def rearrange(keep: Tensor, fisher: Tensor) -> Tensor:
    """A keep mask with as many kept blocks as ``keep`` and a removal cost no higher than ``keep``'s.

    Greedy: the removed set is built one block at a time, each time adding the block that raises
    ``1_P^T F 1_P`` least given the blocks already chosen. The greedy result is returned when it is cheaper,
    else ``keep`` itself.
    """
    keep = keep.bool().cpu()
    n = len(keep)
    to_remove = n - int(keep.sum())
    if to_remove in (0, n):
        return keep.clone()
    f = fisher.to(torch.float64)
    removed = torch.zeros(n, dtype=torch.bool)
    # cost increase of adding block i to P: F_ii + 2 sum_{j in P} F_ij
    increase = f.diagonal().clone()
    for _ in range(to_remove):
        candidates = increase.masked_fill(removed, float("inf"))
        i = int(torch.argmin(candidates))
        removed[i] = True
        increase += 2 * f[:, i]
    greedy = ~removed
    return greedy if removal_cost(f, greedy) < removal_cost(f, keep) else keep.clone()
