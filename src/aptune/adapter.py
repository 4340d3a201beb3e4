"""The APT adapter: a frozen linear layer plus a LoRA branch whose rank can grow (method spec §2, §6).

``y = W0 x + b + s * B (A x)`` with ``W0``/``b`` frozen, ``A`` (r x in) and ``B`` (out x r) trainable, and the
scale ``s = 2`` kept fixed as the rank grows (alpha = 2r). Pruning masks are *not* part of the adapter: they
live at model level (:mod:`aptune.masks`) and act on the wrapper like on a plain ``nn.Linear``.

Structural changes (:meth:`APTLinear.grow`, :meth:`APTLinear.aptune_slice`, :func:`merge_adapters`) replace
parameter objects, so any optimizer holding the old ones must be rebuilt afterwards (method spec §6.5).
A model with adapters has non-standard state-dict keys (``...query.base.weight``, ``...query.lora_A``); merge the
adapters (:func:`merge_adapters`) before saving it as a plain Hugging Face model.

Fused projections (Phi-3's ``qkv_proj``, ``gate_up_proj``) get one :class:`APTLinear` per adapted part (``q``,
``v``, ``gate``, ...), each on its row range only, inside a :class:`FusedAPTLinear` that keeps the fused weight
(state keys ``...qkv_proj.base.weight``, ``...qkv_proj.adapters.q.lora_A``).

Adapter factors (``lora_A``/``lora_B``, the ranks added by growth and the teacher's copies) are float32 whatever
the base weight's dtype, as in PEFT: in a bf16 model they are fp32 master weights, so small optimizer updates are
not rounded away. The forward pass casts the input to the factors' dtype for the low-rank branch and returns the
base output's dtype; merging returns the base weight's dtype.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .compact import slice_linear

DEFAULT_SCALE = 2.0
# The dtype of every adapter factor and teacher copy, whatever the base weight's (PEFT does the same).
ADAPTER_DTYPE = torch.float32
# Forward-hook registries moved from a replaced module to its replacement, so that hooks installed on the
# linear layer (e.g. aptune's mask hooks on output projections) keep acting on the whole layer.
_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def _kaiming_rows(rows: int, cols: int, device: torch.device, generator: torch.Generator | None) -> Tensor:
    """``rows x cols`` float32 values on ``device``, drawn as ``nn.Linear`` initialises weights
    (Kaiming-uniform, a=sqrt(5))."""
    draw_on = generator.device if generator is not None else device
    t = torch.empty(rows, cols, device=draw_on, dtype=ADAPTER_DTYPE)
    nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)
    return t.to(device=device)


def _move_hooks(src: nn.Module, dst: nn.Module) -> None:
    """Move forward hooks from ``src`` to a fresh ``dst``; existing hook handles keep working."""
    for name in _HOOK_DICTS:
        if hasattr(src, name):
            setattr(dst, name, getattr(src, name))
            setattr(src, name, OrderedDict())


class _WrappedLinear(nn.Module):
    """A module around a linear layer ``base`` that looks like it: ``weight``, ``bias``, ``in_features`` and
    ``out_features`` read through to ``base``, so code written for ``nn.Linear`` (the architecture specs, the
    budget) keeps working."""

    @property
    def weight(self) -> nn.Parameter:
        return self.base.weight

    @property
    def bias(self) -> nn.Parameter | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features


class APTLinear(_WrappedLinear):
    """A frozen ``nn.Linear`` (kept as ``base``, same Parameter objects) plus a growable LoRA branch.

    ``weight``, ``bias``, ``in_features`` and ``out_features`` read through to ``base``, so code written for
    ``nn.Linear`` (the architecture specs, the budget) keeps working.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int = 8,
        scale: float = DEFAULT_SCALE,
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if rank < 1:
            raise ValueError(f"adapter rank must be at least 1, got {rank}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.scale = float(scale)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        w = base.weight
        self.lora_A = nn.Parameter(_kaiming_rows(rank, w.shape[1], w.device, generator))
        self.lora_B = nn.Parameter(torch.zeros(w.shape[0], rank, device=w.device, dtype=ADAPTER_DTYPE))
        # Self-distillation: a frozen copy of the factors (method spec §7.2). The backbone is shared.
        self.register_buffer("teacher_A", None, persistent=False)
        self.register_buffer("teacher_B", None, persistent=False)
        self.use_teacher = False

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    @property
    def alpha(self) -> float:
        """The LoRA alpha, ``scale * rank`` (16 at rank 8)."""
        return self.scale * self.rank

    def forward(self, x: Tensor) -> Tensor:
        """``W0 x + b + s B A x`` in the base output's dtype.

        The low-rank branch runs in the factors' dtype (float32): the input is cast to it, and the sum is cast
        back to the base output's dtype. Under ``torch.autocast`` the matmuls run in the autocast dtype.
        """
        out = self.base(x)
        return (out + self.low_rank(x)).to(out.dtype)

    def low_rank(self, x: Tensor) -> Tensor:
        """``s B A x`` in the factors' dtype (the teacher's factors in teacher mode): what the adapter adds."""
        if self.use_teacher and self.teacher_A is not None:
            A, B = self.teacher_A, self.teacher_B
        else:
            A, B = self.lora_A, self.lora_B
            x = self.dropout(x)
        return self.scale * ((x.to(A.dtype) @ A.T) @ B.T)

    @torch.no_grad()
    def snapshot_teacher(self) -> None:
        """Freeze a float32 copy of the current factors as the teacher's (used while ``use_teacher`` is set)."""
        self.teacher_A = self.lora_A.detach().to(ADAPTER_DTYPE, copy=True)
        self.teacher_B = self.lora_B.detach().to(ADAPTER_DTYPE, copy=True)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, scale={self.scale:g}"

    # -- structural changes ------------------------------------------------------------------------------
    def grow(
        self, new_rank: int, generator: torch.Generator | None = None
    ) -> tuple[nn.Parameter, nn.Parameter]:
        """Raise the rank to ``new_rank`` without changing the layer's function (method spec §2.3).

        New rows of ``A`` are Kaiming-uniform, new columns of ``B`` are zero, old values are copied exactly and
        the scale stays the same. The grown factors are float32 (factors cast to a lower precision are upcast,
        which is exact). Returns the new ``(lora_A, lora_B)``; they replace the old Parameter objects, so the
        optimizer must be rebuilt. ``new_rank == rank`` changes nothing.
        """
        if new_rank < self.rank:
            raise ValueError(f"cannot grow an adapter from rank {self.rank} down to {new_rank}")
        if new_rank > self.rank:
            A, B = self.lora_A, self.lora_B
            extra = new_rank - self.rank
            new_rows = _kaiming_rows(extra, A.shape[1], A.device, generator)
            zeros = torch.zeros(B.shape[0], extra, device=B.device, dtype=ADAPTER_DTYPE)
            grown_A = torch.cat([A.detach().to(ADAPTER_DTYPE), new_rows], 0)
            grown_B = torch.cat([B.detach().to(ADAPTER_DTYPE), zeros], 1)
            self.lora_A = nn.Parameter(grown_A, requires_grad=A.requires_grad)
            self.lora_B = nn.Parameter(grown_B, requires_grad=B.requires_grad)
        return self.lora_A, self.lora_B

    def aptune_slice(self, out_idx: Tensor | None = None, in_idx: Tensor | None = None) -> None:
        """Keep output channels ``out_idx`` and input channels ``in_idx`` (called by :func:`aptune.compact`).

        Slices the base weight and bias, the rows of ``B`` and the columns of ``A``; ``requires_grad`` flags and
        dtypes (float32 factors) are kept. Parameters are replaced, so the optimizer must be rebuilt.
        """
        slice_linear(self.base, out_idx, in_idx)
        if self.teacher_A is not None:
            if out_idx is not None:
                self.teacher_B = self.teacher_B.index_select(0, out_idx.to(self.teacher_B.device))
            if in_idx is not None:
                self.teacher_A = self.teacher_A.index_select(1, in_idx.to(self.teacher_A.device))
        if out_idx is not None:
            B = self.lora_B
            rows = B.detach().index_select(0, out_idx.to(B.device)).clone()
            self.lora_B = nn.Parameter(rows, requires_grad=B.requires_grad)
        if in_idx is not None:
            A = self.lora_A
            cols = A.detach().index_select(1, in_idx.to(A.device)).contiguous()
            self.lora_A = nn.Parameter(cols, requires_grad=A.requires_grad)

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        """``W0 + s B A`` in the base weight's dtype (the weight the layer effectively applies)."""
        w = self.base.weight
        return (w.float() + (self.lora_B.float() @ self.lora_A.float()) * self.scale).to(w.dtype)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing ``(W0 + s B A) x + b`` (the export path).

        Its parameters are new tensors with the ``requires_grad`` flags of ``base``.
        """
        return _linear_like(self.base, self.merged_weight())

    # -- adaptive tuning (method spec §6.1) --------------------------------------------------------------
    @torch.no_grad()
    def rank_salience(self) -> Tensor:
        """Per-rank salience ``sigma_k = |sum_j A_kj dL/dA_kj|`` from ``lora_A.grad`` (zeros without a grad)."""
        A = self.lora_A
        if A.grad is None:
            return torch.zeros(self.rank, device=A.device, dtype=torch.float32)
        return (A.float() * A.grad.float()).sum(dim=1).abs()


@torch.no_grad()
def _linear_like(base: nn.Module, weight: Tensor) -> nn.Linear:
    """A plain ``nn.Linear`` with ``weight``, a copy of ``base``'s bias and ``base``'s ``requires_grad`` flags."""
    w = base.weight
    linear = nn.Linear(
        base.in_features, base.out_features, bias=base.bias is not None, device=w.device, dtype=w.dtype
    )
    linear.weight = nn.Parameter(weight, requires_grad=w.requires_grad)
    if base.bias is not None:
        linear.bias = nn.Parameter(base.bias.detach().clone(), requires_grad=base.bias.requires_grad)
    return linear


class RowRange(nn.Module):
    """Rows ``start:stop`` of a fused linear layer, seen as a linear layer of their own: the ``base`` of an adapter
    on one part of a fused projection (:class:`FusedAPTLinear`).

    It owns no parameters (the fused layer, registered in the :class:`FusedAPTLinear`, does), so the model's state
    keeps one copy of the fused weight. ``start``/``stop`` are kept up to date by the :class:`FusedAPTLinear`.
    """

    def __init__(self, fused: nn.Linear, start: int, stop: int):
        super().__init__()
        self._fused = (fused,)  # in a tuple: a plain attribute, not a submodule
        self.start, self.stop = start, stop

    @property
    def weight(self) -> Tensor:
        return self._fused[0].weight[self.start : self.stop]

    @property
    def bias(self) -> Tensor | None:
        b = self._fused[0].bias
        return None if b is None else b[self.start : self.stop]

    @property
    def in_features(self) -> int:
        return self._fused[0].in_features

    @property
    def out_features(self) -> int:
        return self.stop - self.start

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.weight, self.bias)

    def aptune_slice(self, out_idx: Tensor | None = None, in_idx: Tensor | None = None) -> None:
        """Nothing to slice: the :class:`FusedAPTLinear` slices the fused weight and moves the range."""


class FusedAPTLinear(_WrappedLinear):
    """A fused projection (Phi-3's ``qkv_proj`` or ``gate_up_proj``) with adapters on parts of its output.

    ``base`` is the frozen fused ``nn.Linear``; ``adapters[role]`` is an :class:`APTLinear` over the rows of that
    role (:class:`RowRange`), whose low-rank output is added to those rows only: an adapter with the role ``q``
    leaves the key and value rows of ``qkv_proj`` exactly as they were. Each part adapter is a full
    :class:`APTLinear` (own rank, growth, rank salience, teacher factors). Like :class:`APTLinear`, the module
    reads ``weight``/``bias``/``in_features``/``out_features`` through to ``base``, slices consistently
    (:meth:`aptune_slice`) and merges into one plain ``nn.Linear`` (:meth:`merge`).
    """

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.adapters = nn.ModuleDict()

    def add(self, role: str, start: int, stop: int, rank: int = 8, **kwargs) -> APTLinear:
        """An adapter on output rows ``start:stop``, under ``role``."""
        if role in self.adapters:
            raise ValueError(f"the {role} rows of this fused projection already have an adapter")
        adapter = APTLinear(RowRange(self.base, start, stop), rank=rank, **kwargs)
        self.adapters[role] = adapter
        return adapter

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        for adapter in self.adapters.values():
            rows = slice(adapter.base.start, adapter.base.stop)
            out[..., rows] = (out[..., rows] + adapter.low_rank(x)).to(out.dtype)
        return out

    def aptune_slice(self, out_idx: Tensor | None = None, in_idx: Tensor | None = None) -> None:
        """Keep output rows ``out_idx`` and input channels ``in_idx`` of the fused layer, and the same rows and
        columns of every part adapter, whose row range moves with them (``out_idx`` keeps each part's rows
        together, as :func:`aptune.compact` does)."""
        for adapter in self.adapters.values():
            part = adapter.base
            local = None
            if out_idx is not None:
                inside = (out_idx >= part.start) & (out_idx < part.stop)
                where = torch.nonzero(inside).flatten()
                start = int(where[0]) if len(where) else 0
                if len(where) and int(where[-1]) - start + 1 != len(where):
                    raise ValueError("slicing a fused projection must keep each part's rows together")
                local = out_idx[inside] - part.start
                part.start, part.stop = start, start + len(where)
            adapter.aptune_slice(local, in_idx)
        slice_linear(self.base, out_idx, in_idx)

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        """The fused weight with each part's rows replaced by its adapter's merged rows."""
        w = self.base.weight.detach().clone()
        for adapter in self.adapters.values():
            w[adapter.base.start : adapter.base.stop] = adapter.merged_weight()
        return w

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the fused projection with every part's adapter merged."""
        return _linear_like(self.base, self.merged_weight())


def applied_weight(linear: nn.Module) -> Tensor:
    """The weight a (possibly adapted, possibly fused) linear layer effectively applies."""
    merged = getattr(linear, "merged_weight", None)
    return merged() if callable(merged) else linear.weight.detach()


@torch.no_grad()
def rank_saliences(adapters: Sequence[APTLinear]) -> list[Tensor]:
    """:meth:`APTLinear.rank_salience` of every adapter, with batched kernels: one multi-tensor product for all
    adapters, then one row reduction per input width (a handful of launches per step, not a few per adapter)."""
    with_grad = [a for a in adapters if a.lora_A.grad is not None]
    out: dict[int, Tensor] = {}
    if with_grad:
        factors = [a.lora_A.float() for a in with_grad]
        grads = [a.lora_A.grad.float() for a in with_grad]
        products = (
            torch._foreach_mul(factors, grads)
            if hasattr(torch, "_foreach_mul")
            else [f * g for f, g in zip(factors, grads, strict=True)]
        )
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(products):
            groups.setdefault((p.shape[1], p.device), []).append(i)
        for members in groups.values():
            rows = torch.cat([products[i] for i in members]) if len(members) > 1 else products[members[0]]
            sums = rows.sum(dim=1).abs_().split([products[i].shape[0] for i in members])
            out.update({id(with_grad[i]): s for i, s in zip(members, sums, strict=True)})
    return [
        out[id(a)] if id(a) in out else torch.zeros(a.rank, device=a.lora_A.device, dtype=torch.float32)
        for a in adapters
    ]


def adapter_importance(adapter: APTLinear) -> Tensor:
    """The adapter's importance: the mean of :meth:`APTLinear.rank_salience` over its ranks (a 0-d tensor)."""
    return adapter.rank_salience().mean()


def wrap_linear(
    parent: nn.Module, attr: str, rank: int = 8, scale: float = DEFAULT_SCALE, dropout: float = 0.0
) -> APTLinear:
    """Replace the ``nn.Linear`` ``getattr(parent, attr)`` with an :class:`APTLinear` around it and return it.

    Forward hooks on the linear layer move to the wrapper, so they act on the adapted output.
    """
    linear = getattr(parent, attr)
    if isinstance(linear, APTLinear):
        raise ValueError(f"{type(parent).__name__}.{attr} already has an adapter")
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"{type(parent).__name__}.{attr} is a {type(linear).__name__}, not an nn.Linear")
    adapter = APTLinear(linear, rank=rank, scale=scale, dropout=dropout)
    _move_hooks(linear, adapter)
    setattr(parent, attr, adapter)
    return adapter


def wrap_part(parent: nn.Module, attr: str, role: str, start: int, stop: int, rank: int = 8) -> APTLinear:
    """Put an adapter on output rows ``start:stop`` of the fused ``nn.Linear`` ``getattr(parent, attr)`` (under
    ``role``) and return it. The first part adapter replaces the layer with a :class:`FusedAPTLinear`, to which
    its forward hooks move; later ones join it."""
    fused = getattr(parent, attr)
    if not isinstance(fused, FusedAPTLinear):
        if not isinstance(fused, nn.Linear):
            raise TypeError(f"{type(parent).__name__}.{attr} is a {type(fused).__name__}, not an nn.Linear")
        linear, fused = fused, FusedAPTLinear(fused)
        _move_hooks(linear, fused)
        setattr(parent, attr, fused)
    return fused.add(role, start, stop, rank=rank)


def add_adapters(model: nn.Module, roles: Sequence[str], rank: int = 8) -> list[APTLinear]:
    """Wrap the projections with the given roles (``q``, ``v``, ``up``, ...) of every live site in adapters.

    Projections are found through the model's architecture spec; roles a site does not have (``gate`` in
    BERT) are skipped. A role that is a part of a fused projection (``q`` of Phi-3's ``qkv_proj``) gets an
    adapter on its rows only (:class:`FusedAPTLinear`). Returns the adapters in site order.
    """
    from .arch import describe

    structure = describe(model)
    names = {id(m): n for n, m in model.named_modules()}
    adapters = []
    for part in structure.parts(roles):
        parent_name, _, attr = names[id(part.module)].rpartition(".")
        parent = model.get_submodule(parent_name)
        if part.start == 0 and part.size == part.module.out_features:
            adapters.append(wrap_linear(parent, attr, rank=rank))
        else:
            adapters.append(wrap_part(parent, attr, part.role, part.start, part.start + part.size, rank=rank))
    return adapters


def merge_adapters(model: nn.Module) -> int:
    """Replace every :class:`APTLinear` inside ``model`` by its merged ``nn.Linear`` (a :class:`FusedAPTLinear`
    by one ``nn.Linear`` with all its parts merged); return how many adapters were merged.

    Forward hooks on an adapter move to its merged layer.
    """
    count = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, APTLinear) and isinstance(module.base, RowRange):
            continue  # a part of a fused projection: merged with it
        if not isinstance(module, (APTLinear, FusedAPTLinear)):
            continue
        if not name:
            raise ValueError(
                "merge_adapters() needs a model that contains adapters; call .merge() on an adapter"
            )
        parent_name, _, attr = name.rpartition(".")
        merged = module.merge()
        _move_hooks(module, merged)
        setattr(model.get_submodule(parent_name), attr, merged)
        count += len(module.adapters) if isinstance(module, FusedAPTLinear) else 1
    return count


def adapter_param_count(module: nn.Module) -> int:
    """Number of adapter parameters (elements of every ``lora_A`` and ``lora_B``) in ``module``."""
    return sum(m.lora_A.numel() + m.lora_B.numel() for m in module.modules() if isinstance(m, APTLinear))


__all__ = [
    "APTLinear",
    "FusedAPTLinear",
    "add_adapters",
    "adapter_importance",
    "adapter_param_count",
    "applied_weight",
    "merge_adapters",
    "wrap_linear",
]
