"""Phi-3 spec: Phi-3 and Phi-3.5 mini/medium, Phi-4 and Phi-4-mini (``Phi3ForCausalLM``, model type ``phi3``).

A Phi-3 layer is a LLaMA layer (pre-norm RMSNorm, SwiGLU, grouped-query attention in Phi-4-mini) with two fused
projections:

* ``qkv_proj`` holds the rows of every query head, then of every key head, then of every value head. The site's
  ``q``, ``k`` and ``v`` all name it, with ``fused=True``, and :attr:`AttentionSite.parts` gives each role's row
  range. Compaction keeps, for each kept unit (a key/value head with its query heads), its query rows, its key
  rows and its value rows, in that order, so the result is again a fused ``qkv_proj``; group scores sum each
  unit's rows in each range.
* ``gate_up_proj`` holds every neuron's gate row, then every neuron's up row (``FFNSite.parts``): a neuron is its
  gate row and its up row.

Adapters with the roles ``q``, ``k``, ``v``, ``gate`` and ``up`` adapt only their role's rows of the fused output
(:class:`aptune.adapter.FusedAPTLinear`); the model stays a Phi-3 with its own weight names.

``Phi3Attention`` splits the fused output at ``config.num_attention_heads * head_dim`` and
``self.num_key_value_heads * head_dim``, where LLaMA's attention infers head counts from the tensor shapes. After
compaction each attention module therefore gets its own head counts: ``num_key_value_heads`` and a per-layer view
of the model's config (:class:`LayerConfig`) whose head counts are the layer's and whose other fields read
through to the model's config (attention implementation included).

Partial rotary embeddings (Phi-4-mini rotates the first 3/4 of each head) act within a head and need nothing. A
long-RoPE config (Phi-3-128k, Phi-3.5-mini, Phi-4-mini) lists ``head_dim * partial_rotary_factor / 2`` factors
and transformers checks that number against ``hidden_size // num_attention_heads``, so a uniform result is written
as a plain Phi-3 config only when it still passes that check (otherwise :func:`aptune.load_pruned` rebuilds it).
The config gets ``head_dim``, which ``Phi3Attention`` and the rotary embedding read when it is set. Tied
embeddings (Phi-4-mini) are handled by :class:`HiddenSpec.tied`.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from .base import AttentionSite
from .llama import LlamaSpec, class_names

try:  # what transformers' (strict dataclass) configs raise when a validator fails
    from huggingface_hub.errors import StrictDataclassError as _ConfigInvalid
except ImportError:  # pragma: no cover - older huggingface_hub
    _ConfigInvalid = ValueError

_PREFIXES = {"phi3": "Phi3"}


class LayerConfig:
    """A model config as one attention layer sees it: the layer's own fields (head counts) over the model's.

    Every other attribute reads through to the model's config, so later changes to it (the attention
    implementation) still reach the layer.
    """

    def __init__(self, config: Any, **own: Any):
        if isinstance(config, LayerConfig):
            config = config.model_config
        self.model_config = config
        self.__dict__.update(own)

    def __getattr__(self, name: str) -> Any:
        config = self.__dict__.get("model_config")  # absent while copy/pickle rebuilds the object
        if config is None:
            raise AttributeError(name)
        return getattr(config, name)


def resize_attention(site: AttentionSite, num_heads: int, num_kv_heads: int) -> None:
    """Give a compacted ``Phi3Attention`` its own head counts (its forward splits ``qkv_proj`` by them)."""
    att = site.block
    att.num_key_value_heads = num_kv_heads
    att.config = LayerConfig(att.config, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads)


class Phi3Spec(LlamaSpec):
    family = "phi3"
    prefixes = _PREFIXES
    model_types = tuple(_PREFIXES)
    model_classes = class_names(_PREFIXES)
    unsupported = {
        "phimoe": "Phi-3.5-MoE (mixture of experts) is not supported (dense Phi-3 and Phi-4 models are)",
        "phi4_multimodal": "the multimodal Phi-4 is not supported (Phi-4 and Phi-4-mini, model type phi3, are)",
        "phi": "Phi-1 and Phi-2 (model type phi: parallel attention and MLP, LayerNorm) are not supported; "
        "Phi-3 and Phi-4 (model type phi3) are",
    }
    fused_projections = True
    resize_attention = staticmethod(resize_attention)

    def qkv(self, att: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module, int, int]:
        qkv, d = att.qkv_proj, att.head_dim
        heads = att.o_proj.in_features // d
        return qkv, qkv, qkv, heads, (qkv.out_features // d - heads) // 2

    def gate_up(self, mlp: nn.Module) -> tuple[nn.Module, nn.Module, int]:
        gate_up = mlp.gate_up_proj
        return gate_up, gate_up, gate_up.out_features // 2

    def update_config(self, config: Any, plan: dict) -> bool:
        # try the new sizes on a copy first: transformers rejects a long-RoPE config whose factor lists no longer
        # match hidden_size // num_attention_heads, and the model's config must stay valid (it is saved)
        trial = copy.deepcopy(config)
        if not super().update_config(trial, plan):
            return False
        try:
            trial.validate()
        except (ValueError, _ConfigInvalid):
            return False
        return super().update_config(config, plan)
