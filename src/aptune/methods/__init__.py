"""Training methods: APT and the baselines users compare it with, behind one interface (:class:`Method`).

========== ================================================================================================
name       what it does
========== ================================================================================================
apt        Adaptive Pruning and Tuning (this package's method)
full       full fine-tuning
lora       LoRA from PEFT (q, v at r 8 by default), merged at the end
lora-prune LoRA, then Mask-Tuning (Fisher mask search, rearrangement, least-squares rescaling), then LoRA
           retraining
loraprune  LoRAPrune: iterative pruning during LoRA training with LoRA-guided importance
llm-pruner LLM-Pruner-style: one-shot pruning by first-order Taylor importance, then LoRA recovery
========== ================================================================================================

Each method lives in its own module or folder; this registry maps names to them and says which model
families each supports, so a run fails with a clear message before any training.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..config import APTConfig, ConfigError
from .base import AdapterMethod, Calibration, Method, lr_factor
from .config import BaselineConfig

ALL_ROLES = ("q", "k", "v", "o", "up", "gate", "down")


@dataclass
class BuildContext:
    """What a method's factory gets: the model and every setting of the run."""

    model: nn.Module
    total_steps: int  # the configured training length
    steps_per_epoch: int
    apt: APTConfig
    baseline: BaselineConfig
    lora_rank: int
    lora_targets: tuple[str, ...]
    calibration: Calibration  # fresh training batches on the device, for methods that calibrate
    resuming: bool = False  # a checkpoint will restore the state: skip pruning at construction
    sharded: bool = False  # the frozen weights are sharded over processes (aptune.sharding)


@dataclass(frozen=True)
class MethodInfo:
    name: str
    summary: str
    factory: Callable[[BuildContext], Method]
    default_lr: float
    lora_targets: tuple[str, ...] = ()  # default adapter roles (empty: the method has no LoRA)
    prunes: bool = True
    families: tuple[str, ...] | None = None  # None: every family aptune has a spec for
    sharded: bool = False  # trains a model whose frozen weights are sharded (aptune train --fsdp)


def _apt(c: BuildContext) -> Method:
    from .apt import APT

    return APT(c.model, c.apt, c.total_steps, c.steps_per_epoch, c.calibration, c.resuming, c.sharded)


def _full(c: BuildContext) -> Method:
    from .plain import FullFineTuning

    return FullFineTuning(c.model, c.total_steps)


def _lora(c: BuildContext) -> Method:
    from .plain import PeftLoRA

    return PeftLoRA(c.model, c.total_steps, c.lora_rank, c.lora_targets)


def _mask_tuning(c: BuildContext) -> Method:
    from .mask_tuning.method import MaskTuning

    return MaskTuning(
        c.model,
        c.total_steps,
        c.steps_per_epoch,
        c.lora_rank,
        c.lora_targets,
        c.apt,
        c.baseline,
        c.calibration,
    )


def _loraprune(c: BuildContext) -> Method:
    from .loraprune.method import LoRAPrune

    return LoRAPrune(c.model, c.total_steps, c.lora_rank, c.lora_targets, c.apt, c.baseline)


def _llm_pruner(c: BuildContext) -> Method:
    from .llm_pruner.method import LLMPruner

    return LLMPruner(
        c.model, c.total_steps, c.lora_rank, c.lora_targets, c.apt, c.baseline, c.calibration, c.resuming
    )


REGISTRY: dict[str, MethodInfo] = {}


def register(info: MethodInfo) -> None:
    """Add a method (or replace one of the same name): ``aptune train --method NAME`` and ``aptune bench``
    pick it up."""
    REGISTRY[info.name] = info


for _info in (
    MethodInfo("apt", "Adaptive Pruning and Tuning", _apt, 1e-3, sharded=True),
    MethodInfo("full", "full fine-tuning", _full, 5e-5, prunes=False),
    MethodInfo("lora", "LoRA (PEFT), merged at the end", _lora, 5e-4, ("q", "v"), prunes=False, sharded=True),
    MethodInfo(
        "lora-prune",
        "LoRA, then Mask-Tuning pruning (Fisher search, rearrangement, rescaling), then LoRA retraining",
        _mask_tuning,
        5e-4,
        ("q", "v"),
    ),
    MethodInfo(
        "loraprune", "LoRAPrune: iterative pruning with LoRA-guided importance", _loraprune, 5e-4, ALL_ROLES
    ),
    MethodInfo(
        "llm-pruner",
        "LLM-Pruner-style: one-shot Taylor pruning, then LoRA recovery",
        _llm_pruner,
        5e-4,
        ("q", "v"),
    ),
):
    register(_info)


def method_names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def method_info(name: str) -> MethodInfo:
    if name not in REGISTRY:
        raise ConfigError(f"unknown method {name!r}; choose from {', '.join(REGISTRY)}")
    return REGISTRY[name]


def check_supported(name: str, family: str) -> None:
    """Raise :class:`ConfigError` when method ``name`` does not support model family ``family``."""
    info = method_info(name)
    if info.families is not None and family not in info.families:
        raise ConfigError(
            f"method {name!r} does not support {family!r} models (it supports: {', '.join(info.families)})"
        )


def build_method(
    name: str,
    model: nn.Module,
    *,
    total_steps: int,
    steps_per_epoch: int,
    apt: APTConfig,
    baseline: BaselineConfig,
    lora_rank: int,
    lora_targets: tuple[str, ...] | None,
    calibration: Calibration,
    resuming: bool = False,
    sharded: bool = False,
) -> Method:
    """The method object that trains ``model``. ``total_steps`` is the configured training length; a method
    with a phase before it (lora-prune's LoRA training) adds that phase, so read ``method.total_steps``.
    ``resuming``: the caller restores a checkpoint next (``method.restore``), so nothing is pruned now.
    ``sharded``: ``model``'s frozen weights are sharded (:mod:`aptune.sharding`)."""
    from ..arch import describe, is_causal_lm

    info = method_info(name)
    check_supported(name, describe(model).family)
    apt = apt.for_model(is_causal_lm(model))  # the shared target's defaults (shape) follow the model kind
    roles = tuple(lora_targets) if lora_targets is not None else info.lora_targets
    context = BuildContext(
        model, total_steps, steps_per_epoch, apt, baseline, lora_rank, roles, calibration, resuming, sharded
    )
    return info.factory(context)


__all__ = [
    "ALL_ROLES",
    "AdapterMethod",
    "BaselineConfig",
    "BuildContext",
    "Method",
    "MethodInfo",
    "REGISTRY",
    "build_method",
    "check_supported",
    "lr_factor",
    "method_info",
    "method_names",
    "register",
]
