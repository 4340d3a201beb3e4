"""Parameter accounting: what the density budget counts (method spec §3.3).

Counted ("prunable") parameters: the attention projections (q, k, v, o) and FFN projections (up, gate, down),
weights and biases, and the norms inside the layers. Embeddings (with their norm) and task heads are not
counted; :func:`param_report` reports them separately. ``count_prunable`` is a pure function of a
:class:`StructureShape`, and equals the ``numel`` of the counted tensors of the compacted model exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from torch import nn

from .arch import ModelStructure, describe


@dataclass(frozen=True)
class AttentionShape:
    heads: int
    kv_heads: int
    head_dim: int
    qkv_bias: bool = True
    o_bias: bool = True
    norm_params_per_channel: int = 2  # LayerNorm weight + bias; an RMSNorm has 1

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.heads // self.kv_heads if self.kv_heads else 1

    def with_units(self, units: int) -> AttentionShape:
        """This shape with ``units`` key/value heads, each keeping its group of query heads."""
        return replace(self, heads=units * self.group_size, kv_heads=units)


@dataclass(frozen=True)
class FFNShape:
    neurons: int
    gated: bool = False
    in_bias: bool = True
    down_bias: bool = True
    norm_params_per_channel: int = 2


@dataclass(frozen=True)
class StructureShape:
    """The sizes of a model's prunable structure: enough to count its parameters and to rebuild it."""

    hidden: int
    attention: tuple[AttentionShape, ...]
    ffn: tuple[FFNShape, ...]

    @property
    def heads(self) -> tuple[int, ...]:
        return tuple(a.heads for a in self.attention)

    @property
    def units(self) -> tuple[int, ...]:
        """Prunable head units per attention site (key/value heads; heads without grouped-query attention)."""
        return tuple(a.kv_heads for a in self.attention)

    @property
    def neurons(self) -> tuple[int, ...]:
        return tuple(f.neurons for f in self.ffn)

    @classmethod
    def of(cls, structure: ModelStructure) -> StructureShape:
        def norm_count(norms: list[nn.Module]) -> int:
            return sum(
                (getattr(n, "weight", None) is not None) + (getattr(n, "bias", None) is not None)
                for n in norms
            )

        attention = tuple(
            AttentionShape(s.num_heads, s.num_kv_heads, s.head_dim)
            if s.num_heads == 0
            else AttentionShape(
                heads=s.num_heads,
                kv_heads=s.num_kv_heads,
                head_dim=s.head_dim,
                qkv_bias=s.q.bias is not None,
                o_bias=s.o.bias is not None,
                norm_params_per_channel=norm_count(s.norms),
            )
            for s in structure.attention
        )
        ffn = tuple(
            FFNShape(0)
            if s.num_neurons == 0
            else FFNShape(
                neurons=s.num_neurons,
                gated=s.gate is not None,
                in_bias=s.up.bias is not None,
                down_bias=s.down.bias is not None,
                norm_params_per_channel=norm_count(s.norms),
            )
            for s in structure.ffn
        )
        return cls(structure.hidden.size, attention, ffn)

    def plan_dict(self) -> dict[str, Any]:
        """JSON-ready form (the per-layer shape plan saved next to a pruned model)."""
        head_dims = {a.head_dim for a in self.attention}
        return {
            "hidden": self.hidden,
            "head_dim": head_dims.pop() if len(head_dims) == 1 else None,
            "heads": list(self.heads),
            "kv_heads": [a.kv_heads for a in self.attention],
            "neurons": list(self.neurons),
            "attention": [asdict(a) for a in self.attention],
            "ffn": [asdict(f) for f in self.ffn],
        }

    @classmethod
    def from_plan(cls, plan: dict[str, Any]) -> StructureShape:
        return cls(
            hidden=int(plan["hidden"]),
            attention=tuple(AttentionShape(**a) for a in plan["attention"]),
            ffn=tuple(FFNShape(**f) for f in plan["ffn"]),
        )


# -- counting (pure functions) ------------------------------------------------------------------------


def attention_params(a: AttentionShape, hidden: int) -> int:
    """Parameters of one attention sublayer (0 when it has no heads: it is skipped entirely)."""
    if a.heads == 0:
        return 0
    q = a.heads * a.head_dim
    kv = a.kv_heads * a.head_dim
    n = hidden * (q + 2 * kv) + q * hidden
    if a.qkv_bias:
        n += q + 2 * kv
    if a.o_bias:
        n += hidden
    return n + a.norm_params_per_channel * hidden


def ffn_params(f: FFNShape, hidden: int) -> int:
    """Parameters of one FFN sublayer (0 when it has no neurons)."""
    if f.neurons == 0:
        return 0
    n_in = 2 if f.gated else 1
    n = hidden * f.neurons * (n_in + 1)
    if f.in_bias:
        n += n_in * f.neurons
    if f.down_bias:
        n += hidden
    return n + f.norm_params_per_channel * hidden


def count_prunable(shape: StructureShape) -> int:
    """The number of parameters the density budget counts, for a structure of this shape."""
    return sum(attention_params(a, shape.hidden) for a in shape.attention) + sum(
        ffn_params(f, shape.hidden) for f in shape.ffn
    )


def head_cost(shape: StructureShape, site: int) -> int:
    """Parameters freed by removing one head unit of attention site ``site``: a key/value head and the query
    heads of its group (one head with its key and value, without grouped-query attention)."""
    a = shape.attention[site]
    if a.heads == 0:
        return 0
    fewer = a.with_units(a.kv_heads - 1)
    return attention_params(a, shape.hidden) - attention_params(fewer, shape.hidden)


def neuron_cost(shape: StructureShape, site: int) -> int:
    """Parameters freed by removing one neuron of FFN site ``site``."""
    f = shape.ffn[site]
    if f.neurons == 0:
        return 0
    return ffn_params(f, shape.hidden) - ffn_params(replace(f, neurons=f.neurons - 1), shape.hidden)


def hidden_cost(shape: StructureShape) -> int:
    """Parameters freed by removing one hidden channel (from every layer at once)."""
    if shape.hidden == 0:
        return 0
    return count_prunable(shape) - count_prunable(replace(shape, hidden=shape.hidden - 1))


# -- model-level report ---------------------------------------------------------------------------------


def counted_parameters(structure: ModelStructure) -> list[nn.Parameter]:
    """The tensors that :func:`count_prunable` counts, taken from the live modules."""
    modules: list[nn.Module] = []
    for s in structure.attention:
        if s.num_heads:
            modules += [s.q, s.k, s.v, s.o, *s.norms]
    for s in structure.ffn:
        if s.num_neurons:
            modules += [s.up, s.down, *s.norms] + ([s.gate] if s.gate is not None else [])
    seen: dict[int, nn.Parameter] = {}
    for m in modules:
        for p in _model_parameters(m):
            seen.setdefault(id(p), p)
    return list(seen.values())


def _model_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The module's own parameters, without adapter factors (``lora_*``), which are counted apart."""
    return [p for name, p in module.named_parameters() if "lora_" not in name]


def _numel(modules: dict[str, nn.Module]) -> int:
    seen: dict[int, int] = {}
    for m in modules.values():
        for p in _model_parameters(m):
            seen[id(p)] = p.numel()
    return sum(seen.values())


def param_report(model: nn.Module) -> dict[str, Any]:
    """Parameter counts of a model: prunable (budgeted), embeddings, task head, adapters, total, and density.

    Density is the prunable count over that of the model's original (unpruned) structure, which compaction
    records on the model and :func:`aptune.load_pruned` restores.
    """
    structure = describe(model)
    shape = StructureShape.of(structure)
    base = getattr(model, "_aptune_base_shape", shape)
    prunable = count_prunable(shape)
    base_prunable = count_prunable(base)
    return {
        "family": structure.family,
        "prunable": prunable,
        "prunable_before": base_prunable,
        "density": prunable / base_prunable if base_prunable else 1.0,
        "embeddings": _numel(structure.embedding_modules),
        "task_head": _numel(structure.head_modules),
        "adapters": sum(p.numel() for name, p in model.named_parameters() if "lora_" in name),
        "total": sum(p.numel() for p in model.parameters()),
    }
