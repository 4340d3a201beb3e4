"""Gemma-family spec: Gemma, Gemma 2 and the text-only Gemma 3 (``Gemma3ForCausalLM``, model type ``gemma3_text``).

What differs from LLaMA, and how it is handled:

* **Norms around each sublayer.** Gemma 2 and 3 layers compute
  ``h = h + post_attention_norm(o(attn(input_norm(h))))`` then
  ``h = h + post_feedforward_norm(down(gelu(gate(x)) * up(x)))`` with ``x = pre_feedforward_norm(h)``: four norms
  per layer, all over the hidden channels. Each belongs to its sublayer (it is counted with it and removed with
  it). A sublayer whose heads (or neurons) are all pruned outputs zeros, and a post-norm of zeros is zeros, so
  it still adds nothing to the residual; compaction replaces the sublayer and both its norms with modules that
  do the same. Gemma (1) has LLaMA's two pre-norms.
* **RMSNorm with ``(1 + weight)``, in float32.** Under a partial hidden mask every hidden norm (post-norms
  included: they read an ``o_proj``/``down_proj`` output that is zero on pruned channels) normalises over the
  kept channels with Gemma's own formula (:func:`gemma_norm_over_kept`), so masked and compacted agree exactly.
* **Embedding scale.** The token embedding multiplies its output by ``sqrt(hidden_size)`` (a buffer set from
  ``config.hidden_size`` when the model is built). Pruning hidden channels must keep the *original* scale: the
  live model keeps its buffer, and the config keeps the original ``hidden_size`` whenever hidden channels are
  pruned (:meth:`GemmaSpec.update_config` then reports the model as not plain-loadable), so
  :func:`aptune.load_pruned`, which builds the model from the config before cutting it to the saved shape,
  restores the original scale. Without hidden pruning a uniform result is a plain Gemma config.
* ``head_dim`` is set in the config, independent of hidden size and heads; grouped-query attention as in LLaMA
  (one unit = one key/value head with its query heads). Gemma 3's per-head ``q_norm``/``k_norm`` (size
  ``head_dim``, shared by every head) are left whole; they disappear only with their whole sublayer and are not
  counted in the budget (like the final norm).
* Sliding-window and global layers, attention and final-logit soft-capping and tied embeddings need nothing:
  they act within a head, on the logits, or are handled by :class:`HiddenSpec.tied`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .base import class_name
from .llama import LlamaSpec

# model class -> the attributes that hold its task heads (each reads the final hidden states)
_CLASSES = {
    "GemmaModel": [],
    "GemmaForCausalLM": ["lm_head"],
    "GemmaForSequenceClassification": ["score"],
    "Gemma2Model": [],
    "Gemma2ForCausalLM": ["lm_head"],
    "Gemma2ForSequenceClassification": ["score"],
    "Gemma3TextModel": [],
    "Gemma3ForCausalLM": ["lm_head"],
    "Gemma3TextForSequenceClassification": ["score"],
}
_NEW_HEADS = ("score",)


def gemma_norm_over_kept(norm: nn.Module, x: Tensor, kept: Tensor) -> Tensor:
    """Gemma's RMSNorm of ``x`` over the ``kept`` channels only (others 0): ``x / rms(x) * (1 + weight)``, all in
    float32 and cast back at the end, as transformers' ``Gemma*RMSNorm`` computes it."""
    y = torch.zeros_like(x)
    h = x[..., kept].float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps)
    y[..., kept] = (h * (1.0 + norm.weight[kept].float())).type_as(x)
    return y


class GemmaSpec(LlamaSpec):
    family = "gemma"
    model_types = ("gemma", "gemma2", "gemma3_text")
    model_classes = tuple(_CLASSES)
    unsupported = {
        "gemma3": "the multimodal Gemma 3 (Gemma3ForConditionalGeneration) is not supported; use a text-only "
        "Gemma 3 checkpoint (model type gemma3_text, loaded as Gemma3ForCausalLM, e.g. gemma-3-270m or gemma-3-1b)",
        "gemma3n": "Gemma 3n is not supported (its layers differ: per-layer embeddings, AltUp); Gemma 2 and the "
        "text-only Gemma 3 are",
    }

    norm_over_kept = staticmethod(gemma_norm_over_kept)

    def sublayer_norms(self, layer: nn.Module) -> tuple[list[str], list[str]]:
        if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma 2 and 3: a pre- and a post-norm around each
            return (
                ["input_layernorm", "post_attention_layernorm"],
                ["pre_feedforward_layernorm", "post_feedforward_layernorm"],
            )
        return ["input_layernorm"], ["post_attention_layernorm"]  # Gemma: pre-norms only

    def head_attributes(self, model: nn.Module) -> list[str]:
        return _CLASSES.get(class_name(model), [])

    def update_config(self, config: Any, plan: dict) -> bool:
        # config.hidden_size also sets the embedding scale (sqrt(hidden_size)) of a model built from the config:
        # it must stay the original, so a model with pruned hidden channels is rebuilt by aptune.load_pruned
        return plan["hidden"] == config.hidden_size and super().update_config(config, plan)
