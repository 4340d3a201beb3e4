"""LLaMA-family spec: LLaMA (Llama 2 and 3, SmolLM), Qwen2, Qwen3 and Mistral decoders, grouped-query attention
included.

Pre-norm layers: ``h = h + o(attn(RMSNorm(h)))`` then ``h = h + down(act(gate(x)) * up(x))`` with
``x = RMSNorm(h)``. A sublayer whose heads (or neurons) are all pruned adds nothing to the residual stream, so
it is skipped as a whole, its norm included: the skipped sublayer outputs zeros.

Grouped-query attention: query head ``h`` reads key/value head ``h // group_size`` (transformers' ``repeat_kv``
repeats each key/value head over consecutive query heads). The pruning unit is one key/value head with its
group of query heads, so every site keeps its group size, and transformers' attention modules, which infer
the head counts from the tensor shapes, run unchanged on the compacted weights.

Qwen3 normalises queries and keys per head (``q_norm``/``k_norm``, of size ``head_dim``, shared by every head):
they act within a head, so pruning heads or hidden channels leaves them whole; they go only with their whole
sublayer and, like the final norm, are not counted in the budget.

Hidden channels: the token embedding's output, every ``o_proj``/``down_proj`` output and every norm's output
are multiplied by the hidden mask, which keeps the residual stream zero on pruned channels; RMS statistics use
the kept channels only (``aptune.masks``). A language-model head tied to the token embedding stays tied after
compaction.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import ArchSpec, AttentionSite, FFNSite, HiddenSpec, ModelStructure, class_name


class SkippedAttention(nn.Module):
    """Stands in for an attention sublayer whose heads were all removed: it adds nothing to the residual.

    It still advances its layer of the key/value cache, with one placeholder head of size 1, so the cache's
    sequence length and mask sizes (which transformers reads from the first layer of each attention kind)
    stay right when that layer's attention is the one removed.
    """

    def __init__(self, layer_idx: int | None = None):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states, *args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and self.layer_idx is not None and hasattr(cache, "update"):
            placeholder = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
            cache.update(placeholder, placeholder, self.layer_idx)
        return torch.zeros_like(hidden_states), None


class SkippedMLP(nn.Module):
    """Stands in for an MLP whose neurons were all removed: it adds nothing to the residual."""

    def forward(self, x):
        return torch.zeros_like(x)


def _skip_attention(module, args, kwargs, output):
    return (torch.zeros_like(output[0]), *output[1:])


def _skip_ffn(module, args, kwargs, output):
    return torch.zeros_like(output)


_PREFIXES = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral"}
# Task heads by class-name suffix: the attributes that hold them (each reads the final hidden states).
_HEAD_SUFFIXES = {"Model": [], "ForCausalLM": ["lm_head"], "ForSequenceClassification": ["score"]}
# The heads a task class initialises anew (trained by default); a language-model head is pretrained.
_NEW_HEADS = ("score",)


def class_names(prefixes: dict[str, str]) -> tuple[str, ...]:
    """The model classes (bare model, causal LM, sequence classifier) of the given class-name prefixes."""
    return tuple(p + s for p in prefixes.values() for s in _HEAD_SUFFIXES)


class LlamaSpec(ArchSpec):
    family = "llama"
    #: model type -> class-name prefix
    prefixes = _PREFIXES
    model_types = tuple(_PREFIXES)
    model_classes = class_names(_PREFIXES)
    unsupported = {
        "qwen3_moe": "Qwen3 mixture-of-experts models are not supported (dense Qwen3 models are)",
        "qwen2_moe": "Qwen2 mixture-of-experts models are not supported (dense Qwen2 models are)",
        "mixtral": "Mixtral (mixture of experts) is not supported (Mistral is)",
    }

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
            attn_names, ffn_names = self.sublayer_norms(layer)
            attn_norms = [getattr(layer, n) for n in attn_names]
            ffn_norms = [getattr(layer, n) for n in ffn_names]
            att = layer.self_attn
            if isinstance(att, SkippedAttention):
                attention.append(AttentionSite.dead(f"layers.{i}.self_attn", i, default_head_dim))
            else:
                site = self.attention_site(i, att, attn_norms)
                attention.append(site)
                readers += site.inputs
                producers.append(site.o)
                norms += attn_norms
            mlp = layer.mlp
            if isinstance(mlp, SkippedMLP):
                ffn.append(FFNSite(f"layers.{i}.mlp", i, None, None, 0, None, None))
            else:
                ffn_site = self.ffn_site(i, mlp, ffn_norms)
                ffn.append(ffn_site)
                readers += ffn_site.inputs
                producers.append(ffn_site.down)
                norms += ffn_norms
        norms.append(base.norm)

        embed = base.embed_tokens
        head_modules: dict[str, nn.Module] = {}
        new_heads: dict[str, nn.Module] = {}
        tied: list[tuple[nn.Linear, nn.Embedding]] = []
        for attr in self.head_attributes(model):
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
            norm_over_kept=self.norm_over_kept,
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

    # -- what a family that differs from LLaMA overrides (see arch/gemma.py) ----------------------------------
    #: the norm of a partly masked hidden stream over its kept channels (None: aptune.masks' RMS norm)
    norm_over_kept = None

    #: q, k, v are one fused projection and so are gate and up (Phi-3); see :meth:`qkv` and :meth:`gate_up`
    fused_projections = False
    #: (site, num_heads, num_kv_heads) -> None: what to update on the attention module after compaction
    #: (None: nothing, transformers' LLaMA attention infers head counts from the tensor shapes)
    resize_attention = None

    def qkv(self, att: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module, int, int]:
        """The q, k and v projections of a live attention module, and its numbers of query and key/value heads."""
        d = att.head_dim
        return att.q_proj, att.k_proj, att.v_proj, att.q_proj.out_features // d, att.k_proj.out_features // d

    def gate_up(self, mlp: nn.Module) -> tuple[nn.Module, nn.Module, int]:
        """The gate and up projections of a live MLP, and its number of neurons."""
        return mlp.gate_proj, mlp.up_proj, mlp.up_proj.out_features

    def attention_site(self, i: int, att: nn.Module, norms: list[nn.Module]) -> AttentionSite:
        """The site of layer ``i``'s live attention module ``att`` (with the sublayer's ``norms``)."""
        q, k, v, heads, kv_heads = self.qkv(att)
        return AttentionSite(
            name=f"layers.{i}.self_attn",
            layer=i,
            q=q,
            k=k,
            v=v,
            o=att.o_proj,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=att.head_dim,
            block=att,
            skip=_skip_attention,
            norms=norms,
            on_resize=self.resize_attention,
            fused=self.fused_projections,
        )

    def ffn_site(self, i: int, mlp: nn.Module, norms: list[nn.Module]) -> FFNSite:
        """The site of layer ``i``'s live MLP (with the sublayer's ``norms``)."""
        gate, up, neurons = self.gate_up(mlp)
        return FFNSite(
            name=f"layers.{i}.mlp",
            layer=i,
            up=up,
            down=mlp.down_proj,
            num_neurons=neurons,
            block=mlp,
            skip=_skip_ffn,
            gate=gate,
            norms=norms,
            fused=self.fused_projections,
        )

    def sublayer_norms(self, layer: nn.Module) -> tuple[list[str], list[str]]:
        """Names of the norms that belong to a layer's attention and to its FFN sublayer."""
        return ["input_layernorm"], ["post_attention_layernorm"]

    def head_attributes(self, model: nn.Module) -> list[str]:
        """The attributes of ``model`` that hold its task heads."""
        return _head_attributes(model, self.prefixes)

    def drop_attention(self, model: nn.Module, site: AttentionSite) -> None:
        layer = model.base_model.layers[site.layer]
        layer.self_attn = SkippedAttention(site.layer)
        for name in self.sublayer_norms(layer)[0]:
            setattr(layer, name, nn.Identity())

    def drop_ffn(self, model: nn.Module, site: FFNSite) -> None:
        layer = model.base_model.layers[site.layer]
        layer.mlp = SkippedMLP()
        for name in self.sublayer_norms(layer)[1]:
            setattr(layer, name, nn.Identity())

    def facts(self, model: nn.Module) -> dict[str, str]:
        return decoder_facts(model)

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


def _head_attributes(model: nn.Module, prefixes: dict[str, str]) -> list[str]:
    name = class_name(model)
    for prefix in prefixes.values():
        if name.startswith(prefix):
            return _HEAD_SUFFIXES.get(name[len(prefix) :], [])
    return []


def decoder_facts(model: nn.Module) -> dict[str, str]:
    """What ``aptune info`` shows about a decoder beyond its shapes: per-head q/k norms, fused projections, partial
    rotary embeddings, sliding-window layers, soft-capping, the embedding scale and tied embeddings (only the facts
    that apply)."""
    config = model.config
    base = model.base_model
    facts: dict[str, str] = {}
    live = [layer.self_attn for layer in base.layers if not isinstance(layer.self_attn, SkippedAttention)]
    if live and getattr(live[0], "q_norm", None) is not None:
        facts["q/k norms"] = (
            f"per head (size {live[0].q_norm.weight.shape[0]}), shared by all heads: kept whole when heads "
            "are pruned"
        )
    if live and getattr(live[0], "qkv_proj", None) is not None:
        facts["fused projections"] = (
            "qkv_proj (q, k, v rows) and gate_up_proj (gate, up rows): sliced per unit and neuron; adapters on "
            "q/k/v/gate/up adapt only their rows"
        )
    rope = getattr(config, "rope_parameters", None) or {}
    rotary = rope.get("partial_rotary_factor", 1.0) if isinstance(rope, dict) else 1.0
    if live and rotary < 1:
        d = live[0].head_dim
        facts["partial rotary"] = (
            f"{int(d * rotary)} of {d} channels per head (kept whole when heads are pruned)"
        )
    types = list(getattr(config, "layer_types", None) or [])
    window = getattr(config, "sliding_window", None)
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    if window and sliding:
        facts["sliding window"] = (
            f"{window} tokens in {len(sliding)} of {len(types)} layers, global in the others"
        )
    elif window and not types:
        facts["sliding window"] = f"{window} tokens in every layer"
    caps = [
        f"{what} {value:g}"
        for what, value in (
            ("attention", getattr(config, "attn_logit_softcapping", None)),
            ("final logits", getattr(config, "final_logit_softcapping", None)),
        )
        if value
    ]
    if caps:
        facts["soft-capping"] = ", ".join(caps)
    scale = getattr(base.embed_tokens, "embed_scale", None)
    if scale is not None:
        facts["embedding scale"] = (
            f"{float(scale):g} (sqrt of the original hidden size; kept after hidden pruning)"
        )
    head = getattr(model, "lm_head", None)
    if head is not None and head.weight is base.embed_tokens.weight:
        facts["tied embeddings"] = "lm_head shares the token embedding"
    return facts
