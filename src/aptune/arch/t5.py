"""T5 spec: T5 v1.0, T5 v1.1 and the LM-adapted T5 (``T5ForConditionalGeneration``, ``T5Model``, ``T5EncoderModel``).

A T5 is an encoder and a decoder stack of pre-norm layers with ``T5LayerNorm`` (an RMS norm without bias) and no
biases anywhere:

* encoder layer: ``h = h + o(self_attn(norm(h)))`` then ``h = h + ffn(norm(h))``;
* decoder layer: the same with a cross-attention in between, ``h = h + o(cross_attn(norm(h), encoder_output))``.

**Sites.** Every attention sublayer is a site: one self-attention per encoder layer, a self-attention and a
cross-attention per decoder layer (``encoder.layer.3.self_attention``, ``decoder.layer.1.cross_attention``), and
every FFN (``encoder.layer.3.ffn``). The model's layers are numbered encoder first: decoder layer ``j`` is layer
``num_encoder_layers + j`` (:attr:`AttentionSite.layer`), which is how self-distillation tells the stacks apart.
Heads have size ``config.d_kv``, independent of ``d_model``. The v1.0 FFN is ``wo(act(wi(x)))`` (role ``up`` =
``wi``); the gated v1.1 / LM-adapt FFN is ``wo(act(wi_0(x)) * wi_1(x))`` (roles ``gate`` = ``wi_0``, ``up`` =
``wi_1``, as LLaMA's ``gate_proj``/``up_proj``). APT's default adapters are the paper's (spec §2.4): q and v of all
three attention kinds and the FFN's first input projection, ``wi`` or ``wi_0``.

**Relative position bias.** Only layer 0's self-attention of each stack holds the table
(``relative_attention_bias``, one column per head); transformers computes the bias ``(1, heads, q, k)`` there and
hands the same tensor to every later layer (the decoder's cross-attentions likewise share a zeros bias). Pruning
heads per layer breaks that sharing: each layer keeps other heads. So the table is never sliced. A compacted
attention remembers which *original* heads it keeps (the buffer ``aptune_heads``, saved with the weights) and
gets two hooks: before its forward it takes the full bias handed down (or computes it, as layer 0 would) and
passes on only its heads' columns; after it, it hands the *full* bias on to the next layer. A masked model (heads
masked, not removed) needs none of this. A self-attention whose heads are all removed is replaced by
:class:`SkippedSelfAttention`, which still computes the bias (layer 0 keeps the table there) and hands it on, and
still advances its layer of the decoder's key/value cache, whose length generation reads from layer 0.

**Hidden channels.** The shared token embedding (``shared``, and the stacks' ``embed_tokens``, which share its
weight), every q/k/v/wi reader (the cross-attention's k and v read the encoder's output), every o/wo producer,
every ``T5LayerNorm`` (statistics over the kept channels, :func:`t5_norm_over_kept`, computed as T5 computes
them) and the language-model head's input columns.

**The decoder output scale.** T5 v1.0 ties ``lm_head`` to ``shared`` and multiplies the decoder output by
``d_model ** -0.5`` before it (``T5ForConditionalGeneration.forward``, when ``config.scale_decoder_outputs``; the
model reads ``self.model_dim``, set from ``config.d_model`` when it is built). After hidden-channel pruning the
scale must stay the original one, or the masked and the compacted model disagree. The live model keeps its
``model_dim``; the config keeps the original ``d_model`` whenever hidden channels are pruned under that scale
(:meth:`T5Spec.update_config` then reports the model as not plain-loadable), so :func:`aptune.load_pruned`, which
builds the model from the config before cutting it to the saved shape, restores the original scale too. v1.1 does
not scale (its ``lm_head`` is its own), so there a pruned ``d_model`` is written to the config.

**Plain loading.** A stock ``from_pretrained`` rebuilds a pruned T5 only when no head was removed anywhere
(the position bias is shared, so per-layer head sets need the hooks above), the FFNs are uniform and the scale
allows the hidden size; every other result is loaded with :func:`aptune.load_pruned`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .base import ArchSpec, AttentionSite, FFNSite, HiddenSpec, ModelStructure, class_name

# model class -> whether it has a decoder and a language-model head
_CLASSES = {
    "T5ForConditionalGeneration": (True, True),
    "T5Model": (True, False),
    "T5EncoderModel": (False, False),
}


# -- the relative position bias ---------------------------------------------------------------------------


class PositionBias(nn.Module):
    """The relative position bias table of a stack whose layer-0 self-attention was removed: it computes the
    bias ``(1, heads, q, k)`` as ``T5Attention.compute_bias`` does, for all original heads."""

    def __init__(self, attention: nn.Module):
        super().__init__()
        self.relative_attention_bias = attention.relative_attention_bias
        self.is_decoder = bool(attention.is_decoder)
        self.num_buckets = attention.relative_attention_num_buckets
        self.max_distance = attention.relative_attention_max_distance

    def forward(self, query_length: int, key_length: int, past: Any, device: torch.device) -> Tensor:
        from transformers.models.t5.modeling_t5 import T5Attention

        context = torch.arange(query_length, dtype=torch.long, device=device)[:, None] + past
        memory = torch.arange(key_length, dtype=torch.long, device=device)[None, :]
        buckets = T5Attention._relative_position_bucket(
            memory - context,
            bidirectional=not self.is_decoder,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )
        return self.relative_attention_bias(buckets).permute([2, 0, 1]).unsqueeze(0)


def _cache_of(kwargs: dict) -> Any:
    return kwargs.get("cache", kwargs.get("past_key_values"))


def _full_bias(att: nn.Module, args: tuple, kwargs: dict) -> Tensor:
    """The bias of every original head that ``att`` (a ``T5Attention`` called with ``args`` and ``kwargs``) would
    compute when none is handed to it: the relative position bias in layer 0's self-attention, zeros elsewhere
    (the cross-attentions)."""
    hidden = args[0] if args else kwargs["hidden_states"]
    cache = args[4] if len(args) > 4 else _cache_of(kwargs)
    past = cache.get_seq_length(att.layer_idx) if cache is not None else 0
    query_length = hidden.shape[1]
    memory = args[2] if len(args) > 2 else kwargs.get("key_value_states")
    key_length = memory.shape[1] if memory is not None else past + query_length
    if att.has_relative_attention_bias:
        return att.compute_bias(query_length, key_length, device=hidden.device, past_seen_tokens=past)
    shape = (1, att.config.num_heads, query_length, key_length)
    return torch.zeros(shape, device=hidden.device, dtype=hidden.dtype)


def _bias_pre_hook(att: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Before a compacted ``T5Attention``: pass it the bias columns of its kept original heads only."""
    positional = len(args) > 3
    bias = args[3] if positional else kwargs.get("position_bias")
    if bias is None:
        bias = _full_bias(att, args, kwargs)
    att._aptune_full_bias = bias  # handed on by the post-hook
    mine = bias.index_select(1, att.aptune_heads.to(bias.device))
    if positional:
        return (*args[:3], mine, *args[4:]), kwargs
    return args, {**kwargs, "position_bias": mine}


def _bias_post_hook(att: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    """After a compacted ``T5Attention``: hand the full bias (all original heads) on to the next layer."""
    full = att.__dict__.pop("_aptune_full_bias", None)
    if full is None:
        return None
    return (output[0], full, *output[2:])


def keep_heads(site: AttentionSite, units: Tensor) -> None:
    """``AttentionSite.on_prune``: record which original heads the compacted attention keeps (``aptune_heads``, a
    buffer saved with the weights) and hook it to read their bias columns (once per module)."""
    att = _attention_of(site.block)
    previous = getattr(att, "aptune_heads", None)
    units = units.to(device=att.o.weight.device, dtype=torch.long)
    heads = units if previous is None else previous[units.to(previous.device)]
    if previous is None:
        att.register_buffer("aptune_heads", heads.clone())
    else:
        att.aptune_heads = heads.clone()
    if not getattr(att, "_aptune_bias_hooks", False):
        att.register_forward_pre_hook(_bias_pre_hook, with_kwargs=True)
        att.register_forward_hook(_bias_post_hook, with_kwargs=True)
        att._aptune_bias_hooks = True


def resize_attention(site: AttentionSite, num_heads: int, num_kv_heads: int) -> None:
    """``AttentionSite.on_resize``: the head count ``T5Attention`` keeps (it sizes a zeros bias by it)."""
    att = _attention_of(site.block)
    att.n_heads = num_heads
    att.inner_dim = num_heads * att.key_value_proj_dim


# -- sublayers with nothing left ---------------------------------------------------------------------------


class SkippedSelfAttention(nn.Module):
    """Stands in for a ``T5LayerSelfAttention`` whose heads were all removed: the residual passes unchanged.

    It still hands the position bias on (computing it from the table it keeps when it is layer 0 of its stack)
    and still advances its layer of the decoder's key/value cache, with one placeholder head of size 1, so the
    cache length that masks and generation read from layer 0 stays right.
    """

    def __init__(self, layer_idx: int, position_bias: PositionBias | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.position_bias = position_bias

    def forward(self, hidden_states, attention_mask=None, position_bias=None, cache=None, **kwargs):
        cache = cache if cache is not None else kwargs.get("past_key_values")
        past = cache.get_seq_length(self.layer_idx) if cache is not None else 0
        query_length = hidden_states.shape[1]
        if position_bias is None and self.position_bias is not None:
            position_bias = self.position_bias(query_length, past + query_length, past, hidden_states.device)
        own = getattr(cache, "self_attention_cache", cache)
        if own is not None and hasattr(own, "update"):
            placeholder = hidden_states.new_zeros(hidden_states.shape[0], 1, query_length, 1)
            own.update(placeholder, placeholder, self.layer_idx)
        return hidden_states, position_bias, None


class SkippedCrossAttention(nn.Module):
    """Stands in for a ``T5LayerCrossAttention`` whose heads were all removed: the residual and the (zeros)
    cross-attention bias pass unchanged."""

    def forward(
        self, hidden_states, key_value_states=None, attention_mask=None, position_bias=None, **kwargs
    ):
        return hidden_states, position_bias, None


class SkippedFF(nn.Module):
    """Stands in for a ``T5LayerFF`` whose neurons were all removed: the residual passes unchanged."""

    def forward(self, hidden_states):
        return hidden_states


def _skip_attention(module, args, kwargs, output):
    hidden = args[0] if args else kwargs["hidden_states"]
    return (hidden, *output[1:])


def _skip_ffn(module, args, kwargs, output):
    return args[0] if args else kwargs["hidden_states"]


def t5_norm_over_kept(norm: nn.Module, x: Tensor, kept: Tensor) -> Tensor:
    """``T5LayerNorm`` of ``x`` over the ``kept`` channels only (others 0), computed as T5 computes it: the mean
    square in float32, no mean subtracted, cast to the weight's dtype when that is half precision."""
    h = x[..., kept]
    variance = h.to(torch.float32).pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + norm.variance_epsilon)
    if norm.weight.dtype in (torch.float16, torch.bfloat16):
        h = h.to(norm.weight.dtype)
    h = norm.weight[kept] * h
    y = h.new_zeros((*x.shape[:-1], x.shape[-1]))
    y[..., kept] = h
    return y


# -- the spec ------------------------------------------------------------------------------------------------


def _attention_of(block: nn.Module) -> nn.Module:
    """The ``T5Attention`` inside a ``T5LayerSelfAttention`` or ``T5LayerCrossAttention``."""
    att = getattr(block, "SelfAttention", None)
    return att if att is not None else block.EncDecAttention


def _stacks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, ``T5Stack``) of the encoder and, if the model has one, the decoder."""
    stacks = [("encoder", model.encoder)]
    if getattr(model, "decoder", None) is not None:
        stacks.append(("decoder", model.decoder))
    return stacks


def _is_gated(model: nn.Module) -> bool:
    return bool(getattr(model.config, "is_gated_act", False))


class T5Spec(ArchSpec):
    family = "t5"
    model_types = ("t5",)
    model_classes = tuple(_CLASSES)
    unsupported = {
        "mt5": "mT5 is not supported yet (T5 v1.0, v1.1 and LM-adapted T5, model type t5, are)",
        "umt5": "UMT5 is not supported (each of its layers has its own position bias); T5 (model type t5) is",
        "longt5": "LongT5 is not supported (local/transient-global attention); T5 (model type t5) is",
    }

    def describe(self, model: nn.Module) -> ModelStructure:
        config = model.config
        attention: list[AttentionSite] = []
        ffn: list[FFNSite] = []
        readers: list[nn.Linear] = []
        producers: list[nn.Linear] = []
        norms: list[nn.Module] = []
        embeddings: list[nn.Embedding] = [model.shared]
        mask_outputs: list[nn.Module] = []
        extra: dict[str, nn.Module] = {"shared": model.shared}
        first = 0  # the model-wide index of the stack's first layer
        for stack_name, stack in _stacks(model):
            if stack.embed_tokens is not model.shared:
                embeddings.append(stack.embed_tokens)
            mask_outputs.append(stack.embed_tokens)
            for j, block in enumerate(stack.block):
                layer = first + j
                prefix = f"{stack_name}.layer.{j}"
                kinds = [("self_attention", block.layer[0])]
                if len(block.layer) == 3:
                    kinds.append(("cross_attention", block.layer[1]))
                for kind, sub in kinds:
                    if isinstance(sub, (SkippedSelfAttention, SkippedCrossAttention)):
                        attention.append(AttentionSite.dead(f"{prefix}.{kind}", layer, config.d_kv))
                        continue
                    site = self.attention_site(f"{prefix}.{kind}", layer, sub)
                    attention.append(site)
                    readers += site.inputs
                    producers.append(site.o)
                    norms += site.norms
                sub = block.layer[-1]
                if isinstance(sub, SkippedFF):
                    ffn.append(FFNSite(f"{prefix}.ffn", layer, None, None, 0, None, None))
                else:
                    site = self.ffn_site(f"{prefix}.ffn", layer, sub)
                    ffn.append(site)
                    readers += site.inputs
                    producers.append(site.down)
                    norms += site.norms
            norms.append(stack.final_layer_norm)
            extra[f"{stack_name}.final_layer_norm"] = stack.final_layer_norm
            table = self._bias_table(stack)
            if table is not None:
                extra[f"{stack_name}.relative_attention_bias"] = table
            first += len(stack.block)

        head_modules: dict[str, nn.Module] = {}
        tied: list[tuple[nn.Linear, nn.Embedding]] = []
        if _CLASSES[class_name(model)][1]:
            head = model.lm_head
            readers.append(head)
            head_modules["lm_head"] = head
            if head.weight is model.shared.weight:
                tied.append((head, model.shared))
        hidden = HiddenSpec(
            size=model.shared.embedding_dim,
            embeddings=embeddings,
            readers=readers,
            producers=producers,
            norms=norms,
            mask_outputs=mask_outputs,
            tied=tied,
            norm_over_kept=t5_norm_over_kept,
        )
        return ModelStructure(
            family=self.family,
            attention=attention,
            ffn=ffn,
            hidden=hidden,
            num_layers=first,
            # the shared embedding, the final norms and the position bias tables are outside the budget
            embedding_modules=extra,
            head_modules=head_modules,
        )

    @staticmethod
    def attention_site(name: str, layer: int, sub: nn.Module) -> AttentionSite:
        """The site of a live ``T5LayerSelfAttention`` or ``T5LayerCrossAttention``."""
        att = _attention_of(sub)
        d = att.key_value_proj_dim
        heads = att.q.out_features // d
        return AttentionSite(
            name=name,
            layer=layer,
            q=att.q,
            k=att.k,
            v=att.v,
            o=att.o,
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=d,
            block=sub,
            skip=_skip_attention,
            norms=[sub.layer_norm],
            on_resize=resize_attention,
            on_prune=keep_heads,
        )

    @staticmethod
    def ffn_site(name: str, layer: int, sub: nn.Module) -> FFNSite:
        """The site of a live ``T5LayerFF`` (``T5DenseActDense`` or ``T5DenseGatedActDense``)."""
        dense = sub.DenseReluDense
        gated = hasattr(dense, "wi_0")
        up = dense.wi_1 if gated else dense.wi
        return FFNSite(
            name=name,
            layer=layer,
            up=up,
            down=dense.wo,
            num_neurons=up.out_features,
            block=sub,
            skip=_skip_ffn,
            gate=dense.wi_0 if gated else None,
            norms=[sub.layer_norm],
        )

    @staticmethod
    def _bias_table(stack: nn.Module) -> nn.Embedding | None:
        """The stack's relative position bias table (in layer 0's self-attention, or its stand-in)."""
        sub = stack.block[0].layer[0]
        if isinstance(sub, SkippedSelfAttention):
            return sub.position_bias.relative_attention_bias if sub.position_bias is not None else None
        return getattr(sub.SelfAttention, "relative_attention_bias", None)

    def _replace(self, model: nn.Module, old: nn.Module, new: nn.Module) -> None:
        for _, stack in _stacks(model):
            for block in stack.block:
                for k, sub in enumerate(block.layer):
                    if sub is old:
                        block.layer[k] = new
                        return
        raise ValueError(f"{type(old).__name__} is not a sublayer of this model")

    def drop_attention(self, model: nn.Module, site: AttentionSite) -> None:
        att = _attention_of(site.block)
        if getattr(site.block, "SelfAttention", None) is not None:
            bias = PositionBias(att) if att.has_relative_attention_bias else None
            new: nn.Module = SkippedSelfAttention(att.layer_idx, bias)
        else:
            new = SkippedCrossAttention()
        self._replace(model, site.block, new)

    def drop_ffn(self, model: nn.Module, site: FFNSite) -> None:
        self._replace(model, site.block, SkippedFF())

    def default_adapter_targets(self, model: nn.Module) -> tuple[str, ...]:
        # the paper's T5 adapters (spec §2.4): q and v of every attention, and the FFN's first input projection
        return ("q", "v", "gate") if _is_gated(model) else ("q", "v", "up")

    def facts(self, model: nn.Module) -> dict[str, str]:
        config = model.config
        facts = {
            "feed-forward": "gated: wo(act(wi_0) * wi_1), gate = wi_0, up = wi_1"
            if _is_gated(model)
            else "wo(act(wi)), up = wi",
            "position bias": (
                f"relative, {config.relative_attention_num_buckets} buckets, computed in layer 0 of each stack "
                "and shared; a compacted attention reads the columns of the original heads it keeps"
            ),
        }
        if hasattr(model, "lm_head") and getattr(config, "scale_decoder_outputs", False):
            dim = getattr(model, "model_dim", config.d_model)
            facts["decoder output scale"] = (
                f"d_model ** -0.5 = {dim**-0.5:.4g} (the original d_model {dim}, kept after hidden pruning)"
            )
        head = getattr(model, "lm_head", None)
        if head is not None and head.weight is model.shared.weight:
            facts["tied embeddings"] = "lm_head shares the token embedding"
        return facts

    def update_config(self, config: Any, plan: dict) -> bool:
        heads, neurons, hidden = plan["heads"], plan["neurons"], plan["hidden"]
        # layers that keep other head sets read other columns of the shared position bias: only aptune's hooks
        # (set up again by aptune.load_pruned) do that, so a stock model fits only when no head was removed
        all_heads = all(h == config.num_heads for h in heads)
        uniform_ffn = len(set(neurons)) == 1 and neurons[0] > 0
        # v1.0 scales the decoder output by the d_model it was built with: that must stay the original one
        scale_kept = hidden == config.d_model or not getattr(config, "scale_decoder_outputs", False)
        if not (all_heads and uniform_ffn and scale_kept):
            return False
        config.d_model = hidden
        config.d_ff = neurons[0]
        return True
