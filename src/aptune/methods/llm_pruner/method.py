"""LLM-Pruner-style baseline: one-shot structured pruning by Taylor importance, then LoRA recovery.

Timeline over the run's steps: LoRA and the task head train for ``prune_warmup`` of the steps (an encoder's
classification head starts random, so a loss taken before any training scores blocks against noise; set
``prune_warmup`` to 0 to prune the pretrained model at step 0), then the heads and neurons with the lowest
Taylor importance on ``calibration_batches`` training batches are removed at once down to the target, and
the remaining steps recover with LoRA under a fresh learning-rate schedule.
"""

from __future__ import annotations

from torch import nn

from ...config import APTConfig
from ..base import Calibration, PruningBaseline
from ..config import BaselineConfig
from ..structure import prune_to_budget
from .importance import taylor_scores


class LLMPruner(PruningBaseline):
    name = "llm-pruner"

    def __init__(
        self,
        model: nn.Module,
        total_steps: int,
        rank: int,
        roles: tuple[str, ...],
        apt: APTConfig,
        baseline: BaselineConfig,
        calibration: Calibration,
        resuming: bool = False,
    ):
        super().__init__(model, total_steps, rank, roles, apt, baseline, calibration)
        self.prune_step = int(baseline.prune_warmup * total_steps)
        self.final_structure_step = self.prune_step
        self.lr_restarts = (self.prune_step,) if self.prune_step > 0 else ()
        if self.prune_step == 0 and not resuming:  # a resumed run takes the pruned shape from its checkpoint
            self._prune()

    def _prune(self) -> None:
        heads, neurons = taylor_scores(self.model, self.calibration_sample())
        selection = prune_to_budget(
            self.model, heads, neurons, self.apt.target_density, self.apt.ffn_multiple, self.apt.shape
        )
        self.history.append({"step": self.step, "density": self.density(), "params": selection.params})

    def after_step(self) -> bool:
        self.step += 1
        if self.step == self.prune_step:
            self._prune()
            return True
        return False
