"""The two methods that do not prune: full fine-tuning and LoRA (PEFT, merged at the end)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from torch import nn

from ..config import ConfigError
from .base import Method


class FullFineTuning(Method):
    """Every parameter trains."""

    name = "full"

    def __init__(self, model: nn.Module, total_steps: int):
        super().__init__(model, total_steps)
        for p in model.parameters():
            p.requires_grad_(True)

    def density(self) -> float:
        return 1.0


def attach_peft_lora(model: nn.Module, rank: int, roles: Sequence[str]) -> nn.Module:
    """PEFT LoRA (alpha = 2 x rank) on the projections with the given roles, found through the arch spec.

    The task layers the task class adds (the spec's ``new_heads``: a classifier, a score layer) train fully,
    as in PEFT's sequence-classification default and in aptune's own adapter methods; a pretrained pooler stays
    frozen. Needs ``pip install peft``.
    """
    try:
        from peft import LoraConfig, TaskType, get_peft_model
    except ImportError:
        raise ConfigError("method 'lora' needs PEFT: pip install peft") from None
    from ..arch import describe

    structure = describe(model)
    names = {id(m): n for n, m in model.named_modules()}
    targets = [
        names[id(getattr(site, role))]
        for site in [*structure.attention, *structure.ffn]
        for role in roles
        if getattr(site, role, None) is not None
    ]
    if not targets:
        raise ConfigError(f"no projections with roles {list(roles)} in this model")
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=targets,
        modules_to_save=list(structure.new_heads) or None,
    )
    with warnings.catch_warnings():
        # PEFT reads transformers' old checkpointing flag, which warns on transformers >= 5.18: not the user's code
        warnings.filterwarnings(
            "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        return get_peft_model(model, config)


class PeftLoRA(Method):
    """Static LoRA from PEFT, the library users know; merged into the weights at the end."""

    name = "lora"

    def __init__(self, model: nn.Module, total_steps: int, rank: int, roles: Sequence[str]):
        super().__init__(attach_peft_lora(model, rank, roles), total_steps)

    def density(self) -> float:
        return 1.0

    def finish(self) -> nn.Module:
        return self.model.merge_and_unload()
