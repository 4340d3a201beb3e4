"""Outlier-aware block salience (method spec §4).

For a block whose activation channels ``c`` see activations ``h`` and upstream gradients ``g`` over the ``n``
real (non-padding) tokens of a step:

    S~(c) = [sum over tokens of |h_c|] * [sum over tokens of |g_c|] / n      (compressed product, per token)
    S~(b) = sum of S~(c) over the block's channels

and the controller keeps the moving average ``S_bar = 0.85 S_bar + 0.15 S~`` once per optimizer step. The
outlier term of spec eq. 5, ``sqrt(max(kurtosis(O_b), 0))`` with ``O = W * mean(x)`` column-wise, is computed
from the weights only when blocks are selected (:func:`outlier_scores`) and added at a scale commensurate with
the salience (:func:`with_outliers`).

Where the activations are read (the same tensors for every family, found through the spec):

* heads: the input of the attention output projection (the per-head context), before the head mask; under
  grouped-query attention the scored unit is a key/value head with its group of query heads;
* neurons: the input of the FFN down projection (after the nonlinearity), before the neuron mask;
* hidden channels: the inputs of every attention and FFN sublayer that carry gradients (2L sites).

Decisions (see docs/apt.md, "Salience"):

* Padding tokens are left out of every sum (the model's ``attention_mask``, read by a hook on the model's own
  forward). Padding the same batch to another length leaves the scores unchanged.
* The paper's product grows with the number of tokens in a batch; dividing by ``n`` makes a step's scores
  independent of batch size and padding, so every step weighs the same in the moving average. Within a step
  the ranking is the paper's.
* The kurtosis term is O(1-10) while ``S~`` scales with the loss, the model and the data, so adding it
  unscaled (the paper's literal formula) lets it decide everything or nothing. It is rescaled per block type
  so that its mean equals ``kurtosis_weight`` times the mean salience of that type, and it fades with the
  block's mask. Whether it is used at all is ``APTConfig.use_kurtosis``.

Cost: per hooked site, a few length-``d`` vectors that stay on the model's device; sums are accumulated in fp32
from activations in their own dtype, with one reduction per site in the forward and one in the backward (a
fused 1-norm on accelerators), plus a mask multiply in the forward when the batch has padding. The only host
read is whether the attention mask has padding, once per forward, which transformers reads too. Turning the
sums into scores takes a fixed number of batched kernels, however many layers. The outlier term needs one
transient ``d_out x d_in`` product per output projection, once per selection.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .arch import ModelStructure
from .distributed import all_reduce_, world_size
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


def ema_(previous: Sequence[Tensor], current: Sequence[Tensor], beta: float = 0.85) -> None:
    """In place, ``previous[i] = beta * previous[i] + (1 - beta) * current[i]`` for every i, in one fused
    multi-tensor kernel where torch has it (a few launches per step instead of one per tensor)."""
    previous, current = list(previous), list(current)
    if not previous:
        return
    foreach = getattr(torch, "_foreach_lerp_", None)
    if foreach is not None:
        foreach(previous, current, 1.0 - beta)
    else:  # pragma: no cover - older torch
        for p, c in zip(previous, current, strict=True):
            p.lerp_(c, 1.0 - beta)


def ema(previous: Tensor | None, current: Tensor, beta: float = 0.85) -> Tensor:
    """Exponential moving average ``beta * previous + (1 - beta) * current`` (``current`` when no history)."""
    if previous is None:
        return current.clone()
    return torch.lerp(
        previous, current.to(previous.dtype), 1.0 - beta
    )  # beta * previous + (1 - beta) * current


@dataclass
class BlockScores:
    """One score per head (per attention site), per neuron (per FFN site), and per hidden channel."""

    heads: list[Tensor]
    neurons: list[Tensor]
    hidden: Tensor

    def tensors(self) -> list[Tensor]:
        return [*self.heads, *self.neurons, self.hidden]

    @classmethod
    def zeros(cls, structure: ModelStructure, device: torch.device | str = "cpu") -> BlockScores:
        """All-zero scores for every block of ``structure``."""
        return cls(
            [torch.zeros(s.num_units, device=device) for s in structure.attention],
            [torch.zeros(s.num_neurons, device=device) for s in structure.ffn],
            torch.zeros(structure.hidden.size, device=device),
        )

    def blend_(self, current: BlockScores, beta: float = 0.85) -> None:
        """Fold ``current`` into these scores in place: the moving average of spec §4.2."""
        ema_(self.tensors(), current.tensors(), beta)

    def keep(self, heads: Sequence[Tensor], neurons: Sequence[Tensor], hidden: Tensor) -> BlockScores:
        """The scores of the kept blocks only (boolean keep flags per site), in their order."""
        return BlockScores(
            [s[k.to(s.device)] for s, k in zip(self.heads, heads, strict=True)],
            [s[k.to(s.device)] for s, k in zip(self.neurons, neurons, strict=True)],
            self.hidden[hidden.to(self.hidden.device)],
        )

    def to(self, device: torch.device | str) -> BlockScores:
        return BlockScores(
            [h.to(device) for h in self.heads], [n.to(device) for n in self.neurons], self.hidden.to(device)
        )

    def cpu(self) -> BlockScores:
        """A host copy in one transfer (one synchronisation, however many sites)."""
        flat = torch.cat([t.reshape(-1) for t in self.tensors()]).to("cpu", torch.float64)
        parts = list(flat.split([t.numel() for t in self.tensors()]))
        n_heads = len(self.heads)
        return BlockScores(parts[:n_heads], parts[n_heads:-1], parts[-1])

    def state_dict(self) -> dict[str, Tensor]:
        return site_state(self.heads, self.neurons, self.hidden)

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> BlockScores:
        return cls(*split_site_state(state))


class _Site:
    """Running sums for one hooked tensor: sum |h|, sum |g| and sum h (for the mean input), per channel."""

    def __init__(self) -> None:
        self.act: Tensor | None = None
        self.grad: Tensor | None = None
        self.total: Tensor | None = None

    def add(self, name: str, value: Tensor) -> None:
        old = getattr(self, name)
        setattr(self, name, value if old is None else old + value)


def _weight_of(linear: nn.Module) -> Tensor:
    """The effective weight of a (possibly adapted) linear layer."""
    merged = getattr(linear, "merged_weight", None)
    return merged() if callable(merged) else linear.weight


class SalienceCollector:
    """Hooks that gather block salience during forward and backward passes.

    Use: ``collector.start()`` before the forward pass of the steps you want to score, run forward and
    backward (any number of micro-batches), then ``collector.scores()`` returns this step's
    :class:`BlockScores` (on the model's device) and resets the sums; ``collector.mean_inputs()`` (before
    ``scores()``) gives the mean inputs of the output projections that the outlier term needs.
    ``remove()`` takes the hooks away; create a new collector after the model's modules change.

    Padding: when the model is called with an ``attention_mask`` of the same batch and length as a hooked
    tensor, padding tokens are left out of the sums. In an encoder-decoder model (T5) that mask covers the
    encoder, and the decoder's tensors use the target's mask: ``decoder_attention_mask``, else the positions
    whose label is not -100 (hooks on the two stacks switch between them); ``n`` counts both sides' tokens.
    """

    def __init__(self, model: nn.Module, structure: ModelStructure, track_inputs: bool = True):
        self.structure = structure
        self.track_inputs = track_inputs
        self.active = False
        self._heads = [_Site() for _ in structure.attention]
        self._neurons = [_Site() for _ in structure.ffn]
        self._hidden: list[_Site] = []
        # number of real tokens seen this step: a host int while every batch was padding-free, else a device scalar
        self._tokens: Tensor | int | None = None
        self._mask: Tensor | None = None  # the current forward's token mask, (batch, length)
        self._weights_cache: dict = {}  # that mask as per-token weights, per device and dtype
        self._handles = [model.register_forward_pre_hook(self._read_mask, with_kwargs=True)]
        # an encoder-decoder: (source mask, target mask), each stack switching to its own before it runs
        self._seq2seq = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        self._stack_masks: tuple[Tensor | None, Tensor | None] = (None, None)
        if self._seq2seq:
            for side, stack in enumerate((model.get_encoder(), model.get_decoder())):
                self._handles.append(stack.register_forward_pre_hook(self._stack_hook(side)))
        for site, acc in zip(structure.attention, self._heads, strict=True):
            if site.num_heads:
                self._handles.append(
                    site.o.register_forward_pre_hook(self._hook(acc, self.track_inputs), prepend=True)
                )
        for site, acc in zip(structure.ffn, self._neurons, strict=True):
            if site.num_neurons:
                self._handles.append(
                    site.down.register_forward_pre_hook(self._hook(acc, self.track_inputs), prepend=True)
                )
        readers = [s.q for s in structure.attention if s.num_heads] + [
            s.up for s in structure.ffn if s.num_neurons
        ]
        for module in readers:
            acc = _Site()
            self._hidden.append(acc)
            self._handles.append(module.register_forward_pre_hook(self._hook(acc, False), prepend=True))

    def _read_mask(self, module, args, kwargs):
        if not self.active or not torch.is_grad_enabled():  # a teacher's no-grad pass is not scored
            return None
        self._weights_cache = {}
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._mask = self._count(kwargs.get("attention_mask"), ids)
        if self._seq2seq:
            target = kwargs.get("decoder_attention_mask")
            labels = kwargs.get("labels")
            if target is None and isinstance(labels, Tensor) and labels.dim() == 2:
                target = labels != -100
            self._stack_masks = (self._mask, self._count(target, kwargs.get("decoder_input_ids")))
        return None

    def _count(self, mask: Tensor | None, ids: Tensor | None) -> Tensor | None:
        """Add the real tokens of ``mask`` (``batch x tokens``; without one, all of ``ids``) to this step's count,
        and return the mask as booleans, or None when it leaves nothing out.

        Whether the mask leaves anything out is read on the host, once per forward. On a GPU that read waits for
        the device, but transformers makes the same read of the same mask in every forward (SDPA and
        flash-attention mask creation skip an all-ones mask), so it adds no wait of its own; in return a
        padding-free batch (packed text, fixed-length rows) needs no mask multiply at any hooked site and its
        token count is a host number (no kernel at all)."""
        if isinstance(mask, Tensor) and mask.dim() == 2:
            if bool(mask.detach().all()):
                kept, count = None, mask.numel()
            else:
                kept = mask.detach() != 0
                count = kept.sum()
        else:
            kept = None
            count = ids.numel() if isinstance(ids, Tensor) else None
        if count is not None:
            self._tokens = count if self._tokens is None else self._tokens + count
        return kept

    def _stack_hook(self, side: int):
        """A pre-hook on the encoder (side 0) or decoder (1) of an encoder-decoder: use that side's token mask."""

        def hook(module, args):
            if self.active and torch.is_grad_enabled():
                self._mask = self._stack_masks[side]
                self._weights_cache = {}

        return hook

    def _weights(self, x: Tensor) -> Tensor | None:
        """Per-token 0/1 weights shaped to broadcast over ``x``, or None (every token counts)."""
        m = self._mask
        if m is None or x.dim() != 3 or tuple(m.shape) != tuple(x.shape[:2]):
            return None
        key = (x.device, x.dtype)
        w = self._weights_cache.get(key)
        if w is None:
            w = self._weights_cache[key] = m.to(device=x.device, dtype=x.dtype)[..., None]
        return w

    def _hook(self, acc: _Site, keep_total: bool):
        def hook(module, args):
            x = args[0]
            if not self.active or not x.requires_grad or _recomputing():
                return None
            w = self._weights(x)
            dims = tuple(range(x.dim() - 1))
            h = x.detach()
            acc.add("act", _abs_sum(h, dims, w))
            if keep_total:
                acc.add("total", (h if w is None else h * w).sum(dims, dtype=torch.float32))

            def on_grad(g: Tensor) -> None:
                # no mask needed: padding positions get no gradient (no real token attends to them, and
                # their outputs feed no loss)
                acc.add("grad", _abs_sum(g, dims))

            x.register_hook(on_grad)
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
        self._tokens = None
        self._mask = None
        self._stack_masks = (None, None)

    @torch.no_grad()
    def all_reduce(self) -> None:
        """Combine this step's sums over the processes of a multi-process run, each of which saw its slice of
        the global batch: activations, inputs and token counts add up; gradients are averaged (a process's
        loss is the mean over its slice, so its gradients are world-size times those of one process that
        sees the whole batch). Afterwards every process holds what one process would have gathered."""
        if world_size() == 1:
            return
        sites = [*self._heads, *self._neurons, *self._hidden]
        sums = [t for a in sites for t in (a.act, a.total) if t is not None]
        if self._tokens is not None:
            self._tokens = torch.as_tensor(self._tokens, dtype=torch.float32).to(self._device())
            sums.append(self._tokens)
        all_reduce_(sums, "sum")
        all_reduce_([a.grad for a in sites if a.grad is not None], "mean")

    @torch.no_grad()
    def mean_inputs(self) -> tuple[list[Tensor | None], list[Tensor | None]]:
        """This step's mean input (over real tokens) of every attention output and FFN down projection."""

        def mean(acc: _Site) -> Tensor | None:
            if acc.total is None:
                return None
            return acc.total / self._token_count(acc.total.device)

        return [mean(a) for a in self._heads], [mean(a) for a in self._neurons]

    def _token_count(self, device: torch.device) -> Tensor | float:
        """This step's number of real tokens (at least 1): a host float when no batch had padding."""
        if self._tokens is None:
            return 1.0
        if isinstance(self._tokens, Tensor):
            return self._tokens.to(device, torch.float32).clamp_min(1.0)
        return float(max(self._tokens, 1))

    @torch.no_grad()
    def scores(self) -> BlockScores:
        """This step's scores S~ (compressed product per real token), on the model's device; resets the sums.

        A few fused or batched kernels for the whole model, not a few per site: one multi-tensor product for
        every site, one reduction for all head units of one width, one for the hidden channels."""
        device = self._device()
        n = self._token_count(device)
        sites = [
            a
            for a in [*self._heads, *self._neurons, *self._hidden]
            if a.act is not None and a.grad is not None
        ]
        products = dict(
            zip(map(id, sites), _products([a.act for a in sites], [a.grad for a in sites], n), strict=True)
        )
        head_products = [
            (products.get(id(acc)) if site.num_units else None, site.unit_width)
            for site, acc in zip(self.structure.attention, self._heads, strict=True)
        ]
        heads = [
            score if score is not None else torch.zeros(site.num_units, device=device)
            for score, site in zip(_unit_sums(head_products), self.structure.attention, strict=True)
        ]
        neurons = []
        for site, acc in zip(self.structure.ffn, self._neurons, strict=True):
            score = products.get(id(acc))
            neurons.append(
                score
                if site.num_neurons and score is not None
                else torch.zeros(site.num_neurons, device=device)
            )
        hidden_parts = [products[id(acc)] for acc in self._hidden if id(acc) in products]
        if hidden_parts:
            hidden = torch.stack(hidden_parts).sum(0)
        else:
            hidden = torch.zeros(self.structure.hidden.size, device=device)
        self.reset()
        return BlockScores(heads, neurons, hidden)

    def _device(self) -> torch.device:
        for site in [*self.structure.attention, *self.structure.ffn]:
            proj = getattr(site, "o", None) or getattr(site, "down", None)
            if proj is not None:
                return proj.weight.device
        return torch.device("cpu")


def _host_side(x: Tensor) -> bool:
    """Whether ``x`` lives on the CPU, where a fused 1-norm is about 10x slower than ``abs`` then ``sum``.

    The collector's one device-dependent choice follows it: ``|x|`` is summed as ``abs`` + ``sum`` on the host
    and as one 1-norm reduction kernel on an accelerator."""
    return x.device.type == "cpu"


def _abs_sum(x: Tensor, dims: tuple[int, ...], weights: Tensor | None = None) -> Tensor:
    """``sum(|x| * weights)`` over ``dims`` in fp32 (``weights``: per-token 0/1, broadcasting over ``x``).

    On an accelerator this is a 1-norm reduction: one kernel, abs and the fp32 accumulation fused into it, no
    temporary (two with weights: the weighted copy). On the CPU that reduction is about 10x slower than ``abs``
    then ``sum``, which it uses instead, with the weights applied in place."""
    if not _host_side(x):
        return torch.linalg.vector_norm(x if weights is None else x * weights, 1, dims, dtype=torch.float32)
    a = x.abs()
    if weights is not None:
        a.mul_(weights)
    return a.sum(dims, dtype=torch.float32)


def _recomputing() -> bool:
    """True inside a backward pass: a gradient-checkpointed block recomputing its forward. The block was
    counted (and its gradient hook set) in the real forward, so the recomputation must not count it again."""
    return torch._C._current_graph_task_id() != -1


def _products(acts: list[Tensor], grads: list[Tensor], n: Tensor | float) -> list[Tensor]:
    """``act * grad / n`` for each pair, with fused multi-tensor kernels where torch has them."""
    if not acts:
        return []
    mul = getattr(torch, "_foreach_mul", None)
    if mul is None:  # pragma: no cover - older torch
        return [a * g / n for a, g in zip(acts, grads, strict=True)]
    out = mul(acts, grads)
    torch._foreach_div_(out, n)
    return out


def _unit_sums(products: Sequence[tuple[Tensor | None, int]]) -> list[Tensor | None]:
    """Per-unit sums of per-channel scores: for each ``(scores, unit_width)``, ``scores`` summed over each run of
    ``unit_width`` consecutive channels (None stays None). Sites of one width and device share one reduction."""
    groups: dict[tuple, list[int]] = {}
    for i, (scores, width) in enumerate(products):
        if scores is not None:
            groups.setdefault((width, scores.device, scores.dtype), []).append(i)
    out: list[Tensor | None] = [None] * len(products)
    for (width, _, _), members in groups.items():
        flat = torch.cat([products[i][0] for i in members]) if len(members) > 1 else products[members[0]][0]
        sums = flat.view(-1, width).sum(1)
        sizes = [products[i][0].numel() // width for i in members]
        for i, part in zip(members, sums.split(sizes), strict=True):
            out[i] = part
    return out


def _outlier_matrix(linear: nn.Module, x_bar: Tensor) -> Tensor:
    """``O = W * x_bar`` column-wise, in fp32: the effective weight with each column scaled by its mean input."""
    return _weight_of(linear).float() * x_bar.to(linear.weight.device, torch.float32)[None, :]


@torch.no_grad()
def outlier_scores(
    structure: ModelStructure,
    head_inputs: Sequence[Tensor | None],
    neuron_inputs: Sequence[Tensor | None],
) -> BlockScores:
    """The outlier term ``sqrt(max(kurtosis(O_b), 0))`` of every block (spec §4.1, eq. 5; §4.4 grouping).

    ``O = W * x_bar`` column-wise, with ``W`` the effective (adapter-merged) weight of each attention output
    or FFN down projection and ``x_bar`` its mean input (``head_inputs[i]``/``neuron_inputs[i]``; None
    gives 0 for that site). A head unit's term is the kurtosis over its columns of ``O`` (grouped per unit,
    not mixed across heads as the released code does); a neuron's over its column; a hidden channel's is the
    sum over sites of the kurtosis over its row.
    """
    device = None
    heads, neurons = [], []
    hidden: Tensor | None = None

    def add_hidden(rows: Tensor) -> None:
        nonlocal hidden
        hidden = rows if hidden is None else hidden + rows.to(hidden.device)

    for site, x_bar in zip(structure.attention, head_inputs, strict=True):
        if not site.num_units or x_bar is None:
            heads.append(torch.zeros(site.num_units))
            continue
        o = _outlier_matrix(site.o, x_bar)
        device = o.device
        units, width = site.num_units, site.unit_width
        per_unit = o.view(o.shape[0], units, width).transpose(0, 1).reshape(units, -1)
        heads.append(outlier_term(per_unit, dim=1))
        add_hidden(outlier_term(o, dim=1))
    for site, x_bar in zip(structure.ffn, neuron_inputs, strict=True):
        if not site.num_neurons or x_bar is None:
            neurons.append(torch.zeros(site.num_neurons))
            continue
        o = _outlier_matrix(site.down, x_bar)
        device = o.device
        neurons.append(outlier_term(o, dim=0))
        add_hidden(outlier_term(o, dim=1))
    device = device or torch.device("cpu")
    if hidden is None:
        hidden = torch.zeros(structure.hidden.size)
    return BlockScores([h.to(device) for h in heads], [n.to(device) for n in neurons], hidden.to(device))


def _commensurate(salience: list[Tensor], outliers: list[Tensor], weight: float) -> list[Tensor]:
    """``outliers`` rescaled so that their mean over all blocks of this type is ``weight`` x the salience's."""
    s = torch.cat([t.reshape(-1).float() for t in salience]) if salience else None
    o = torch.cat([t.reshape(-1).float() for t in outliers]) if outliers else None
    if s is None or o is None or s.numel() == 0:
        return [torch.zeros_like(t) for t in salience]
    scale = weight * s.mean() / o.mean().clamp_min(1e-12)
    return [t.to(sal.device) * scale.to(sal.device) for t, sal in zip(outliers, salience, strict=True)]


def with_outliers(
    salience: BlockScores, outliers: BlockScores, weight: float = 1.0, masks: BlockScores | None = None
) -> BlockScores:
    """``S_bar + bonus``: the outlier term rescaled per block type to ``weight`` x that type's mean salience.

    With ``masks`` (the current mask values), each block's bonus is multiplied by its mask, so a block being
    pruned loses the bonus as its mask decays and a removed one has none (spec §4.2: its score fades to 0).
    """
    heads = _commensurate(salience.heads, outliers.heads, weight)
    neurons = _commensurate(salience.neurons, outliers.neurons, weight)
    hidden = _commensurate([salience.hidden], [outliers.hidden], weight)[0]
    if masks is not None:
        heads = [b * m.to(b) for b, m in zip(heads, masks.heads, strict=True)]
        neurons = [b * m.to(b) for b, m in zip(neurons, masks.neurons, strict=True)]
        hidden = hidden * masks.hidden.to(hidden)
    return BlockScores(
        [s + b for s, b in zip(salience.heads, heads, strict=True)],
        [s + b for s, b in zip(salience.neurons, neurons, strict=True)],
        salience.hidden + hidden,
    )
