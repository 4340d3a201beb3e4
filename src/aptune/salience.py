"""Outlier-aware block salience (method spec §4).

For a block whose activation channels ``c`` see activations ``h`` and upstream gradients ``g``:

    S~(c) = [sum over batch and tokens of |h_c|] * [sum over batch and tokens of |g_c|]    (compressed product)
    S~(b) = sum of S~(c) over the block's channels
    S^(b) = S~(b) + sqrt(max(kurtosis(O_b), 0))     with O = W * mean(x) column-wise (the outlier term)

and the controller keeps ``S_bar = 0.85 S_bar + 0.15 S^`` once per step.

Where the activations are read (the same tensors for every family, found through the spec):

* heads: the input of the attention output projection (the per-head context), before the head mask; under
  grouped-query attention the scored unit is a key/value head with its group of query heads;
* neurons: the input of the FFN down projection (after the nonlinearity), before the neuron mask;
* hidden channels: the inputs of every attention and FFN sublayer that carry gradients (2L sites).

Memory: two vectors per hooked site between forward and backward, never a per-weight gradient of the frozen
model. The kurtosis term needs one transient ``d_out x d_in`` product per output projection, under no-grad.

Decision (paper vs code): the paper adds the kurtosis term for every model; the official code only does it
for LLaMA. We follow the paper and make it a switch (``kurtosis=True``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .arch import ModelStructure
from .sites import site_state, split_site_state


def kurtosis(x: Tensor, dim: int = -1) -> Tensor:
    """Excess (Fisher) kurtosis along ``dim``: mean(z^4) - 3 with z standardised by the unbiased std.

    Zero-variance slices give 0.
    """
    x = x.float()
    mean = x.mean(dim, keepdim=True)
    std = x.std(dim, keepdim=True)
    z = (x - mean) / std
    k = (z**4).mean(dim) - 3.0
    return torch.nan_to_num(k, nan=0.0, posinf=0.0, neginf=0.0)


def outlier_term(x: Tensor, dim: int = -1) -> Tensor:
    """sqrt(max(kurtosis, 0)) along ``dim``: the outlier bonus of method spec eq. 5."""
    return kurtosis(x, dim).clamp_min(0.0).sqrt()


def ema(previous: Tensor | None, current: Tensor, beta: float = 0.85) -> Tensor:
    """Exponential moving average ``beta * previous + (1 - beta) * current`` (``current`` when no history)."""
    if previous is None:
        return current.clone()
    return beta * previous + (1.0 - beta) * current


@dataclass
class BlockScores:
    """One score per head (per attention site), per neuron (per FFN site), and per hidden channel."""

    heads: list[Tensor]
    neurons: list[Tensor]
    hidden: Tensor

    def tensors(self) -> list[Tensor]:
        return [*self.heads, *self.neurons, self.hidden]

    def blend(self, other: BlockScores | None, beta: float = 0.85) -> BlockScores:
        """``self`` folded into the moving average ``other`` (method spec §4.2)."""
        if other is None:
            return BlockScores(
                [h.clone() for h in self.heads], [n.clone() for n in self.neurons], self.hidden.clone()
            )
        return BlockScores(
            [ema(o, s, beta) for o, s in zip(other.heads, self.heads, strict=True)],
            [ema(o, s, beta) for o, s in zip(other.neurons, self.neurons, strict=True)],
            ema(other.hidden, self.hidden, beta),
        )

    def state_dict(self) -> dict[str, Tensor]:
        return site_state(self.heads, self.neurons, self.hidden)

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> BlockScores:
        return cls(*split_site_state(state))


class _Site:
    """Running sums for one hooked tensor: sum |h|, sum |g| (per channel) and sum h (for the mean input)."""

    def __init__(self) -> None:
        self.act: Tensor | None = None
        self.grad: Tensor | None = None
        self.mean_input: Tensor | None = None
        self.count = 0

    def add(self, name: str, value: Tensor) -> None:
        old = getattr(self, name)
        setattr(self, name, value if old is None else old + value)


def _flat_sum(x: Tensor) -> Tensor:
    return x.detach().float().reshape(-1, x.shape[-1]).sum(0)


def _weight_of(linear: nn.Module) -> Tensor:
    """The effective weight of a (possibly adapted) linear layer."""
    merged = getattr(linear, "merged_weight", None)
    return merged() if callable(merged) else linear.weight


class SalienceCollector:
    """Hooks that gather block salience during forward and backward passes.

    Use: ``collector.start()`` before the forward pass of the steps you want to score, run forward and
    backward (any number of micro-batches), then ``collector.scores()`` returns this step's
    :class:`BlockScores` and resets the sums. ``remove()`` takes the hooks away; create a new collector after
    the model's modules change (physical pruning, rank growth replaces parameters but not modules).
    """

    def __init__(self, model: nn.Module, structure: ModelStructure, use_kurtosis: bool = True):
        self.structure = structure
        self.use_kurtosis = use_kurtosis
        self.active = False
        self._heads = [_Site() for _ in structure.attention]
        self._neurons = [_Site() for _ in structure.ffn]
        self._hidden: list[_Site] = []
        self._handles = []
        for site, acc in zip(structure.attention, self._heads, strict=True):
            if site.num_heads:
                self._handles.append(
                    site.o.register_forward_pre_hook(self._hook(acc, keep_mean=True), prepend=True)
                )
        for site, acc in zip(structure.ffn, self._neurons, strict=True):
            if site.num_neurons:
                self._handles.append(
                    site.down.register_forward_pre_hook(self._hook(acc, keep_mean=True), prepend=True)
                )
        readers = [s.q for s in structure.attention if s.num_heads] + [
            s.up for s in structure.ffn if s.num_neurons
        ]
        for module in readers:
            acc = _Site()
            self._hidden.append(acc)
            self._handles.append(
                module.register_forward_pre_hook(self._hook(acc, keep_mean=False), prepend=True)
            )

    def _hook(self, acc: _Site, keep_mean: bool):
        def hook(module, args):
            x = args[0]
            if not self.active or not x.requires_grad:
                return None
            acc.add("act", _flat_sum(x.abs()))
            if keep_mean:
                acc.add("mean_input", _flat_sum(x))
                acc.count += x.numel() // x.shape[-1]
            x.register_hook(lambda g: acc.add("grad", _flat_sum(g.abs())))
            return None

        return hook

    def start(self) -> None:
        self.active = True

    def stop(self) -> None:
        self.active = False

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def reset(self) -> None:
        for acc in [*self._heads, *self._neurons, *self._hidden]:
            acc.__init__()

    @torch.no_grad()
    def scores(self) -> BlockScores:
        """This step's scores S^ (compressed product plus the outlier term); resets the running sums."""
        heads, neurons = [], []
        d = self.structure.hidden.size
        hidden = torch.zeros(d)
        for site, acc in zip(self.structure.attention, self._heads, strict=True):
            units, width = site.num_units, site.unit_width  # a unit: a key/value head and its query heads
            score = torch.zeros(units)
            if units and acc.act is not None and acc.grad is not None:
                per_channel = (acc.act * acc.grad).cpu()
                score = per_channel.view(units, width).sum(1)
                if self.use_kurtosis:
                    o = self._outlier_matrix(site.o, acc)  # (D, units * width)
                    per_head = o.view(o.shape[0], units, width).transpose(0, 1).reshape(units, -1)
                    score = score + outlier_term(per_head, dim=1).cpu()
                    hidden += outlier_term(o, dim=1).cpu()
            heads.append(score)
        for site, acc in zip(self.structure.ffn, self._neurons, strict=True):
            score = torch.zeros(site.num_neurons)
            if site.num_neurons and acc.act is not None and acc.grad is not None:
                score = (acc.act * acc.grad).cpu()
                if self.use_kurtosis:
                    o = self._outlier_matrix(site.down, acc)  # (D, neurons)
                    score = score + outlier_term(o, dim=0).cpu()
                    hidden += outlier_term(o, dim=1).cpu()
            neurons.append(score)
        for acc in self._hidden:
            if acc.act is not None and acc.grad is not None:
                hidden += (acc.act * acc.grad).cpu()
        self.reset()
        return BlockScores(heads, neurons, hidden)

    @staticmethod
    def _outlier_matrix(linear: nn.Module, acc: _Site) -> Tensor:
        mean_input = acc.mean_input / max(acc.count, 1)
        return _weight_of(linear).detach().float() * mean_input[None, :]
