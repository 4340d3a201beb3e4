"""Fisher information of the head and neuron masks (Kwon et al. 2022, "A Fast Post-Training Pruning
Framework for Transformers").

A mask of ones is multiplied into each head's context (before the attention output projection) and into each
FFN activation (before the down projection), one mask per example, so that one backward pass gives every
example's gradient ``g`` with respect to every mask. The empirical Fisher of a site is ``sum_examples g g^T``;
its diagonal is the importance used by the mask search, the whole matrix (block-diagonal by site) is used by
the rearrangement. Gradients of the weights are never needed: the weights are frozen.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...arch import describe


@dataclass
class MaskFisher:
    """Per-site empirical Fisher matrices of the masks (``n x n``, float64 on the CPU) and the sample size."""

    heads: list[Tensor]
    neurons: list[Tensor]
    examples: int

    def head_importance(self) -> list[Tensor]:
        return [f.diagonal().clone() for f in self.heads]

    def neuron_importance(self) -> list[Tensor]:
        return [f.diagonal().clone() for f in self.neurons]


def mask_fisher(model: nn.Module, batches: Iterable[dict[str, Tensor]]) -> MaskFisher:
    """The empirical Fisher of the masks over the examples of ``batches`` (with labels), model in eval mode."""
    structure = describe(model)
    masks: dict[tuple[str, int], Tensor] = {}
    handles = []

    def hook(kind: str, i: int, groups: int):
        def pre(module, args):
            x = args[0]
            m = torch.ones(x.shape[0], 1, groups, device=x.device, dtype=x.dtype, requires_grad=True)
            masks[(kind, i)] = m
            width = x.shape[-1] // groups
            return (x * m.repeat_interleave(width, dim=-1), *args[1:])

        return pre

    for i, s in enumerate(structure.attention):
        if s.num_heads:
            handles.append(s.o.register_forward_pre_hook(hook("head", i, s.num_units)))
    for i, s in enumerate(structure.ffn):
        if s.num_neurons:
            handles.append(s.down.register_forward_pre_hook(hook("neuron", i, s.num_neurons)))

    heads = [torch.zeros(s.num_units, s.num_units, dtype=torch.float64) for s in structure.attention]
    neurons = [torch.zeros(s.num_neurons, s.num_neurons, dtype=torch.float64) for s in structure.ffn]
    was_training = model.training
    model.eval()
    examples = 0
    try:
        for batch in batches:
            masks.clear()
            out = model(**batch)
            n = batch["input_ids"].shape[0]
            # the loss is a mean over examples; times n it is their sum, whose gradient with respect to an
            # example's own masks is that example's gradient
            keys = list(masks)
            grads = torch.autograd.grad(out.loss * n, [masks[k] for k in keys])
            for (kind, i), g in zip(keys, grads, strict=True):
                g = g.reshape(n, -1).to("cpu", torch.float64)
                target = heads if kind == "head" else neurons
                target[i] += g.T @ g
            examples += n
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if examples == 0:
        raise ValueError("the mask Fisher needs at least one calibration batch")
    return MaskFisher(heads, neurons, examples)
