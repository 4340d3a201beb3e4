"""Self-distillation that shares the frozen backbone between teacher and student (method spec §7).

The teacher is never a second model. It is the same model run with

* the adapters' frozen snapshot factors (``APTLinear.teacher_A/B``) instead of the live ones,
* a frozen snapshot of the task head's parameters,
* the structural masks switched off, so during a mask-decay window it keeps the blocks the student is losing.

Physical pruning removes blocks from teacher and student alike (they share the weights); the snapshots are
sliced with them. Losses (spec §7.1): ``L = mu * (w_pred * L_pred + w_layer * L_layer) + (1 - mu) * L_task`` with
``L_pred = T^2 KL(teacher || student)`` on the logits and ``L_layer`` the MSE between the transformed student
hidden states and the teacher's, over one teacher layer sampled from each quarter of the stack every step.
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


def prediction_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch."""
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return (t * t) * F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")


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
) -> list[tuple[int, int]]:
    """Pair each teacher layer with a student layer (spec §7.3).

    The same layer when it is alive (it keeps at least one head and one neuron); otherwise the nearer (by MSE)
    of the closest alive layers below and above; no pair when no layer is alive.
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
                float(F.mse_loss(transform(student_hidden[s]).float(), teacher_hidden[t].float()))
                for s in candidates
            ]
        pairs.append((t, candidates[errors.index(min(errors))]))
    return pairs


def layer_loss(
    pairs: Sequence[tuple[int, int]],
    student_hidden: Sequence[Tensor],
    teacher_hidden: Sequence[Tensor],
    transform: nn.Module,
) -> Tensor:
    """Sum over pairs of ``MSE(transform(student[s]), teacher[t])`` (mean reduction inside each pair)."""
    total = student_hidden[0].new_zeros((), dtype=torch.float32)
    for t, s in pairs:
        total = total + F.mse_loss(transform(student_hidden[s]).float(), teacher_hidden[t].float())
    return total


# -- the teacher -----------------------------------------------------------------------------------------


def identity_transform(size: int, rank: int, device=None, dtype=None) -> APTLinear:
    """``Tr``: a frozen identity map plus a trainable low-rank part (identity at initialisation)."""
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
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def has_teacher(self) -> bool:
        return self.teacher_head is not None

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
        with self.teacher_mode():
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            return self.model(**inputs, output_hidden_states=True)

    def loss(self, student_out, teacher_out, alive: Sequence[bool]) -> Tensor:
        """``w_pred * L_pred + w_layer * L_layer`` for one batch."""
        pred = prediction_loss(student_out.logits, teacher_out.logits, self.temperature)
        student_hidden = student_out.hidden_states[1:]  # layer outputs; the embedding output is not compared
        teacher_hidden = teacher_out.hidden_states[1:]
        layers = sample_teacher_layers(len(teacher_hidden), self.generator)
        pairs = map_layers(layers, alive, student_hidden, teacher_hidden, self.transform)
        return self.pred_weight * pred + self.layer_weight * layer_loss(
            pairs, student_hidden, teacher_hidden, self.transform
        )

    @torch.no_grad()
    def on_hidden_pruned(self, kept: Tensor, old_size: int) -> None:
        """Slice the transform and the teacher's head snapshot to the kept hidden channels."""
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
