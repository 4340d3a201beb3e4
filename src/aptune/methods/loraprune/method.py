"""LoRAPrune baseline: iterative structured pruning during LoRA training, guided by LoRA gradients only.

Every step inside the pruning window folds the LoRA-guided importance of each head and neuron
(:func:`lora_guided_scores`) into a moving average. At ``iterative_steps`` evenly spaced steps of the window
the target density follows a cubic schedule from 1 down to the target (as in the authors' code), and the
heads and neurons with the lowest averaged importance are removed physically under the parameter budget; the
moving averages of the kept blocks carry on. After the window the pruned model keeps training with LoRA.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ...config import APTConfig, ConfigError
from ...salience import ema
from ..base import PruningBaseline
from ..config import BaselineConfig
from ..structure import prune_to_budget
from .importance import lora_guided_scores


def cubic_density(k: int, steps: int, target: float) -> float:
    """Density after the ``k``-th of ``steps`` pruning steps: ``target + (1 - target) (1 - k/steps)^3``."""
    return target + (1.0 - target) * (1.0 - k / steps) ** 3


class LoRAPrune(PruningBaseline):
    name = "loraprune"

    def __init__(
        self,
        model: nn.Module,
        total_steps: int,
        rank: int,
        roles: tuple[str, ...],
        apt: APTConfig,
        baseline: BaselineConfig,
    ):
        super().__init__(model, total_steps, rank, roles, apt, baseline)
        start = int(baseline.iterative_start * total_steps)
        end = int(baseline.iterative_end * total_steps)
        k = baseline.iterative_steps
        if end - start < k:
            raise ConfigError(
                f"LoRAPrune's pruning window ({start} to {end} of {total_steps} steps) is shorter than its "
                f"{k} pruning steps; train longer or lower --iterative-steps"
            )
        self.start = start
        self.prune_at = {start + round(i * (end - start) / k): i for i in range(1, k + 1)}
        self.final_structure_step = end
        self.heads: list[Tensor] | None = None
        self.neurons: list[Tensor] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "heads": self.heads, "neurons": self.neurons}

    def restore(self, structure: dict[str, Any], state: dict[str, Any]) -> None:
        super().restore(structure, state)
        self.heads, self.neurons = state["heads"], state["neurons"]

    def after_backward(self) -> None:
        if not self.start <= self.step < self.final_structure_step:
            return
        heads, neurons = lora_guided_scores(self.model)
        beta = self.baseline.importance_beta
        if self.heads is None or self.neurons is None:
            self.heads, self.neurons = heads, neurons
        else:
            self.heads = [ema(p, c, beta) for p, c in zip(self.heads, heads, strict=True)]
            self.neurons = [ema(p, c, beta) for p, c in zip(self.neurons, neurons, strict=True)]

    def after_step(self) -> bool:
        self.step += 1
        k = self.prune_at.get(self.step)
        if k is None or self.heads is None or self.neurons is None:
            return False
        density = cubic_density(k, self.baseline.iterative_steps, self.apt.target_density)
        sel = prune_to_budget(
            self.model, self.heads, self.neurons, density, self.apt.ffn_multiple, self.apt.shape
        )
        self.heads = [s[keep.cpu()] for s, keep in zip(self.heads, sel.heads, strict=True)]
        self.neurons = [s[keep.cpu()] for s, keep in zip(self.neurons, sel.neurons, strict=True)]
        self.history.append({"step": self.step, "density": self.density(), "target": density})
        return True
