"""APTConfig: every knob of APT in one dataclass, validated on construction, serialisable to JSON.

Step counts left as ``None`` are derived from the length of training by :meth:`APTConfig.resolve`, following
the official recipe (method spec §5.1, §8.2): salience from step 200, pruning until a fraction of training,
a warm-up of one epoch during which the density target stays 1.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

ADAPTER_ROLES = ("q", "k", "v", "o", "up", "gate", "down")
RECIPES = ("auto", "gradual", "one-shot")
SHAPES = ("per-layer", "uniform")
ONE_SHOT_SALIENCE = ("activation", "taylor")


class ConfigError(ValueError):
    """A configuration value is invalid."""


def default_targets(decoder: bool) -> tuple[str, ...]:
    """The general default adapter roles: query and value, plus the FFN's up projection in encoders (spec §2.4)."""
    return ("q", "v") if decoder else ("q", "v", "up")


@dataclass(frozen=True)
class APTConfig:
    target_density: float = 0.4  # share of the prunable parameters kept at the end
    initial_rank: int = 8  # every adapter's rank at the start
    max_rank: int = 64  # no adapter grows beyond this rank
    # Fields left as None take the default of the model kind (see ``resolve``): encoders follow the paper's
    # small-model recipe, decoders its LLaMA recipe (spec §2.4, §5.7).
    recipe: str = "auto"  # gradual (encoders) | one-shot (decoders: calibrate, prune once, then tune)
    # default: the family's (T5: q, v and the FFN's first input projection), else q, v, up (encoders); q, v (decoders)
    adapter_targets: tuple[str, ...] | None = None
    train_head: bool = True  # train the task layers the task class adds (classifier, score), as PEFT does
    salience_start: int | None = None  # default: min(200, 5% of training)
    pruning_end: int | None = None  # default: 40% of training
    warmup_end: int | None = None  # default: salience_start + one epoch, capped inside the window
    num_checkpoints: int = 10  # pruning checkpoints between salience_start and pruning_end
    decay_window: int | None = None  # default: min(200, the shortest checkpoint interval)
    mask_step: float | None = None  # default: 1 / (decay_window / 2) so a drop finishes inside a window
    initial_density: float | None = None  # one-shot: prune to this before the first step (default: target)
    one_shot_batches: int = 32  # one-shot: training batches scored (forward and backward) before pruning
    # one-shot: how blocks are scored: "activation" (APT's salience, activation x gradient) or "taylor"
    # (|w x dL/dw| summed over each block's weights, LLM-Pruner's criterion; costs a gradient of every weight)
    one_shot_salience: str = "activation"
    one_shot_micro_batch: int = (
        1  # one-shot: rows per scoring pass (bounds the memory of the full-size model)
    )
    shape: str | None = (
        None  # per-layer | uniform (same heads and FFN width in every layer); default per-layer
    )
    ffn_multiple: int = 64  # kept FFN neurons per layer: a multiple of this, or all
    head_multiple: int = 1  # kept heads (key/value head units) per layer: a multiple of this, 0, or all
    hidden_multiple: int = 1  # kept hidden channels: a multiple of this, or all
    prune_hidden: bool | None = None  # default: True (encoders); False (decoders)
    # the outlier term: off unless set (measured worse for MiniLM's gradual and SmolLM2's one-shot pruning)
    use_kurtosis: bool | None = None
    kurtosis_weight: float = 1.0  # the outlier term's mean, relative to the mean salience of its block type
    beta: float = 0.85  # weight of the history in the moving averages of salience
    tuning_expansion: float = 4.0  # the adapters' parameter budget grows to this x its start by pruning_end
    # Self-distillation: off by default. At the 1-3 epoch schedules people run it lowered test accuracy in every
    # measurement (docs/apt.md, "Decisions"); turn it on for long runs.
    distill: bool = False
    distill_end: int | None = None  # default: 75% of training
    distill_temperature: float = 4.0  # softmax temperature of the prediction KL
    distill_pred_weight: float = 1.0  # weight of the prediction KL in the distillation loss
    distill_layer_weight: float = 0.9  # weight of the layer (hidden-state) loss in the distillation loss
    transform_rank: int = 8  # rank of the learned transform between student and teacher hidden states

    def __post_init__(self) -> None:
        if not 0 < self.target_density <= 1:
            raise ConfigError(f"target_density must be in (0, 1], got {self.target_density}")
        if self.initial_rank < 1 or self.max_rank < self.initial_rank:
            raise ConfigError(
                f"need 1 <= initial_rank <= max_rank, got {self.initial_rank} and {self.max_rank}"
            )
        if self.recipe not in RECIPES:
            raise ConfigError(f"recipe must be one of {', '.join(RECIPES)}, got {self.recipe!r}")
        if self.shape is not None and self.shape not in SHAPES:
            raise ConfigError(f"shape must be one of {', '.join(SHAPES)}, got {self.shape!r}")
        if self.initial_density is not None and not self.target_density <= self.initial_density <= 1:
            raise ConfigError(
                f"initial_density must be in [target_density, 1] = [{self.target_density}, 1], "
                f"got {self.initial_density}"
            )
        if self.one_shot_salience not in ONE_SHOT_SALIENCE:
            raise ConfigError(
                f"one_shot_salience must be one of {', '.join(ONE_SHOT_SALIENCE)}, got {self.one_shot_salience!r}"
            )
        for name in ("one_shot_batches", "one_shot_micro_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        bad = [r for r in self.adapter_targets or () if r not in ADAPTER_ROLES]
        if bad:
            raise ConfigError(f"unknown adapter targets {bad}; choose from {', '.join(ADAPTER_ROLES)}")
        if self.num_checkpoints < 1:
            raise ConfigError(f"num_checkpoints must be >= 1, got {self.num_checkpoints}")
        for name in ("ffn_multiple", "head_multiple", "hidden_multiple"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kurtosis_weight < 0:
            raise ConfigError(f"kurtosis_weight must be >= 0, got {self.kurtosis_weight}")
        if not 0 <= self.beta < 1:
            raise ConfigError(f"beta must be in [0, 1), got {self.beta}")
        if self.tuning_expansion < 1:
            raise ConfigError(f"tuning_expansion must be >= 1, got {self.tuning_expansion}")
        if self.distill_temperature <= 0:
            raise ConfigError(f"distill_temperature must be > 0, got {self.distill_temperature}")
        if self.distill_pred_weight < 0 or self.distill_layer_weight < 0:
            raise ConfigError("distillation weights must be >= 0")
        if self.transform_rank < 1:
            raise ConfigError(f"transform_rank must be >= 1, got {self.transform_rank}")
        if self.mask_step is not None and not 0 < self.mask_step <= 1:
            raise ConfigError(f"mask_step must be in (0, 1], got {self.mask_step}")

    def for_model(self, decoder: bool, adapter_targets: Sequence[str] | None = None) -> APTConfig:
        """Fill the fields whose default depends on the model kind (``decoder``: a causal language model).

        ``adapter_targets`` is the model family's default (:meth:`aptune.arch.ArchSpec.default_adapter_targets`),
        taken when the config names none. Without one, unset adapter targets stay unset here (the caller may not
        know the family yet) and :meth:`resolve` gives them the general default of the model kind.
        """
        recipe = self.recipe if self.recipe != "auto" else ("one-shot" if decoder else "gradual")
        one_shot = recipe == "one-shot"
        targets = self.adapter_targets if self.adapter_targets is not None else adapter_targets
        return replace(
            self,
            recipe=recipe,
            adapter_targets=None if targets is None else tuple(targets),
            initial_density=(self.initial_density or self.target_density) if one_shot else None,
            # decoders: the shape stock runtimes load (measured trade-off in docs/lm.md); encoders: per layer
            shape=self.shape or ("uniform" if decoder else "per-layer"),
            prune_hidden=(not decoder) if self.prune_hidden is None else self.prune_hidden,
            # measured off by default in both recipes (docs/apt.md, docs/lm.md)
            use_kurtosis=False if self.use_kurtosis is None else self.use_kurtosis,
        )

    def resolve(
        self,
        total_steps: int,
        steps_per_epoch: int,
        decoder: bool = False,
        adapter_targets: Sequence[str] | None = None,
    ) -> APTConfig:
        """Fill the fields left as None for a run of ``total_steps`` optimizer steps on a model of that kind
        (``adapter_targets``: the family's default adapter roles, as for :meth:`for_model`)."""
        c = self.for_model(decoder, adapter_targets)  # idempotent: fields already set stay
        if total_steps < 4:
            raise ConfigError(f"APT needs a run of at least a few steps, got {total_steps}")
        start = c.salience_start if c.salience_start is not None else min(200, max(1, total_steps // 20))
        end = (
            c.pruning_end
            if c.pruning_end is not None
            else max(start + c.num_checkpoints, int(0.4 * total_steps))
        )
        if not 0 <= start < end <= total_steps:
            raise ConfigError(
                f"need 0 <= salience_start < pruning_end <= total steps, got {start}, {end}, {total_steps}"
            )
        interval = (end - start) // c.num_checkpoints
        if interval < 1:
            raise ConfigError("the pruning window is shorter than the number of checkpoints")
        warmup = (
            c.warmup_end
            if c.warmup_end is not None
            else min(start + steps_per_epoch, start + (end - start) // 4)
        )
        window = c.decay_window if c.decay_window is not None else min(200, interval)
        step = c.mask_step if c.mask_step is not None else min(1.0, 2.0 / window)
        distill_end = c.distill_end if c.distill_end is not None else max(end, int(0.75 * total_steps))
        if distill_end < warmup:
            raise ConfigError(f"distill_end ({distill_end}) comes before the end of the warm-up ({warmup})")
        targets = c.adapter_targets if c.adapter_targets is not None else default_targets(decoder)
        return replace(
            c,
            adapter_targets=targets,
            salience_start=start,
            pruning_end=end,
            warmup_end=warmup,
            decay_window=window,
            mask_step=step,
            distill_end=distill_end,
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.adapter_targets is not None:
            d["adapter_targets"] = list(self.adapter_targets)
        return d

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> APTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown APT config keys {unknown}")
        d = dict(d)
        if d.get("adapter_targets") is not None:
            d["adapter_targets"] = tuple(d["adapter_targets"])
        return cls(**d)

    @classmethod
    def from_json(cls, path: str | Path) -> APTConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))
