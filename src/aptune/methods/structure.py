"""Structured groups and the shared pruning step of the baselines.

A *group* is every parameter that disappears with one block: for a head unit (one key/value head and the
query heads that share it; one head without grouped-query attention), its rows of q, k and v (weights and
biases) and its columns of o; for an FFN neuron, its row of up (and gate) and its column of down. In a fused
projection (Phi-3) these are the unit's rows in each role's row range. Criteria
that score single weights (Taylor, LoRA-guided) are summed over groups with :func:`group_scores`; the
selection and the physical removal are the same for every method (:func:`prune_to_budget`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .. import distributed
from ..arch import Part, describe
from ..budget import StructureShape, count_prunable
from ..compact import compact
from ..masks import StructuralMasks
from ..selection import Selection, select_blocks, select_uniform

# linear -> (per-weight scores shaped like its weight, per-bias scores or None), or None if it adds nothing
ElementScores = Callable[[nn.Module], tuple[Tensor, Tensor | None] | None]


def _rows(scores: tuple[Tensor, Tensor | None] | None, part: Part, groups: int) -> Tensor | None:
    """Sum of each of the part's output rows' scores (weight row plus bias entry), folded into ``groups`` equal
    groups."""
    if scores is None:
        return None
    rows = slice(part.start, part.start + part.size)
    w, b = scores
    per_row = w[rows].float().sum(dim=1)
    if b is not None:
        per_row = per_row + b[rows].float()
    return per_row.view(groups, -1).sum(dim=1)


def _cols(scores: tuple[Tensor, Tensor | None] | None, groups: int) -> Tensor | None:
    """Sum of each input column's weight scores, folded into ``groups`` equal groups (biases stay)."""
    if scores is None:
        return None
    return scores[0].float().sum(dim=0).view(groups, -1).sum(dim=1)


def group_scores(model: nn.Module, element_scores: ElementScores) -> tuple[list[Tensor], list[Tensor]]:
    """Per-head and per-neuron sums of ``element_scores`` over each block's parameter group.

    Rows are read per part (:class:`aptune.arch.Part`): a fused projection (Phi-3's ``qkv_proj``) is scored once
    and each role's row range is folded into the units on its own.
    """
    structure = describe(model)

    def total(n: int, parts: list[Part], col_owner: nn.Module) -> Tensor:
        out = torch.zeros(n, dtype=torch.float64)
        if n:
            scored = {id(m): element_scores(m) for m in {id(p.module): p.module for p in parts}.values()}
            terms = [_rows(scored[id(p.module)], p, n) for p in parts]
            terms.append(_cols(element_scores(col_owner), n))
            for term in terms:
                if term is not None:
                    out += term.detach().to("cpu", torch.float64)
        return out

    # q rows and o columns fold into units of group_size heads, k and v rows into single heads: one unit each
    heads = [total(s.num_units, s.parts, s.o) for s in structure.attention]
    neurons = [total(s.num_neurons, s.parts, s.down) for s in structure.ffn]
    return heads, neurons


def base_params(model: nn.Module) -> int:
    """The counted parameters of the model's original (unpruned) structure."""
    shape = StructureShape.of(describe(model))
    return count_prunable(getattr(model, "_aptune_base_shape", shape))


def select_under_budget(
    model: nn.Module,
    head_scores: list[Tensor],
    neuron_scores: list[Tensor],
    density: float,
    ffn_multiple: int,
    shape_kind: str | None = None,
) -> Selection:
    """Heads and neurons to keep so that the counted parameters are at most ``density`` of the original;
    ``shape_kind="uniform"`` keeps the same heads and FFN width in every layer (:func:`select_uniform`)."""
    structure = describe(model)
    shape = StructureShape.of(structure)
    target = int(density * base_params(model))
    # a multi-process run selects from process 0's scores, so every process removes the same blocks
    distributed.broadcast_([*head_scores, *neuron_scores])
    if shape_kind == "uniform":
        return select_uniform(
            shape,
            [s.clamp(min=0) for s in head_scores],
            [s.clamp(min=0) for s in neuron_scores],
            max(1, target),
            ffn_multiple=ffn_multiple,
        )
    return select_blocks(
        shape,
        [s.clamp(min=0) for s in head_scores],
        [s.clamp(min=0) for s in neuron_scores],
        torch.ones(shape.hidden),
        target_params=max(1, target),
        ffn_multiple=ffn_multiple,
        prune_hidden=False,
    )


def selection_masks(selection: Selection) -> StructuralMasks:
    return StructuralMasks(
        heads=[k.float() for k in selection.heads],
        neurons=[k.float() for k in selection.neurons],
        hidden=selection.hidden.float(),
    )


def prune_to_budget(
    model: nn.Module,
    head_scores: list[Tensor],
    neuron_scores: list[Tensor],
    density: float,
    ffn_multiple: int,
    shape_kind: str | None = None,
) -> Selection:
    """Select under the budget and remove the other heads and neurons physically (in place)."""
    selection = select_under_budget(model, head_scores, neuron_scores, density, ffn_multiple, shape_kind)
    compact(model, selection_masks(selection))
    return selection
