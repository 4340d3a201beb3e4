"""What an architecture spec tells the rest of aptune.

A spec looks at a loaded Hugging Face model and describes, with references to its live modules, where the
prunable structures are:

* attention *sites* (one per attention sublayer: an encoder layer has one; a T5 decoder layer has a
  self-attention and a cross-attention site), each with its q/k/v/o projections, head size and head counts.
  The pruning unit of a site is one key/value head with the query heads that share it (one head without
  grouped-query attention);
* FFN sites, each with its up (and gate) and down projections;
* where a projection is fused (Phi-3's ``qkv_proj`` and ``gate_up_proj``), the row range of each role in it
  (:class:`Part`): compaction, group scores and adapters work on parts, never on a fused module as a whole;
* the hidden (model) channels shared by every layer: which embeddings, projections and norms read or write
  the residual stream, and which heads read it.

Masks, the parameter budget and compaction only ask these objects; they never pattern-match module names.
A new family adds a file next to ``bert.py`` and ``llama.py`` and fills the same dataclasses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

from torch import nn


def class_name(model: nn.Module) -> str:
    """The model's transformers class name, also under FSDP2, which swaps a sharded module's class for a
    subclass named ``FSDP<Class>`` (:mod:`aptune.sharding`)."""
    cls = type(model)
    if cls.__name__.startswith("FSDP") and any(b.__name__ == "FSDPModule" for b in cls.__mro__):
        cls = next(
            b for b in cls.__mro__[1:] if b.__name__ != "FSDPModule" and not b.__name__.startswith("FSDP")
        )
    return cls.__name__


# A function that replaces the output of a skipped sublayer: (module, args, kwargs, output) -> new output.
SkipFn = Callable[[nn.Module, tuple, dict, Any], Any]


class Part(NamedTuple):
    """The output rows ``start:start + size`` of ``module`` that hold one role's channels (``q``, ``k``, ``v``,
    ``gate`` or ``up``): all of them for a projection of its own, a row range for a fused one."""

    role: str
    module: nn.Module
    start: int
    size: int


def _parts(roles: list[tuple[str, nn.Module | None, int]], fused: bool) -> list[Part]:
    """Parts for (role, module, rows) in row order: consecutive row ranges of one module when ``fused``."""
    parts, start = [], 0
    for role, module, size in roles:
        if module is not None:
            parts.append(Part(role, module, start if fused else 0, size))
            start += size
    return parts


def _unique(parts: list[Part]) -> list[nn.Module]:
    return list({id(p.module): p.module for p in parts}.values())


@dataclass
class AttentionSite:
    """One attention sublayer.

    ``block`` is the module whose output stands for the whole sublayer: when every head is pruned, aptune
    replaces that output with ``skip(...)`` (for a post-norm BERT layer: the sublayer's input, i.e. the
    residual passes through untouched). ``norms`` are the norms that belong to this sublayer and disappear
    with it.

    ``fused``: q, k and v are one projection (Phi-3's ``qkv_proj``: the rows of every query head, then of every
    key head, then of every value head), and ``q``, ``k`` and ``v`` all name it; :attr:`parts` gives each role's
    rows. ``on_resize`` updates the attention module's bookkeeping (a head count its forward reads) after
    compaction. ``on_prune`` is for per-head state outside the projections, which needs to know *which* units
    survived, not only how many: compaction calls it with the indices of the kept units (among the site's
    units before this compaction). T5 uses it to remember which original heads an attention keeps, so that it
    reads their columns of the relative position bias that all layers of a stack share (``arch/t5.py``).
    """

    name: str
    layer: int
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block: nn.Module
    skip: SkipFn
    norms: list[nn.Module] = field(default_factory=list)
    # set to a callable(site, num_heads, num_kv_heads) that updates bookkeeping attributes after slicing
    on_resize: Callable[[AttentionSite, int, int], None] | None = None
    fused: bool = False
    # set to a callable(site, kept_units) that compaction calls after slicing (kept_units: a LongTensor)
    on_prune: Callable[[AttentionSite, Any], None] | None = None

    @classmethod
    def dead(cls, name: str, layer: int, head_dim: int) -> AttentionSite:
        """The site of a sublayer whose heads were all removed (it has no projections left)."""
        return cls(name, layer, None, None, None, None, 0, 0, head_dim, None, None)

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.num_heads // self.num_kv_heads if self.num_kv_heads else 1

    @property
    def num_units(self) -> int:
        """Prunable head units: one per key/value head, with its ``group_size`` query heads.

        Without grouped-query attention a unit is one head. Head masks, head scores and the selection all
        count units, so a pruned site always keeps whole groups and its group size never changes.
        """
        return self.num_kv_heads if self.num_heads else 0

    @property
    def unit_width(self) -> int:
        """Channels of one unit in q and in the input of o (those of k and v are ``head_dim``)."""
        return self.group_size * self.head_dim

    @property
    def parts(self) -> list[Part]:
        """The rows of q, k and v: whole projections, or consecutive row ranges of the fused one."""
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return _parts([("q", self.q, q), ("k", self.k, kv), ("v", self.v, kv)], self.fused)

    @property
    def inputs(self) -> list[nn.Module]:
        """The projections that read the sublayer's input (q, k and v; one module when fused)."""
        return _unique(self.parts)


@dataclass
class FFNSite:
    """One feed-forward sublayer: ``down(act(up(x)) [* gate(x)])``. ``block`` and ``skip`` as for attention.

    ``fused``: gate and up are one projection (Phi-3's ``gate_up_proj``: every neuron's gate row, then every
    neuron's up row), and ``gate`` and ``up`` both name it.
    """

    name: str
    layer: int
    up: nn.Linear
    down: nn.Linear
    num_neurons: int
    block: nn.Module
    skip: SkipFn
    gate: nn.Linear | None = None
    norms: list[nn.Module] = field(default_factory=list)
    fused: bool = False

    @property
    def parts(self) -> list[Part]:
        """The rows of up and gate: whole projections, or the gate then the up rows of the fused one."""
        n = self.num_neurons
        roles = (
            [("gate", self.gate, n), ("up", self.up, n)]
            if self.fused
            else [("up", self.up, n), ("gate", self.gate, n)]
        )
        return _parts(roles, self.fused)

    @property
    def inputs(self) -> list[nn.Linear]:
        """The projections that read the sublayer's input (up, and gate if any; one module when fused)."""
        return _unique(self.parts)


@dataclass
class HiddenSpec:
    """Everything that touches the hidden (residual-stream) channels.

    * ``embeddings``: nn.Embedding modules whose weight columns are hidden channels.
    * ``readers``: linear layers whose *input* is the hidden stream (q, k, v, FFN up/gate, task heads).
    * ``producers``: linear layers whose *output* is (added to) the hidden stream (o, FFN down, the pooler).
    * ``norms``: norms over the hidden channels; with a partial hidden mask their statistics use kept channels.
    * ``mask_inputs``: modules whose *input* is multiplied by the hidden mask (the sum of embeddings before
      the embedding norm, §3.2 of the method spec).
    * ``mask_outputs``: modules whose *output* is multiplied by the hidden mask but which compaction does not
      slice as producers (LLaMA's token embedding, which feeds the residual stream directly).
    * ``tied``: (reader, embedding) pairs that share one weight (a language-model head tied to the token
      embedding): compaction slices the embedding and ties the reader to it again.
    * ``norm_over_kept``: ``(norm, x, kept) -> y``, the family's norm of ``x`` computed over the channel indices
      ``kept`` only (other channels 0), for norms whose formula aptune's default (``LayerNorm`` and
      ``y = weight * rms_normalise(x)``) does not match, such as Gemma's ``(1 + weight)`` RMSNorm. None: the default.
    """

    size: int
    embeddings: list[nn.Embedding]
    readers: list[nn.Linear]
    producers: list[nn.Linear]
    norms: list[nn.Module]
    mask_inputs: list[nn.Module] = field(default_factory=list)
    mask_outputs: list[nn.Module] = field(default_factory=list)
    tied: list[tuple[nn.Linear, nn.Embedding]] = field(default_factory=list)
    norm_over_kept: Callable[[nn.Module, Any, Any], Any] | None = None


@dataclass
class ModelStructure:
    """The spec's answer for one model: sites, hidden channels, and what is counted in the budget."""

    family: str
    attention: list[AttentionSite]
    ffn: list[FFNSite]
    hidden: HiddenSpec
    num_layers: int
    # Parameters outside the prunable core, reported separately by the budget (name -> module).
    embedding_modules: dict[str, nn.Module]
    head_modules: dict[str, nn.Module]
    # The task head layers the task class initialises anew (a classifier, a QA output layer): the only
    # non-adapter parameters that APT and the adapter baselines train. Pretrained parts of the head (BERT's
    # pooler, a language-model head, tied embeddings) stay frozen.
    new_heads: dict[str, nn.Module] = field(default_factory=dict)

    def parts(self, roles: Sequence[str]) -> list[Part]:
        """The parts with the given roles (``q``, ``k``, ``v``, ``o``, ``gate``, ``up``, ``down``) of every live site,
        in site order and, within a site, in the order of ``roles``; roles a site lacks are skipped. A part of a
        fused projection (Phi-3's ``q``) is a row range of it; any other part is a whole projection."""
        sites = [*(s for s in self.attention if s.num_heads), *(s for s in self.ffn if s.num_neurons)]
        out = []
        for site in sites:
            parts = {p.role: p for p in site.parts}
            for role in roles:
                whole = getattr(site, role, None) if role in ("o", "down") else None
                if role in parts:
                    out.append(parts[role])
                elif whole is not None:
                    out.append(Part(role, whole, 0, whole.out_features))
        return out


class ArchSpec:
    """Base class of a model-family spec. Subclasses fill :meth:`describe` and the config helpers."""

    family: str = ""
    #: ``config.model_type`` values handled by this spec
    model_types: tuple[str, ...] = ()
    #: model classes (by name) whose task heads the spec knows
    model_classes: tuple[str, ...] = ()
    #: ``config.model_type`` values of related models the spec does *not* handle, with the one-line reason
    #: (and what to use instead) that :func:`aptune.arch.get_spec` gives
    unsupported: ClassVar[dict[str, str]] = {}

    def describe(self, model: nn.Module) -> ModelStructure:
        raise NotImplementedError

    def drop_attention(self, model: nn.Module, site: AttentionSite) -> None:
        """Replace a sublayer whose heads are all pruned with a module that skips it."""
        raise NotImplementedError

    def drop_ffn(self, model: nn.Module, site: FFNSite) -> None:
        """Replace a sublayer whose neurons are all pruned with a module that skips it."""
        raise NotImplementedError

    def default_adapter_targets(self, model: nn.Module) -> tuple[str, ...] | None:
        """The adapter roles APT uses for this model when the config names none, or None for the general default
        (``q, v, up`` for encoders, ``q, v`` for decoders; :meth:`aptune.config.APTConfig.resolve`)."""
        return None

    def facts(self, model: nn.Module) -> dict[str, str]:
        """Family-specific facts worth showing (``aptune info``): per-head norms, sliding windows, soft-capping."""
        return {}

    def update_config(self, config: Any, plan: dict) -> bool:
        """Write the compacted sizes into ``config`` when the family's config can express them.

        Returns True when a plain ``AutoModel*.from_pretrained`` rebuilds the compacted shapes from the config.
        """
        raise NotImplementedError
