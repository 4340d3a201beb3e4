"""First-order Taylor importance with gradients of the frozen weights (LLM-Pruner's criterion).

For every weight of a block's group, ``|w * dL/dw|`` (the first-order estimate of the loss change when the
weight is removed), summed over the group. ``w`` is the weight the layer applies (base plus a merged adapter,
if any); its gradient equals the base weight's gradient because the adapter adds to it. The gradients of
every projection are materialised: this costs a full fine-tuning step's memory, by design.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ...adapter import applied_weight
from ...arch import describe
from ..structure import group_scores


def _projections(model: nn.Module) -> list[nn.Module]:
    structure = describe(model)
    mods: list[nn.Module] = []
    for s in structure.attention:
        if s.num_heads:
            mods += [*s.inputs, s.o]
    for s in structure.ffn:
        if s.num_neurons:
            mods += [*s.inputs, s.down]
    return mods


def taylor_scores(
    model: nn.Module, batches: Iterable[dict[str, Tensor]]
) -> tuple[list[Tensor], list[Tensor]]:
    """Per-head and per-neuron Taylor importance, from the task loss summed over ``batches``.

    The model runs in eval mode (no dropout); its ``requires_grad`` flags, gradients and mode are restored.
    """
    mods = _projections(model)
    params = [p for m in mods for p in (m.weight, m.bias) if p is not None]
    flags = [p.requires_grad for p in params]
    saved = {id(p): p.grad for p in model.parameters()}
    was_training = model.training
    model.eval()
    try:
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        seen = 0
        for batch in batches:
            model(**batch).loss.backward()
            seen += 1
        if seen == 0:
            raise ValueError("Taylor importance needs at least one calibration batch")
        grads = {id(p): (p.grad if p.grad is not None else torch.zeros_like(p)) for p in params}

        def element_scores(linear: nn.Module):
            w = applied_weight(linear)
            ws = (w.float() * grads[id(linear.weight)].float()).abs()
            b = linear.bias
            bs = (b.detach().float() * grads[id(b)].float()).abs() if b is not None else None
            return ws, bs

        return group_scores(model, element_scores)
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
        for p in model.parameters():
            p.grad = saved.get(id(p))
        model.train(was_training)
