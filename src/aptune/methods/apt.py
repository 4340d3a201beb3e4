"""APT as a method of the shared training loop: a thin wrapper around :class:`aptune.APTController`."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..adapter import merge_adapters
from ..config import APTConfig
from ..controller import APTController
from .base import Calibration, Method


class APT(Method):
    name = "apt"

    def __init__(
        self,
        model: nn.Module,
        config: APTConfig,
        total_steps: int,
        steps_per_epoch: int,
        calibration: Calibration | None = None,
        resuming: bool = False,
        sharded: bool = False,
    ):
        super().__init__(model, total_steps)
        self.controller = APTController(
            model,
            config,
            total_steps=total_steps,
            steps_per_epoch=steps_per_epoch,
            remove_during_training=not sharded,  # a sharded model keeps pruned blocks masked to the end
        )
        # the one-shot recipe prunes before the first step; a resumed run takes the pruned shape from its checkpoint
        if not self.controller.calibrated and not resuming:
            if calibration is None:
                raise ValueError("the one-shot recipe needs calibration batches")
            self.controller.calibrate(calibration())
        self.final_structure_step = self.controller.final_structure_step
        self.history = self.controller.history

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.controller.trainable_parameters()

    def before_forward(self) -> None:
        self.controller.before_forward()

    def compute_loss(self, batch: dict[str, Tensor]) -> Tensor:
        return self.controller.compute_loss(batch)

    def after_backward(self) -> None:
        self.controller.after_backward()

    def after_step(self) -> bool:
        self.step += 1
        return self.controller.after_step()

    def observe_validation(self, metric: float) -> None:
        self.controller.observe_validation(metric)

    def density(self) -> float:
        return self.controller.density()

    def finish(self) -> nn.Module:
        model = self.controller.finish()
        merge_adapters(model)
        return model

    def config_dict(self) -> dict[str, Any]:
        return self.controller.config.to_dict()

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "controller": self.controller.state_dict()}

    def restore(self, structure: dict[str, Any], state: dict[str, Any]) -> None:
        self.controller.restore(structure, state["controller"])
        self.step = state["step"]
