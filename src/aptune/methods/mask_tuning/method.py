"""LoRA+Prune baseline (Mask-Tuning on a converged LoRA model, then LoRA retraining; APT spec §9.1).

1. LoRA (and the task head) trains for ``pretune_epochs`` (default: as long as the retraining), and is merged.
2. At once: the Fisher information of the head and neuron masks on ``calibration_batches`` training batches;
   the mask search under the parameter budget; the rearrangement of each site's masks with its Fisher matrix;
   the least-squares rescaling of the output projections; physical removal.
3. A fresh LoRA retrains the pruned model for the run's configured length, with its own learning-rate schedule.

The clock runs through all three phases, so time-to-accuracy includes the LoRA training before pruning.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ... import distributed
from ...adapter import merge_adapters
from ...compact import compact, cut_to
from ...config import APTConfig
from ...masks import StructuralMasks
from ..base import Calibration, PruningBaseline
from ..config import BaselineConfig
from ..structure import select_under_budget
from .fisher import mask_fisher
from .rescale import rescale_outputs
from .search import rearrange, removal_cost


class MaskTuning(PruningBaseline):
    name = "lora-prune"

    def __init__(
        self,
        model: nn.Module,
        retrain_steps: int,
        steps_per_epoch: int,
        rank: int,
        roles: tuple[str, ...],
        apt: APTConfig,
        baseline: BaselineConfig,
        calibration: Calibration,
    ):
        pre = (
            max(1, round(baseline.pretune_epochs * steps_per_epoch))
            if baseline.pretune_epochs is not None
            else retrain_steps
        )
        super().__init__(model, pre + retrain_steps, rank, roles, apt, baseline, calibration)
        self.prune_step = pre
        self.final_structure_step = pre
        self.lr_restarts = (pre,)

    def after_step(self) -> bool:
        self.step += 1
        if self.step != self.prune_step:
            return False
        self.prune()
        return True

    def restore(self, structure: dict[str, Any], state: dict[str, Any]) -> None:
        if state["step"] >= self.prune_step:  # retraining: the first LoRA was merged, a fresh one trains
            merge_adapters(self.model)
            cut_to(self.model, {"shape": structure["shape"], "adapter_ranks": {}})
            self.add_lora()
        super().restore(structure, state)

    def prune(self) -> None:
        model, b = self.model, self.baseline
        merge_adapters(model)
        batches = self.calibration_sample()
        fisher = mask_fisher(model, batches)
        sel = select_under_budget(
            model,
            fisher.head_importance(),
            fisher.neuron_importance(),
            self.apt.target_density,
            self.apt.ffn_multiple,
        )
        heads, neurons = [k.cpu() for k in sel.heads], [k.cpu() for k in sel.neurons]
        record: dict[str, Any] = {"step": self.step, "fisher_examples": fisher.examples}
        if b.rearrange:

            def cost() -> float:
                pairs = zip(fisher.heads + fisher.neurons, heads + neurons, strict=True)
                return sum(removal_cost(f, k) for f, k in pairs)

            before = cost()
            heads = [rearrange(k, f) for k, f in zip(heads, fisher.heads, strict=True)]
            neurons = [rearrange(k, f) for k, f in zip(neurons, fisher.neurons, strict=True)]
            record["fisher_cost"] = {"search": before, "rearranged": cost()}
        masks = StructuralMasks(
            heads=[k.float() for k in heads],
            neurons=[k.float() for k in neurons],
            hidden=torch.ones(len(sel.hidden)),
        )
        if b.rescale:
            teacher = copy.deepcopy(model)
            fits = rescale_outputs(model, teacher, masks, batches, damping=b.rescale_damping)
            del teacher
            record["reconstruction_error"] = {
                "before": sum(f.before for f in fits),
                "after": sum(f.after for f in fits),
            }
        compact(model, masks)
        distributed.broadcast_(list(model.parameters()))  # the rescaled weights of process 0, everywhere
        self.add_lora()  # a fresh LoRA retrains the pruned model
        record["density"] = self.density()
        self.history.append(record)
