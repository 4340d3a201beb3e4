"""BaselineConfig: the knobs of the pruning baselines, validated on construction, serialisable to JSON.

The pruning target itself is shared with APT: every method prunes to ``APTConfig.target_density`` of the
counted parameters, with FFN widths aligned to ``APTConfig.ffn_multiple``, so all of them meet the same
budget through the same selector (:func:`aptune.selection.select_blocks`). The baselines prune heads and FFN
neurons only, never hidden channels (as in the APT paper's baselines).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..config import ConfigError


@dataclass(frozen=True)
class BaselineConfig:
    # lora-prune (Mask-Tuning): LoRA epochs before pruning; default: as many as the retraining after it
    pretune_epochs: float | None = None
    # lora-prune and llm-pruner: training batches for the Fisher / Taylor importance and the rescaling
    calibration_batches: int = 16
    rearrange: bool = True  # lora-prune: mask rearrangement with the layer-wise Fisher
    rescale: bool = True  # lora-prune: least-squares rescaling of the output projections
    rescale_damping: float = (
        1e-3  # ridge weight towards the unscaled masks, relative to the mean Gram diagonal
    )
    # llm-pruner: share of the steps that trains LoRA and the task head before the one-shot pruning
    prune_warmup: float = 0.05
    iterative_start: float = 0.05  # loraprune: where its pruning window starts, as a share of the steps
    iterative_end: float = 0.4  # loraprune: where its pruning window ends, as a share of the steps
    iterative_steps: int = 10  # loraprune: pruning steps inside the window
    importance_beta: float = 0.9  # loraprune: weight of the history in the moving average of importance

    def __post_init__(self) -> None:
        if self.pretune_epochs is not None and self.pretune_epochs <= 0:
            raise ConfigError(f"pretune_epochs must be > 0, got {self.pretune_epochs}")
        if self.calibration_batches < 1:
            raise ConfigError(f"calibration_batches must be >= 1, got {self.calibration_batches}")
        if self.rescale_damping < 0:
            raise ConfigError(f"rescale_damping must be >= 0, got {self.rescale_damping}")
        if not 0 <= self.prune_warmup < 1:
            raise ConfigError(f"prune_warmup must be in [0, 1), got {self.prune_warmup}")
        if not 0 <= self.iterative_start < self.iterative_end <= 1:
            raise ConfigError(
                "need 0 <= iterative_start < iterative_end <= 1, "
                f"got {self.iterative_start} and {self.iterative_end}"
            )
        if self.iterative_steps < 1:
            raise ConfigError(f"iterative_steps must be >= 1, got {self.iterative_steps}")
        if not 0 <= self.importance_beta < 1:
            raise ConfigError(f"importance_beta must be in [0, 1), got {self.importance_beta}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
