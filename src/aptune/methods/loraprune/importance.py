"""LoRAPrune's LoRA-guided importance (Zhang et al. 2023, arXiv 2305.18403).

The gradient of a frozen weight is never computed. For a layer ``W + s B A`` the gradient step on the LoRA
factors moves the applied weight along ``G_B A + B G_A`` (first order in the step), which stands in for the
weight gradient; a weight's importance is the first-order Taylor magnitude ``|(W + s B A) * (G_B A + B G_A)|``,
summed over each head's and neuron's group. Projections without an adapter add nothing to their groups,
so LoRAPrune puts adapters on every projection by default.

Choice recorded in docs/baselines.md: the authors' code also subtracts the second-order term ``G_B G_A`` and
normalises each layer's scores; we keep the first-order estimate and no per-layer normalisation, because
the selection is global under the parameter budget (the authors prune the same share in every layer).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...adapter import APTLinear, FusedAPTLinear
from ..structure import group_scores


def lora_weight_gradient(adapter: APTLinear) -> Tensor | None:
    """``G_B A + B G_A``: the estimate of the applied weight's gradient (None before any backward)."""
    A, B = adapter.lora_A, adapter.lora_B
    if A.grad is None or B.grad is None:
        return None
    return B.grad.float() @ A.detach().float() + B.detach().float() @ A.grad.float()


def element_importance(linear: nn.Module) -> tuple[Tensor, None] | None:
    """``|W_applied * G_estimate|`` for an adapted layer; None for a plain one. A fused projection (Phi-3) gets
    each adapted part's scores in its rows and zeros in rows without an adapter."""
    if isinstance(linear, FusedAPTLinear):
        scores = torch.zeros(linear.weight.shape, device=linear.weight.device)
        for adapter in linear.adapters.values():
            part = element_importance(adapter)
            if part is not None:
                scores[adapter.base.start : adapter.base.stop] = part[0]
        return scores, None
    if not isinstance(linear, APTLinear):
        return None
    g = lora_weight_gradient(linear)
    if g is None:
        return None
    return (linear.merged_weight().float() * g).abs(), None


@torch.no_grad()
def lora_guided_scores(model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """Per-head and per-neuron LoRA-guided importance from the adapters' current gradients."""
    return group_scores(model, element_importance)
