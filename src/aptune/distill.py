"""Self-distillation that shares the frozen backbone between teacher and student (method spec §7).

The teacher is never a second model. It is the same model run with

* the adapters' frozen snapshot factors (``APTLinear.teacher_A/B``) instead of the live ones,
* a frozen snapshot of the task head's parameters,
* the structural masks switched off, so during a mask-decay window it keeps the blocks the student is losing.

Physical pruning removes blocks from teacher and student alike (they share the weights); the snapshots are
sliced with them. Losses (spec §7.1): ``L = mu * (w_pred * L_pred + w_layer * L_layer) + (1 - mu) * L_task`` with
``L_pred = T^2 KL(teacher || student)`` on the logits and ``L_layer`` the MSE between the transformed student
hidden states and the teacher's, over one teacher layer sampled from each quarter of the stack every step.

What ``L_pred`` compares depends on the head (:func:`output_prediction_loss`):

* sequence classification (logits ``batch x labels``): the KL averaged over the batch;
* token-level logits (``batch x tokens x labels``, e.g. token classification): the KL per token, averaged over the
  non-padding tokens of the attention mask. Tokens whose label is -100 (special tokens, continuation
  sub-words) are real tokens and still count: the teacher's distribution there is well defined;
* question answering (``start_logits``/``end_logits``, each ``batch x tokens``): the mean of the KL over start
  positions and the KL over end positions, each averaged over the batch (spec §7.1, as the official code does);
* an encoder-decoder (T5) language-model head: the KL per target token, averaged over the real target tokens
  (the batch's ``decoder_attention_mask``, else the positions whose label is not -100: :func:`target_mask`).

With an attention mask, ``L_layer`` also ignores padding: each MSE is a mean over non-padding tokens and channels.
An encoder-decoder model has two stacks, handled separately as the paper's code does (spec §7.3): teacher layers are
sampled from each stack, student layers are mapped within it (its encoder layers are the model's first layers, its
decoder layers the next ones: :class:`aptune.arch.ModelStructure` numbers them so), and ``L_layer`` is the mean of
the two stacks' sums, the encoder's over source tokens and the decoder's over target tokens.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .adapter import APTLinear
from .masks import attached_hooks

# -- pure loss functions ---------------------------------------------------------------------------------


# Keys of a batch that are targets, not model inputs: the teacher's forward pass does not need them.
TARGET_KEYS = ("labels", "start_positions", "end_positions")


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """The mean of ``values`` over the positions where ``mask`` (same shape, 0/1 or bool) is set (0 when none
    is); over all positions without a mask."""
    if mask is None:
        return values.mean()
    if mask.shape != values.shape:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not fit values of shape {tuple(values.shape)}"
        )
    weights = mask.to(device=values.device, dtype=values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1)  # no host sync; an empty mask gives 0


def prediction_loss(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float, mask: Tensor | None = None
) -> Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` over the last dimension.

    The KL of each position (each row of ``batch x labels`` logits, each token of ``batch x tokens x labels``
    logits) is averaged over all positions, or over those where ``mask`` (the logits' shape without the last
    dimension, e.g. the attention mask) is set. For ``batch x labels`` logits without a mask this is the
    batch mean.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ"
        )
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    if mask is None and student_logits.dim() == 2:
        return (t * t) * F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="none").sum(-1)
    return (t * t) * _masked_mean(kl, mask)


def output_prediction_loss(
    student_out, teacher_out, temperature: float, attention_mask: Tensor | None = None
) -> Tensor:
    """``L_pred`` for a model output of any supported head (see the module docstring).

    Question answering (``start_logits``/``end_logits``): the mean of the start and end KL, each over the
    token positions and averaged over the batch. Logits with a token dimension (``batch x tokens x labels``):
    the KL averaged over the tokens that ``attention_mask`` marks as real. Other logits: averaged over the batch.
    """
    if getattr(student_out, "start_logits", None) is not None:
        start = prediction_loss(student_out.start_logits, teacher_out.start_logits, temperature)
        end = prediction_loss(student_out.end_logits, teacher_out.end_logits, temperature)
        return (start + end) / 2
    logits = getattr(student_out, "logits", None)
    if logits is None:
        raise ValueError(
            f"cannot distil a {type(student_out).__name__}: it has neither logits nor start/end logits"
        )
    mask = attention_mask if logits.dim() == 3 else None
    if mask is not None and mask.shape != logits.shape[:-1]:
        raise ValueError(
            f"attention mask of shape {tuple(mask.shape)} does not fit token logits of shape {tuple(logits.shape)}"
        )
    return prediction_loss(logits, teacher_out.logits, temperature, mask)


def hidden_mse(student: Tensor, teacher: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """The MSE between hidden states (``batch x tokens x channels``), in float32.

    With ``attention_mask`` (``batch x tokens``) the mean runs over the non-padding tokens and all channels.
    """
    squared = (student.float() - teacher.float()).pow(2)
    if attention_mask is None:
        return squared.mean()
    return _masked_mean(squared.mean(-1), attention_mask)


def sample_teacher_layers(num_layers: int, generator: torch.Generator | None = None) -> list[int]:
    """One layer drawn uniformly from each quarter of the stack (fewer when there are fewer than 4 layers)."""
    groups = [g for g in torch.arange(num_layers).tensor_split(min(4, num_layers)) if len(g)]
    return [int(g[torch.randint(len(g), (1,), generator=generator)]) for g in groups]


def map_layers(
    teacher_layers: Sequence[int],
    alive: Sequence[bool],
    student_hidden: Sequence[Tensor],
    teacher_hidden: Sequence[Tensor],
    transform: nn.Module,
    attention_mask: Tensor | None = None,
) -> list[tuple[int, int]]:
    """Pair each teacher layer with a student layer (spec §7.3).

    The same layer when it is alive (it keeps at least one head and one neuron); otherwise the nearer (by MSE,
    over non-padding tokens when ``attention_mask`` is given) of the closest alive layers below and above; no
    pair when no layer is alive.
    """
    pairs = []
    alive_idx = [i for i, a in enumerate(alive) if a]
    for t in teacher_layers:
        if not alive_idx:
            break
        if alive[t]:
            pairs.append((t, t))
            continue
        below = [i for i in alive_idx if i < t]
        above = [i for i in alive_idx if i > t]
        candidates = ([below[-1]] if below else []) + ([above[0]] if above else [])
        with torch.no_grad():
            errors = [
                float(hidden_mse(transform(student_hidden[s]), teacher_hidden[t], attention_mask))
                for s in candidates
            ]
        pairs.append((t, candidates[errors.index(min(errors))]))
    return pairs


def layer_loss(
    pairs: Sequence[tuple[int, int]],
    student_hidden: Sequence[Tensor],
    teacher_hidden: Sequence[Tensor],
    transform: nn.Module,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """Sum over pairs of ``MSE(transform(student[s]), teacher[t])``.

    Each MSE is a mean over tokens and channels; over the non-padding tokens only when ``attention_mask``
    (``batch x tokens``) is given.
    """
    total = student_hidden[0].new_zeros((), dtype=torch.float32)
    for t, s in pairs:
        total = total + hidden_mse(transform(student_hidden[s]), teacher_hidden[t], attention_mask)
    return total


def target_mask(batch: dict[str, Tensor]) -> Tensor | None:
    """The target-side token mask of a sequence-to-sequence batch: its ``decoder_attention_mask``, else the
    labelled target positions (``labels != -100``: the rest pads the targets); None without either. Only an
    encoder-decoder model's loss reads it (:meth:`SelfDistiller.loss`)."""
    mask = batch.get("decoder_attention_mask")
    if mask is not None:
        return mask
    labels = batch.get("labels")
    return labels != -100 if isinstance(labels, Tensor) and labels.dim() == 2 else None


def _is_seq2seq(out) -> bool:
    """Whether a model output is an encoder-decoder's (it has decoder hidden states)."""
    return getattr(out, "decoder_hidden_states", None) is not None


def hidden_stacks(
    student_out, teacher_out, attention_mask: Tensor | None = None, decoder_mask: Tensor | None = None
) -> list[tuple[Sequence[Tensor], Sequence[Tensor], Tensor | None]]:
    """(student layer outputs, teacher layer outputs, token mask) of each stack; the embedding output is not
    compared. One stack (``hidden_states``, ``attention_mask``) for an encoder or a decoder; an encoder-decoder's
    encoder (``encoder_hidden_states``, ``attention_mask``), then its decoder (``decoder_hidden_states``,
    ``decoder_mask``)."""
    if _is_seq2seq(student_out):
        return [
            (student_out.encoder_hidden_states[1:], teacher_out.encoder_hidden_states[1:], attention_mask),
            (student_out.decoder_hidden_states[1:], teacher_out.decoder_hidden_states[1:], decoder_mask),
        ]
    return [(student_out.hidden_states[1:], teacher_out.hidden_states[1:], attention_mask)]


# -- the teacher -----------------------------------------------------------------------------------------


def identity_transform(size: int, rank: int, device=None, dtype=None) -> APTLinear:
    """``Tr``: a frozen identity map plus a trainable low-rank part (identity at initialisation).

    The identity is in ``dtype`` (exact in any float format); the adapter factors are float32 like every
    adapter's, and the output has ``dtype``.
    """
    base = nn.Linear(size, size, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        base.weight.copy_(torch.eye(size, device=device, dtype=dtype))
    return APTLinear(base, rank=rank)


class SelfDistiller:
    """Teacher snapshots and distillation losses for one model; the controller decides when to use them."""

    def __init__(
        self,
        model: nn.Module,
        hidden_size: int,
        head_parameters: dict[str, nn.Parameter],
        temperature: float = 2 / 3,
        pred_weight: float = 1.0,
        layer_weight: float = 0.9,
        transform_rank: int = 8,
        seed: int = 0,
    ):
        self.model = model
        self.temperature = temperature
        self.pred_weight = pred_weight
        self.layer_weight = layer_weight
        p = next(model.parameters())
        self.transform = identity_transform(hidden_size, transform_rank, device=p.device, dtype=p.dtype)
        self.head_parameters = head_parameters
        self.teacher_head: dict[str, Tensor] | None = None
        self.teacher_model: nn.Module | None = None  # set once the student has its own compacted copy
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def has_teacher(self) -> bool:
        return self.teacher_head is not None

    @property
    def separate(self) -> bool:
        """True once teacher and student no longer share modules (see :meth:`separate_teacher`)."""
        return self.teacher_model is not None

    @torch.no_grad()
    def separate_teacher(self, teacher: nn.Module) -> None:
        """Make ``teacher``, a copy of the model that shares its frozen tensors, the teacher for good.

        The copy's adapters and head take the snapshot values and everything in it is frozen, so its forward
        pass needs no switching; the student (``self.model``, the same object as before) drops its snapshot
        factors and goes on alone. The caller removes masks and hooks before copying.
        """
        params = dict(teacher.named_parameters())
        if self.teacher_head is not None:
            for name in self.head_parameters:
                params[name].data = self.teacher_head[name]
        for adapter in (m for m in teacher.modules() if isinstance(m, APTLinear)):
            if adapter.teacher_A is not None:
                adapter.lora_A = nn.Parameter(adapter.teacher_A, requires_grad=False)
                adapter.lora_B = nn.Parameter(adapter.teacher_B, requires_grad=False)
                adapter.teacher_A = adapter.teacher_B = None
            adapter.use_teacher = False
        for p in teacher.parameters():
            p.requires_grad_(False)
        teacher.eval()  # a deterministic teacher: no dropout
        for adapter in self.adapters():
            adapter.teacher_A = adapter.teacher_B = None
        self.teacher_model = teacher

    def release_teacher(self) -> None:
        """Drop the separate teacher and its snapshot (distillation is over)."""
        self.teacher_model = None
        self.teacher_head = None

    def adapters(self) -> list[APTLinear]:
        return [m for m in self.model.modules() if isinstance(m, APTLinear)]

    @torch.no_grad()
    def snapshot(self) -> None:
        """Take the student's current adapters and head as the (frozen) teacher."""
        for adapter in self.adapters():
            adapter.snapshot_teacher()
        self.teacher_head = {name: p.detach().clone() for name, p in self.head_parameters.items()}

    @contextmanager
    def teacher_mode(self) -> Iterator[None]:
        """Run the shared model as the teacher: snapshot factors and head, no structural masks, no grad."""
        hooks = attached_hooks(self.model)
        adapters = self.adapters()
        live = {name: p.data for name, p in self.head_parameters.items()}
        was_training = self.model.training
        try:
            if hooks is not None:
                hooks.enabled = False
            for a in adapters:
                a.use_teacher = True
            for name, p in self.head_parameters.items():
                p.data = self.teacher_head[name]
            self.model.eval()  # a deterministic teacher: no dropout
            with torch.no_grad():
                yield
        finally:
            if hooks is not None:
                hooks.enabled = True
            for a in adapters:
                a.use_teacher = False
            for name, p in self.head_parameters.items():
                p.data = live[name]
            self.model.train(was_training)

    def teacher_outputs(self, batch: dict[str, Tensor]):
        inputs = {k: v for k, v in batch.items() if k not in TARGET_KEYS}
        labels = batch.get("labels")
        prepare = getattr(self.model, "prepare_decoder_input_ids_from_labels", None)
        if (
            labels is not None
            and prepare is not None
            and not {"decoder_input_ids", "decoder_inputs_embeds"} & set(batch)
        ):
            # an encoder-decoder builds its decoder inputs from the labels, which the teacher does not get
            inputs["decoder_input_ids"] = prepare(labels=labels)
        if self.teacher_model is not None:
            with torch.no_grad():
                return self.teacher_model(**inputs, output_hidden_states=True)
        with self.teacher_mode():
            return self.model(**inputs, output_hidden_states=True)

    def loss(
        self,
        student_out,
        teacher_out,
        alive: Sequence[bool],
        attention_mask: Tensor | None = None,
        decoder_mask: Tensor | None = None,
    ) -> Tensor:
        """``w_pred * L_pred + w_layer * L_layer`` for one batch.

        ``student_out``/``teacher_out`` are model outputs with hidden states and either ``logits`` or
        ``start_logits``/``end_logits``; ``alive[i]`` says whether layer ``i`` keeps a head and a neuron.
        ``attention_mask`` (the batch's, ``batch x tokens``) excludes padding tokens from the token-level KL
        and from the layer MSE; without it every position counts. For an encoder-decoder output it covers the
        encoder, and ``decoder_mask`` (:func:`target_mask`) the decoder and its logits.
        """
        seq2seq = _is_seq2seq(student_out)
        pred_mask = decoder_mask if seq2seq else attention_mask
        pred = output_prediction_loss(student_out, teacher_out, self.temperature, pred_mask)
        stacks = hidden_stacks(student_out, teacher_out, attention_mask, decoder_mask)
        total, first = None, 0
        for student_hidden, teacher_hidden, mask in stacks:
            n = len(teacher_hidden)
            layers = sample_teacher_layers(n, self.generator)
            pairs = map_layers(
                layers, alive[first : first + n], student_hidden, teacher_hidden, self.transform, mask
            )
            part = layer_loss(pairs, student_hidden, teacher_hidden, self.transform, mask)
            total = part if total is None else total + part
            first += n
        return self.pred_weight * pred + self.layer_weight * (total / len(stacks))

    @torch.no_grad()
    def on_hidden_pruned(self, kept: Tensor, old_size: int) -> None:
        """Slice the transform and the teacher's head snapshot to the kept hidden channels.

        Once the teacher is separate it keeps its channels: only the transform's input (the student's side,
        spec §5.5) is sliced.
        """
        if self.separate:
            self.transform.aptune_slice(in_idx=kept)
            return
        self.transform.aptune_slice(out_idx=kept, in_idx=kept)
        if self.teacher_head is None:
            return
        for name, p in self.head_parameters.items():
            t = self.teacher_head[name]
            for dim in range(t.dim()):
                if t.shape[dim] == old_size and p.shape[dim] == len(kept):
                    t = t.index_select(dim, kept.to(t.device))
            self.teacher_head[name] = t

    def rebind_head(self, head_parameters: dict[str, nn.Parameter]) -> None:
        """Point at the head's live parameters again after compaction replaced them."""
        self.head_parameters = head_parameters

    def parameters(self) -> list[nn.Parameter]:
        return [self.transform.lora_A, self.transform.lora_B]
