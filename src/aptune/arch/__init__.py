"""Architecture specs: where heads, FFN neurons and hidden channels live in each model family."""

from __future__ import annotations

from torch import nn

from .base import ArchSpec, AttentionSite, FFNSite, HiddenSpec, ModelStructure, Part, class_name
from .bert import BertSpec
from .gemma import GemmaSpec
from .llama import LlamaSpec
from .phi3 import Phi3Spec
from .t5 import T5Spec

SPECS: tuple[ArchSpec, ...] = (BertSpec(), LlamaSpec(), GemmaSpec(), Phi3Spec(), T5Spec())

__all__ = [
    "SPECS",
    "ArchSpec",
    "AttentionSite",
    "FFNSite",
    "HiddenSpec",
    "ModelStructure",
    "Part",
    "UnsupportedModelError",
    "describe",
    "get_spec",
    "is_causal_lm",
]


class UnsupportedModelError(ValueError):
    """The model's family or task head is not one aptune knows."""


def supported() -> str:
    return "; ".join(f"{s.family} (model types {', '.join(s.model_types)})" for s in SPECS)


def get_spec(model: nn.Module) -> ArchSpec:
    """The spec for ``model``, or an :class:`UnsupportedModelError` that names the supported families."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    cls = class_name(model)
    for spec in SPECS:
        if model_type in spec.model_types:
            if cls not in spec.model_classes:
                raise UnsupportedModelError(
                    f"aptune does not support the {cls} head yet; for the {spec.family} family it supports "
                    f"{', '.join(spec.model_classes)}"
                )
            return spec
    for spec in SPECS:
        reason = spec.unsupported.get(model_type)
        if reason is not None:
            raise UnsupportedModelError(
                f"aptune does not support {cls} (model type {model_type!r}): {reason}"
            )
    raise UnsupportedModelError(
        f"aptune does not support {cls} (model type {model_type!r}); supported families: {supported()}"
    )


def describe(model: nn.Module) -> ModelStructure:
    """Describe the prunable structure of a loaded Hugging Face model."""
    return get_spec(model).describe(model)


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a causal language model (a ``...ForCausalLM`` class): the decoder recipe applies."""
    return class_name(model).endswith("ForCausalLM")
