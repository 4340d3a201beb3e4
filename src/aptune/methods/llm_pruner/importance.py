"""First-order Taylor importance with gradients of the frozen weights (LLM-Pruner's criterion).

For every weight of a block's group, ``|w * dL/dw|`` (the first-order estimate of the loss change when the
weight is removed), summed over the group. ``w`` is the weight the layer applies (base plus a merged adapter,
if any); its gradient equals the base weight's gradient because the adapter adds to it. The gradients of
every projection are materialised: this costs a full fine-tuning step's memory, by design.

:class:`WeightGradients` accumulates those gradients over whatever backward passes run inside it (APT's
one-shot calibration uses it with ``one_shot_salience="taylor"``); :func:`taylor_scores` runs the passes too.
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


class WeightGradients:
    """Inside ``with WeightGradients(model) as grads:``, every projection weight and bias of ``model``'s heads
    and neurons requires a gradient, and backward passes accumulate them; :meth:`scores` turns what has
    accumulated into per-head and per-neuron Taylor importance. On exit the ``requires_grad`` flags and the
    gradients every parameter had before are restored."""

    def __init__(self, model: nn.Module):
        self.model = model
        mods = _projections(model)
        self.params = list({id(p): p for m in mods for p in (m.weight, m.bias) if p is not None}.values())
        self._flags = [p.requires_grad for p in self.params]
        self._saved: dict[int, Tensor | None] = {}

    def __enter__(self) -> WeightGradients:
        self._saved = {id(p): p.grad for p in self.model.parameters()}
        for p in self.params:
            p.requires_grad_(True)
            p.grad = None
        return self

    def __exit__(self, *exc: object) -> None:
        for p, flag in zip(self.params, self._flags, strict=True):
            p.requires_grad_(flag)
        for p in self.model.parameters():
            p.grad = self._saved.get(id(p))

    def gradients(self) -> list[Tensor]:
        """The accumulated gradients (zeros where none arrived), in place: a multi-process run sums them."""
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return [p.grad for p in self.params]

    def scores(self) -> tuple[list[Tensor], list[Tensor]]:
        grads = {id(p): g for p, g in zip(self.params, self.gradients(), strict=True)}

        def element_scores(linear: nn.Module):
            w = applied_weight(linear)
            ws = (w.float() * grads[id(linear.weight)].float()).abs()
            b = linear.bias
            bs = (b.detach().float() * grads[id(b)].float()).abs() if b is not None else None
            return ws, bs

        return group_scores(self.model, element_scores)


def taylor_scores(
    model: nn.Module, batches: Iterable[dict[str, Tensor]]
) -> tuple[list[Tensor], list[Tensor]]:
    """Per-head and per-neuron Taylor importance, from the task loss summed over ``batches``.

    The model runs in eval mode (no dropout); its ``requires_grad`` flags, gradients and mode are restored.
    """
    was_training = model.training
    model.eval()
    try:
        with WeightGradients(model) as grads:
            seen = 0
            for batch in batches:
                model(**batch).loss.backward()
                seen += 1
            if seen == 0:
                raise ValueError("Taylor importance needs at least one calibration batch")
            return grads.scores()
    finally:
        model.train(was_training)
