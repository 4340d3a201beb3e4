"""What the training loop asks of a method, and the pieces every method shares.

The loop in :mod:`aptune.train` drives any method through the same calls, in this order for each step:

    method.before_forward()
    loss = method.compute_loss(batch); loss.backward()
    method.after_backward()
    clip, optimizer.step(), optimizer.zero_grad()
    if method.after_step():            # structure or parameters changed
        optimizer = rebuild(method.trainable_parameters())

and, at every evaluation, ``method.observe_validation(metric)``. At the end ``method.finish()`` returns the
final plain model (adapters merged, pruned blocks removed). A method also tells the loop how many steps it
trains (``total_steps``), where the learning-rate schedule restarts (``lr_restarts``, e.g. a retraining
phase) and from which step the structure is final (``final_structure_step``; the best checkpoint is taken
from there on).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor, nn

from ..adapter import add_adapters, merge_adapters
from ..arch import describe
from ..budget import param_report
from ..compact import cut_to
from ..config import APTConfig, ConfigError
from .config import BaselineConfig

# A function returning a fresh iterable of training batches (on the training device) for calibration.
Calibration = Callable[[], Iterable[dict[str, Tensor]]]


class Method:
    """Default behaviour: plain training of whatever parameters require gradients."""

    name = "base"

    def __init__(self, model: nn.Module, total_steps: int):
        self.model = model
        self.total_steps = total_steps
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.lr_restarts: tuple[int, ...] = ()
        self.final_structure_step = 0

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def before_forward(self) -> None:
        pass

    def compute_loss(self, batch: dict[str, Tensor]) -> Tensor:
        return self.model(**batch).loss

    def after_backward(self) -> None:
        pass

    def after_step(self) -> bool:
        self.step += 1
        return False

    def observe_validation(self, metric: float) -> None:
        pass

    def density(self) -> float:
        return float(param_report(self.model)["density"])

    def finish(self) -> nn.Module:
        return self.model

    def config_dict(self) -> dict[str, Any] | None:
        return None

    # -- checkpoints (``aptune train --save-every`` / ``--resume``) ----------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The method's state besides the model's weights: nested dicts and lists of numbers, strings and
        tensors (:mod:`aptune.checkpoint` stores it without pickle)."""
        return {"step": self.step, "history": list(self.history)}

    def restore(self, structure: dict[str, Any], state: dict[str, Any]) -> None:
        """Resume: cut the freshly built model to a checkpoint's shape and adapter ranks
        (:func:`aptune.compact.shape_and_ranks`) and take the method's state. The loop then loads the
        checkpoint's weights into :attr:`model` strictly and rebuilds the optimizer."""
        cut_to(self.model, structure)
        self.step = state["step"]
        self.history[:] = state["history"]


def lr_factor(step: int, total: int, warmup_ratio: float, restarts: tuple[int, ...] = ()) -> float:
    """The learning-rate multiplier at ``step``: linear warm-up, then linear decay to 0, in each segment.

    ``restarts`` are the steps where a new segment (a retraining phase) starts its own warm-up and decay.
    """
    bounds = [0, *sorted(r for r in restarts if 0 < r < total), total]
    i = next((i for i in range(1, len(bounds)) if step < bounds[i]), len(bounds) - 1)
    start, end = bounds[i - 1], bounds[i]
    length = end - start
    local = step - start
    warmup = int(warmup_ratio * length)
    if warmup and local < warmup:
        return (local + 1) / warmup
    return max(0.0, (length - local) / max(1, length - warmup))


class AdapterMethod(Method):
    """LoRA adapters on the projections with the given roles, plus the task layers the task class adds
    (the same non-adapter parameters APT and PEFT's LoRA train; a pretrained pooler or LM head stays frozen).

    The adapters are aptune's (:class:`aptune.adapter.APTLinear` at a fixed rank, alpha = 2 x rank, the same
    function as PEFT's LoRA): compaction slices them with their layers, so a method can prune while they
    train. ``finish`` merges them.
    """

    def __init__(self, model: nn.Module, total_steps: int, rank: int, roles: tuple[str, ...]):
        super().__init__(model, total_steps)
        for p in model.parameters():
            p.requires_grad_(False)
        self.rank, self.roles = rank, tuple(roles)
        self.add_lora()
        for module in describe(model).new_heads.values():
            for p in module.parameters():
                p.requires_grad_(True)

    def add_lora(self) -> None:
        if not add_adapters(self.model, self.roles, rank=self.rank):
            raise ConfigError(f"no projections with roles {list(self.roles)} in this model")

    def finish(self) -> nn.Module:
        merge_adapters(self.model)
        return self.model


class PruningBaseline(AdapterMethod):
    """An adapter method that prunes to APT's target (``apt.target_density``, ``apt.ffn_multiple``) with the
    knobs of ``baseline``; the calibration batches are for the methods that score blocks on a sample."""

    def __init__(
        self,
        model: nn.Module,
        total_steps: int,
        rank: int,
        roles: tuple[str, ...],
        apt: APTConfig,
        baseline: BaselineConfig,
        calibration: Calibration | None = None,
    ):
        super().__init__(model, total_steps, rank, roles)
        self.apt, self.baseline, self.calibration = apt, baseline, calibration

    def calibration_sample(self) -> list[dict[str, Tensor]]:
        """``baseline.calibration_batches`` fresh training batches on the device."""
        if self.calibration is None:
            raise ValueError(f"{self.name} needs calibration batches")
        return list(itertools.islice(self.calibration(), self.baseline.calibration_batches))

    def config_dict(self) -> dict[str, Any]:
        return {
            "target_density": self.apt.target_density,
            "ffn_multiple": self.apt.ffn_multiple,
            "lora_targets": list(self.roles),
            **self.baseline.to_dict(),
        }
