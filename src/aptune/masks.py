"""Structural masks on stock transformers modules.

Three kinds of mask, all with values in [0, 1] so that APT can decay them gradually:

* one head mask per attention site (length = that site's heads): multiplies each head's attention context
  before the output projection;
* one neuron mask per FFN site: multiplies the FFN activation before the down projection;
* one hidden mask shared by all layers: multiplies the embedding output, every sublayer's projected output
  and every norm's output; norms compute their statistics over the channels whose mask is non-zero
  (method spec §3.2).

A sublayer whose mask is all zero is skipped: its output is replaced as the family's spec says (for BERT,
the sublayer returns its input). With binary masks a masked model computes what its compacted copy computes.

Masks are applied with forward hooks (:func:`apply_masks`), never with forked model code. Change mask values
through the ``set_*`` methods: they validate the values and refresh the flags the hooks read.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .arch import ModelStructure, describe
from .sites import site_state, split_site_state


class MaskError(ValueError):
    """A mask has the wrong length or values outside [0, 1]."""


def _check(values: Tensor | Sequence[float], length: int, what: str) -> Tensor:
    t = torch.as_tensor(values, dtype=torch.float32).detach().flatten().clone()
    if t.numel() != length:
        raise MaskError(f"{what} has {t.numel()} entries but must have {length}")
    if torch.isnan(t).any() or (t < 0).any() or (t > 1).any():
        raise MaskError(f"{what} has values outside [0, 1]: min {t.min().item():g}, max {t.max().item():g}")
    return t


class StructuralMasks:
    """Head masks per attention site, neuron masks per FFN site and one hidden-channel mask."""

    def __init__(self, heads: Sequence[Tensor], neurons: Sequence[Tensor], hidden: Tensor):
        self.heads = [_check(h, len(h), f"head mask {i}") for i, h in enumerate(heads)]
        self.neurons = [_check(n, len(n), f"neuron mask {i}") for i, n in enumerate(neurons)]
        self.hidden = _check(hidden, len(hidden), "hidden mask")

    @classmethod
    def ones(cls, structure: ModelStructure) -> StructuralMasks:
        """All-ones masks shaped like ``structure`` (a model's :func:`aptune.arch.describe`)."""
        return cls(
            heads=[torch.ones(s.num_units) for s in structure.attention],
            neurons=[torch.ones(s.num_neurons) for s in structure.ffn],
            hidden=torch.ones(structure.hidden.size),
        )

    @classmethod
    def for_model(cls, model: nn.Module) -> StructuralMasks:
        return cls.ones(describe(model))

    # -- setting values -------------------------------------------------------------------------------
    def set_heads(self, site: int, values: Tensor | Sequence[float]) -> None:
        self._index_check(site, self.heads, "attention site")
        self.heads[site] = _check(values, len(self.heads[site]), f"head mask for attention site {site}")

    def set_neurons(self, site: int, values: Tensor | Sequence[float]) -> None:
        self._index_check(site, self.neurons, "FFN site")
        self.neurons[site] = _check(values, len(self.neurons[site]), f"neuron mask for FFN site {site}")

    def set_hidden(self, values: Tensor | Sequence[float]) -> None:
        self.hidden = _check(values, len(self.hidden), "hidden mask")

    @staticmethod
    def _index_check(site: int, masks: list, what: str) -> None:
        if not 0 <= site < len(masks):
            raise MaskError(f"{what} {site} does not exist; the model has {len(masks)}")

    # -- queries ---------------------------------------------------------------------------------------
    def is_binary(self) -> bool:
        return all(bool(((m == 0) | (m == 1)).all()) for m in self.all_tensors())

    def all_tensors(self) -> list[Tensor]:
        return [*self.heads, *self.neurons, self.hidden]

    def validate_for(self, structure: ModelStructure) -> None:
        """Raise :class:`MaskError` unless the masks have the lengths of ``structure``."""
        if len(self.heads) != len(structure.attention) or len(self.neurons) != len(structure.ffn):
            raise MaskError(
                f"masks are for {len(self.heads)} attention and {len(self.neurons)} FFN sites, the model has "
                f"{len(structure.attention)} and {len(structure.ffn)}"
            )
        for m, s in zip(self.heads, structure.attention, strict=True):
            if len(m) != s.num_units:
                what = "heads" if s.group_size == 1 else "key/value head groups"
                raise MaskError(
                    f"head mask for {s.name} has {len(m)} entries but it has {s.num_units} {what}"
                )
        for m, s in zip(self.neurons, structure.ffn, strict=True):
            if len(m) != s.num_neurons:
                raise MaskError(
                    f"neuron mask for {s.name} has {len(m)} entries but it has {s.num_neurons} neurons"
                )
        if len(self.hidden) != structure.hidden.size:
            raise MaskError(
                f"hidden mask has {len(self.hidden)} entries but the model has {structure.hidden.size} channels"
            )

    def state_dict(self) -> dict[str, Tensor]:
        return site_state(self.heads, self.neurons, self.hidden)

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> StructuralMasks:
        return cls(*split_site_state(state))


# -- applying masks with hooks -------------------------------------------------------------------------


def _rms_eps(norm: nn.Module) -> float | None:
    """The epsilon of an RMS norm (transformers' ``*RMSNorm`` classes, ``torch.nn.RMSNorm``), else None."""
    if isinstance(norm, nn.RMSNorm):
        return norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps
    eps = getattr(norm, "variance_epsilon", None)
    if eps is not None and getattr(norm, "bias", None) is None and type(norm).__name__.endswith("RMSNorm"):
        return float(eps)
    return None


def _norm_over_kept(norm: nn.Module, x: Tensor, kept: Tensor) -> Tensor:
    """The norm of ``x`` with statistics over the ``kept`` channels only; other channels come out as 0."""
    y = torch.zeros_like(x)
    if isinstance(norm, nn.LayerNorm):
        weight = norm.weight[kept] if norm.weight is not None else None
        bias = norm.bias[kept] if norm.bias is not None else None
        y[..., kept] = F.layer_norm(x[..., kept], (len(kept),), weight, bias, norm.eps)
        return y
    eps = _rms_eps(norm)
    if eps is None:
        raise NotImplementedError(f"hidden-channel masking does not support {type(norm).__name__} yet")
    # as transformers' RMS norms compute it: statistics in float32, scaled in the input dtype
    h = x[..., kept].float()
    h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    y[..., kept] = h * norm.weight[kept] if norm.weight is not None else h
    return y


def _scale(x: Tensor, mask: Tensor) -> Tensor:
    """``x * mask``; in place when no graph is being recorded (evaluation), so a masked forward pass holds no
    second copy of the activation (the hooked tensors are intermediates that nothing else reads)."""
    if torch.is_grad_enabled():
        return x * mask
    return x.mul_(mask)


class _Cached:
    """What the hooks need of one mask, computed once per new mask tensor: flags and device copies."""

    def __init__(self, mask: Tensor, width: int = 1):
        self.mask = mask  # the host tensor these values were derived from (set_* replaces, never mutates)
        self.full = bool((mask == 1).all())
        self.zero = bool((mask == 0).all())
        self.width = width
        self._copies: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self._kept: dict[torch.device, Tensor] = {}

    def values(self, like: Tensor) -> Tensor:
        """The mask (each entry repeated ``width`` times) on ``like``'s device and in its dtype."""
        key = (like.device, like.dtype)
        t = self._copies.get(key)
        if t is None:
            m = self.mask.repeat_interleave(self.width) if self.width > 1 else self.mask
            t = self._copies[key] = m.to(device=like.device, dtype=like.dtype)
        return t

    def kept(self, device: torch.device) -> Tensor:
        """Indices of the non-zero entries, on ``device``."""
        t = self._kept.get(device)
        if t is None:
            t = self._kept[device] = torch.nonzero(self.mask != 0).flatten().to(device)
        return t


class MaskHooks:
    """The hooks that make a model obey a :class:`StructuralMasks`. Remove them with :meth:`remove`.

    The hooks read the mask lists at call time, so ``set_*`` calls take effect without re-hooking. What they
    derive from a mask (its device copy, whether it is all ones or all zeros, the kept channels) is computed
    once per new mask tensor, so a forward pass with unchanged masks copies nothing to the device and never
    waits for it. Hidden-channel norms are computed once, over the kept channels, in place of the norm's own
    forward (see :meth:`_install_norm`).
    """

    def __init__(self, model: nn.Module, masks: StructuralMasks):
        structure = describe(model)
        masks.validate_for(structure)
        self.model = model
        self.masks = masks
        self.structure = structure
        self.enabled = True  # False runs the model unmasked (the self-distillation teacher does)
        self._handles: list = []
        self._cache: dict[tuple[str, int], _Cached] = {}
        self._patched_norms: list[nn.Module] = []
        for i, site in enumerate(structure.attention):
            if site.num_heads:
                self._handles.append(site.o.register_forward_pre_hook(self._head_hook(i, site.unit_width)))
                self._handles.append(
                    site.block.register_forward_hook(self._skip_hook("heads", i, site.skip), with_kwargs=True)
                )
        for i, site in enumerate(structure.ffn):
            if site.num_neurons:
                self._handles.append(site.down.register_forward_pre_hook(self._neuron_hook(i)))
                self._handles.append(
                    site.block.register_forward_hook(
                        self._skip_hook("neurons", i, site.skip), with_kwargs=True
                    )
                )
        hidden = structure.hidden
        for module in hidden.mask_inputs:
            self._handles.append(module.register_forward_pre_hook(self._hidden_input_hook))
        for module in [*hidden.producers, *hidden.mask_outputs]:
            self._handles.append(module.register_forward_hook(self._hidden_output_hook))
        for module in hidden.norms:
            self._install_norm(module, hidden.norm_over_kept or _norm_over_kept)
        model._aptune_mask_hooks = self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for norm in self._patched_norms:
            norm.__dict__.pop("forward", None)
        self._patched_norms.clear()
        self._cache.clear()
        if getattr(self.model, "_aptune_mask_hooks", None) is self:
            del self.model._aptune_mask_hooks

    def _state(self, kind: str, i: int = 0, width: int = 1) -> _Cached:
        mask = self.masks.hidden if kind == "hidden" else getattr(self.masks, kind)[i]
        entry = self._cache.get((kind, i))
        if entry is None or entry.mask is not mask:
            entry = self._cache[(kind, i)] = _Cached(mask, width)
        return entry

    def _head_hook(self, i: int, width: int):
        def hook(module, args):
            state = self._state("heads", i, width)
            if not self.enabled or state.full:
                return None
            x = args[0]
            return (_scale(x, state.values(x)), *args[1:])

        return hook

    def _neuron_hook(self, i: int):
        def hook(module, args):
            state = self._state("neurons", i)
            if not self.enabled or state.full:
                return None
            return (_scale(args[0], state.values(args[0])), *args[1:])

        return hook

    def _skip_hook(self, kind: str, i: int, skip):
        def hook(module, args, kwargs, output):
            if self.enabled and self._state(kind, i).zero:
                return skip(module, args, kwargs, output)
            return None

        return hook

    def _hidden(self) -> _Cached | None:
        """The hidden mask's cached state, or None when it changes nothing (disabled or all ones)."""
        if not self.enabled:
            return None
        state = self._state("hidden")
        return None if state.full else state

    def _hidden_input_hook(self, module, args):
        state = self._hidden()
        if state is None:
            return None
        return (_scale(args[0], state.values(args[0])), *args[1:])

    def _hidden_output_hook(self, module, args, output):
        state = self._hidden()
        if state is None:
            return None
        return _scale(output, state.values(output))

    def _install_norm(self, norm: nn.Module, over_kept=_norm_over_kept) -> None:
        """Replace the norm's forward (on this instance only) by one that, under a partial hidden mask,
        normalises over the kept channels instead of computing the full norm and then correcting it.
        ``over_kept`` computes the norm over the kept channels (the family's formula, from its spec)."""
        original = norm.forward

        def forward(x, *args, **kwargs):
            state = self._hidden()
            if state is None:
                return original(x, *args, **kwargs)
            return over_kept(norm, x, state.kept(x.device)) * state.values(x)

        norm.forward = forward
        self._patched_norms.append(norm)


def apply_masks(model: nn.Module, masks: StructuralMasks | None = None) -> MaskHooks:
    """Install hooks so that ``model`` obeys ``masks`` (all-ones masks when None).

    Any masks applied earlier are removed first. Returns the :class:`MaskHooks`; its ``masks`` attribute
    holds the live masks, and :func:`aptune.compact` finds them on the model.
    """
    remove_masks(model)
    return MaskHooks(model, masks if masks is not None else StructuralMasks.for_model(model))


def attached_hooks(model: nn.Module) -> MaskHooks | None:
    """The :class:`MaskHooks` applied to ``model``, if any."""
    return getattr(model, "_aptune_mask_hooks", None)


def attached_masks(model: nn.Module) -> StructuralMasks | None:
    hooks = attached_hooks(model)
    return hooks.masks if hooks is not None else None


def remove_masks(model: nn.Module) -> None:
    """Take away the mask hooks applied to ``model`` (nothing happens when there are none)."""
    hooks = attached_hooks(model)
    if hooks is not None:
        hooks.remove()
