"""BERT-family spec: BERT, RoBERTa (and MiniLM checkpoints, which are BERTs).

Post-norm layers: ``h = LN(h + o(attn(h)))`` then ``h = LN(h + down(act(up(h))))``. A sublayer whose heads
(or neurons) are all pruned is skipped as a whole: its output is its input, norm included.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import ArchSpec, AttentionSite, FFNSite, HiddenSpec, ModelStructure, class_name


class SkippedAttention(nn.Module):
    """Stands in for a ``BertAttention`` whose heads were all removed: returns its input unchanged."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states, None


class SkippedFFNOutput(nn.Module):
    """Stands in for a ``BertOutput`` whose FFN neurons were all removed: returns the residual input."""

    def forward(self, hidden_states, input_tensor):
        return input_tensor


def _skip_attention(module, args, kwargs, output):
    hidden = args[0] if args else kwargs["hidden_states"]
    return (hidden, *output[1:])


def _skip_ffn(module, args, kwargs, output):
    return args[1] if len(args) > 1 else kwargs["input_tensor"]


def _resize_self_attention(site: AttentionSite, num_heads: int, num_kv_heads: int) -> None:
    self_attn = site.block.self
    self_attn.num_attention_heads = num_heads
    self_attn.all_head_size = num_heads * site.head_dim


# Task heads this spec knows, as (attribute path from the model, role). Roles: "reader" reads the hidden
# stream; "reader+producer" reads it and writes a hidden-sized output (pooler, RoBERTa head dense).
_HEADS: dict[str, list[tuple[str, str]]] = {
    "BertModel": [],
    "RobertaModel": [],
    "BertForSequenceClassification": [("classifier", "reader")],
    "BertForTokenClassification": [("classifier", "reader")],
    "BertForQuestionAnswering": [("qa_outputs", "reader")],
    "BertForMultipleChoice": [("classifier", "reader")],
    "RobertaForSequenceClassification": [
        ("classifier.dense", "reader+producer"),
        ("classifier.out_proj", "reader"),
    ],
    "RobertaForTokenClassification": [("classifier", "reader")],
    "RobertaForQuestionAnswering": [("qa_outputs", "reader")],
    "RobertaForMultipleChoice": [("classifier", "reader")],
}


class BertSpec(ArchSpec):
    family = "bert"
    model_types = ("bert", "roberta")
    model_classes = tuple(_HEADS)

    def describe(self, model: nn.Module) -> ModelStructure:
        base = model.base_model
        config = model.config
        # The config keeps the original sizes unless a compacted structure is expressible in it
        # (see update_config), and in both cases this is the true head size.
        head_dim = config.hidden_size // config.num_attention_heads
        layers = base.encoder.layer

        attention: list[AttentionSite] = []
        ffn: list[FFNSite] = []
        readers: list[nn.Linear] = []
        producers: list[nn.Linear] = []
        norms: list[nn.Module] = [base.embeddings.LayerNorm]
        for i, layer in enumerate(layers):
            att = layer.attention
            if isinstance(att, SkippedAttention):
                attention.append(AttentionSite.dead(f"layer.{i}.attention", i, head_dim))
            else:
                q, k, v, o = att.self.query, att.self.key, att.self.value, att.output.dense
                n = q.out_features // head_dim
                attention.append(
                    AttentionSite(
                        name=f"layer.{i}.attention",
                        layer=i,
                        q=q,
                        k=k,
                        v=v,
                        o=o,
                        num_heads=n,
                        num_kv_heads=n,
                        head_dim=head_dim,
                        block=att,
                        skip=_skip_attention,
                        norms=[att.output.LayerNorm],
                        on_resize=_resize_self_attention,
                    )
                )
                readers += [q, k, v]
                producers.append(o)
                norms.append(att.output.LayerNorm)
            if isinstance(layer.output, SkippedFFNOutput):
                ffn.append(FFNSite(f"layer.{i}.ffn", i, None, None, 0, None, None))
            else:
                up, down = layer.intermediate.dense, layer.output.dense
                ffn.append(
                    FFNSite(
                        name=f"layer.{i}.ffn",
                        layer=i,
                        up=up,
                        down=down,
                        num_neurons=up.out_features,
                        block=layer.output,
                        skip=_skip_ffn,
                        norms=[layer.output.LayerNorm],
                    )
                )
                readers.append(up)
                producers.append(down)
                norms.append(layer.output.LayerNorm)

        head_modules: dict[str, nn.Module] = {}
        new_heads: dict[str, nn.Module] = {}
        pooler = getattr(base, "pooler", None)
        if pooler is not None:
            readers.append(pooler.dense)
            producers.append(pooler.dense)
            head_modules["pooler"] = pooler
        for path, role in _HEADS[class_name(model)]:
            module = model.get_submodule(path)
            readers.append(module)
            if role == "reader+producer":
                producers.append(module)
            head_modules[path] = module
            new_heads[path] = module  # every layer listed in _HEADS is new in its task class

        emb = base.embeddings
        embeddings = [emb.word_embeddings, emb.position_embeddings]
        if getattr(emb, "token_type_embeddings", None) is not None:
            embeddings.append(emb.token_type_embeddings)
        hidden = HiddenSpec(
            size=emb.word_embeddings.embedding_dim,
            embeddings=embeddings,
            readers=readers,
            producers=producers,
            norms=norms,
            mask_inputs=[emb.LayerNorm],
        )
        return ModelStructure(
            family=self.family,
            attention=attention,
            ffn=ffn,
            hidden=hidden,
            num_layers=len(layers),
            embedding_modules={"embeddings": emb},
            head_modules=head_modules,
            new_heads=new_heads,
        )

    def drop_attention(self, model: nn.Module, site: AttentionSite) -> None:
        model.base_model.encoder.layer[site.layer].attention = SkippedAttention()

    def drop_ffn(self, model: nn.Module, site: FFNSite) -> None:
        layer = model.base_model.encoder.layer[site.layer]
        layer.intermediate = nn.Identity()
        layer.output = SkippedFFNOutput()

    def update_config(self, config: Any, plan: dict) -> bool:
        heads, neurons, hidden = plan["heads"], plan["neurons"], plan["hidden"]
        head_dim = plan["head_dim"]
        uniform = len(set(heads)) == 1 and len(set(neurons)) == 1 and heads[0] > 0 and neurons[0] > 0
        # A stock BERT config derives the head size as hidden_size / num_attention_heads, so it can only
        # express a structure whose hidden size equals heads x head size.
        expressible = uniform and hidden == heads[0] * head_dim
        if expressible:
            config.hidden_size = hidden
            config.num_attention_heads = heads[0]
            config.intermediate_size = neurons[0]
        return expressible
