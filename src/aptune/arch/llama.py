"""LLaMA-family spec: LLaMA (Llama 2 and 3, SmolLM), Qwen2 and Mistral decoders, grouped-query attention included.

Pre-norm layers: ``h = h + o(attn(RMSNorm(h)))`` then ``h = h + down(act(gate(x)) * up(x))`` with
``x = RMSNorm(h)``. A sublayer whose heads (or neurons) are all pruned adds nothing to the residual stream, so
it is skipped as a whole, its norm included: the skipped sublayer outputs zeros.

Grouped-query attention: query head ``h`` reads key/value head ``h // group_size`` (transformers' ``repeat_kv``
repeats each key/value head over consecutive query heads). The pruning unit is one key/value head with its
group of query heads, so every site keeps its group size, and transformers' attention modules, which infer
the head counts from the tensor shapes, run unchanged on the compacted weights.

Hidden channels: the token embedding's output, every ``o_proj``/``down_proj`` output and every norm's output
are multiplied by the hidden mask, which keeps the residual stream zero on pruned channels; RMS statistics use
the kept channels only (``aptune.masks``). A language-model head tied to the token embedding stays tied after
compaction.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import ArchSpec, AttentionSite, FFNSite, HiddenSpec, ModelStructure


class SkippedAttention(nn.Module):
    """Stands in for an attention sublayer whose heads were all removed: it adds nothing to the residual."""

    def forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states), None


class SkippedMLP(nn.Module):
    """Stands in for an MLP whose neurons were all removed: it adds nothing to the residual."""

    def forward(self, x):
        return torch.zeros_like(x)


def _skip_attention(module, args, kwargs, output):
    return (torch.zeros_like(output[0]), *output[1:])


def _skip_ffn(module, args, kwargs, output):
    return torch.zeros_like(output)


_PREFIXES = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}
# Task heads by class-name suffix: the attributes that hold them (each reads the final hidden states).
_HEAD_SUFFIXES = {"Model": [], "ForCausalLM": ["lm_head"], "ForSequenceClassification": ["score"]}
# The heads a task class initialises anew (trained by default); a language-model head is pretrained.
_NEW_HEADS = ("score",)


class LlamaSpec(ArchSpec):
    family = "llama"
    model_types = tuple(_PREFIXES)
    model_classes = tuple(p + s for p in _PREFIXES.values() for s in _HEAD_SUFFIXES)

    def describe(self, model: nn.Module) -> ModelStructure:
        base = model.base_model
        config = model.config
        layers = base.layers
        default_head_dim = (
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )

        attention: list[AttentionSite] = []
        ffn: list[FFNSite] = []
        readers: list[nn.Linear] = []
        producers: list[nn.Linear] = []
        norms: list[nn.Module] = []
        for i, layer in enumerate(layers):
            att = layer.self_attn
            if isinstance(att, SkippedAttention):
                attention.append(AttentionSite.dead(f"layers.{i}.self_attn", i, default_head_dim))
            else:
                q, k, v, o = att.q_proj, att.k_proj, att.v_proj, att.o_proj
                head_dim = att.head_dim
                attention.append(
                    AttentionSite(
                        name=f"layers.{i}.self_attn",
                        layer=i,
                        q=q,
                        k=k,
                        v=v,
                        o=o,
                        num_heads=q.out_features // head_dim,
                        num_kv_heads=k.out_features // head_dim,
                        head_dim=head_dim,
                        block=att,
                        skip=_skip_attention,
                        norms=[layer.input_layernorm],
                    )
                )
                readers += [q, k, v]
                producers.append(o)
                norms.append(layer.input_layernorm)
            mlp = layer.mlp
            if isinstance(mlp, SkippedMLP):
                ffn.append(FFNSite(f"layers.{i}.mlp", i, None, None, 0, None, None))
            else:
                ffn.append(
                    FFNSite(
                        name=f"layers.{i}.mlp",
                        layer=i,
                        up=mlp.up_proj,
                        down=mlp.down_proj,
                        num_neurons=mlp.up_proj.out_features,
                        block=mlp,
                        skip=_skip_ffn,
                        gate=mlp.gate_proj,
                        norms=[layer.post_attention_layernorm],
                    )
                )
                readers += [mlp.gate_proj, mlp.up_proj]
                producers.append(mlp.down_proj)
                norms.append(layer.post_attention_layernorm)
        norms.append(base.norm)

        embed = base.embed_tokens
        head_modules: dict[str, nn.Module] = {}
        new_heads: dict[str, nn.Module] = {}
        tied: list[tuple[nn.Linear, nn.Embedding]] = []
        for attr in _head_attributes(model):
            module = getattr(model, attr)
            readers.append(module)
            head_modules[attr] = module
            if attr in _NEW_HEADS:
                new_heads[attr] = module
            if module.weight is embed.weight:
                tied.append((module, embed))
        hidden = HiddenSpec(
            size=embed.embedding_dim,
            embeddings=[embed],
            readers=readers,
            producers=producers,
            norms=norms,
            mask_outputs=[embed],
            tied=tied,
        )
        return ModelStructure(
            family=self.family,
            attention=attention,
            ffn=ffn,
            hidden=hidden,
            num_layers=len(layers),
            # the final norm is outside the layers: reported with the embeddings, not counted in the budget
            embedding_modules={"embed_tokens": embed, "norm": base.norm},
            head_modules=head_modules,
            new_heads=new_heads,
        )

    def drop_attention(self, model: nn.Module, site: AttentionSite) -> None:
        layer = model.base_model.layers[site.layer]
        layer.self_attn = SkippedAttention()
        layer.input_layernorm = nn.Identity()

    def drop_ffn(self, model: nn.Module, site: FFNSite) -> None:
        layer = model.base_model.layers[site.layer]
        layer.mlp = SkippedMLP()
        layer.post_attention_layernorm = nn.Identity()

    def update_config(self, config: Any, plan: dict) -> bool:
        heads, kv_heads, neurons = plan["heads"], plan["kv_heads"], plan["neurons"]
        uniform = (
            all(len(set(x)) == 1 for x in (heads, kv_heads, neurons)) and heads[0] > 0 and neurons[0] > 0
        )
        # the config names the head size (head_dim), so any hidden size is expressible with uniform layers
        if uniform and plan["head_dim"] is not None:
            config.hidden_size = plan["hidden"]
            config.num_attention_heads = heads[0]
            config.num_key_value_heads = kv_heads[0]
            config.intermediate_size = neurons[0]
            config.head_dim = plan["head_dim"]
            return True
        return False


def _head_attributes(model: nn.Module) -> list[str]:
    name = type(model).__name__
    for prefix in _PREFIXES.values():
        if name.startswith(prefix):
            return _HEAD_SUFFIXES.get(name[len(prefix) :], [])
    return []
