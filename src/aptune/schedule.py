"""Step schedules of APT: density targets, mask-decay windows, adapter budget, rank growth, distillation weight.

Everything here is a pure function of the training step (the optimizer-step counter the trainer uses for
``global_step``); only :func:`mask_decay_tensor` touches torch. Section numbers refer to the APT specification
(``apt-method.md``).

* Density schedule (§5.1, §11.7): ``K`` checkpoints ``t_k = int(linspace(t_s, t_e, K+1))[1:]``; the target at
  ``t_k`` is ``min(1, rho_T + (1 - rho_T) * ((t_e - t_k) / (t_e - t_w)) ** 3)``, cubic in *density* with a
  warm-up that ends at ``t_w``. After a one-shot prune to ``rho_0`` before training (the decoder recipe, §5.7)
  the schedule runs from ``rho_0`` instead of 1. Between checkpoints the target is piecewise constant.
* Mask decay (§5.3): masks move by 0.01 per step inside a window of ``decay_window`` steps before each
  checkpoint and are hard-set to 0/1 on the last step of the window (the step just before ``t_k``).
* Adapter budget (§6.3): linear from ``Delta_0`` at ``t_s`` to ``expansion * Delta_0`` at ``t_e``.
* Rank growth (§6.3, §11.5): the library defaults to :func:`grow_rank_fill` (the released code's rule), see there.
* Distillation weight (§7.5, §11.10): ``mu_t`` linear over the pruning window.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from fractions import Fraction

import torch

R_MAX = 64
DEFAULT_DECAY_WINDOW = 200
DEFAULT_MASK_STEP = 0.01


def _require_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")


@dataclass(frozen=True)
class DecayWindow:
    """Where a step stands relative to the mask-decay windows.

    ``inside``: the step lies in the decay window of checkpoint ``checkpoint`` (0-based index).
    ``is_last``: the step is the last one of that window (``t_k - 1``), where masks are hard-set to 0/1.
    ``target``: what the masks move toward inside a window (its checkpoint's target), else the density target
    in force at the step.
    """

    inside: bool
    is_last: bool
    checkpoint: int | None
    target: float

    @property
    def active(self) -> bool:
        """True when masks should actually move: inside a window whose target is below 1 (§5.3)."""
        return self.inside and self.target < 1.0


@dataclass(frozen=True)
class PruningSchedule:
    """Checkpoints, density targets and decay windows of APT's gradual pruning (§5.1, §5.3, §5.6).

    Arguments are validated at construction. ``checkpoints``, ``targets`` and ``windows`` (inclusive
    ``(first_step, last_step)`` of each decay window, ``last_step == t_k - 1``) are derived.
    ``decay_steps`` is the length of a mask-decay window (``decay_window`` in :func:`pruning_schedule`).
    ``first_window_from_start=False`` makes every window ``decay_steps`` long, the first one opening at
    ``max(start_step, t_1 - decay_steps)``. The released code instead opens the first window at ``t_s``
    (§5.3); pass ``True`` to get that. The two differ only when the first target is below 1 (no warm-up).
    """

    start_step: int
    end_step: int
    warmup_end_step: int
    num_checkpoints: int
    target_density: float
    decay_steps: int = DEFAULT_DECAY_WINDOW
    first_window_from_start: bool = False
    initial_density: float = 1.0  # the density before the first checkpoint (below 1 after a one-shot prune)
    checkpoints: tuple[int, ...] = field(init=False)
    targets: tuple[float, ...] = field(init=False)
    windows: tuple[tuple[int, int], ...] = field(init=False)

    def __post_init__(self) -> None:
        for name in ("start_step", "end_step", "warmup_end_step", "num_checkpoints", "decay_steps"):
            _require_int(name, getattr(self, name))
        rho, t_s, t_e, t_w, k = (
            self.target_density,
            self.start_step,
            self.end_step,
            self.warmup_end_step,
            self.num_checkpoints,
        )
        if not 0.0 < rho <= 1.0:
            raise ValueError(f"target_density must be in (0, 1], got {rho}")
        if t_s < 0:
            raise ValueError(f"start_step must be >= 0, got {t_s}")
        if t_e <= t_s:
            raise ValueError(f"end_step ({t_e}) must be greater than start_step ({t_s})")
        if not t_s <= t_w < t_e:
            raise ValueError(f"warmup_end_step ({t_w}) must lie in [start_step, end_step) = [{t_s}, {t_e})")
        if k < 1:
            raise ValueError(f"num_checkpoints must be >= 1, got {k}")
        rho0 = self.initial_density
        if not rho <= rho0 <= 1.0:
            raise ValueError(f"initial_density must be in [target_density, 1] = [{rho}, 1], got {rho0}")
        if self.decay_steps < 1:
            raise ValueError(f"decay_window (decay_steps) must be >= 1, got {self.decay_steps}")
        # Exact int-truncated linspace(t_s, t_e, K+1)[1:] (floor == truncation for non-negative values).
        steps = tuple(t_s + (i * (t_e - t_s)) // k for i in range(1, k + 1))
        previous = t_s
        for i, t in enumerate(steps):
            if t - previous < self.decay_steps:
                raise ValueError(
                    f"interval {i + 1} ({previous} -> {t}) is {t - previous} steps, shorter than decay_window "
                    f"({self.decay_steps}); use fewer checkpoints, a longer window or a shorter decay_window"
                )
            previous = t
        targets = tuple(min(rho0, rho + (rho0 - rho) * ((t_e - t) / (t_e - t_w)) ** 3) for t in steps)
        windows = tuple((t - self.decay_steps, t - 1) for t in steps)
        first_open = t_s if self.first_window_from_start else max(t_s, steps[0] - self.decay_steps)
        windows = ((first_open, steps[0] - 1),) + windows[1:]
        object.__setattr__(self, "checkpoints", steps)
        object.__setattr__(self, "targets", targets)
        object.__setattr__(self, "windows", windows)

    def checkpoint_index(self, step: int) -> int | None:
        """0-based index of the checkpoint at ``step``, or None if ``step`` is not a checkpoint."""
        i = bisect_left(self.checkpoints, step)
        return i if i < len(self.checkpoints) and self.checkpoints[i] == step else None

    def is_checkpoint(self, step: int) -> bool:
        """Whether ``step`` is one of the pruning checkpoints ``t_k``."""
        return self.checkpoint_index(step) is not None

    def target_at(self, step: int) -> float:
        """Density target in force at ``step``: ``initial_density`` before ``start_step``, then the target of the next checkpoint
        at or after ``step``, and ``target_density`` after the last checkpoint."""
        if step < self.start_step:
            return self.initial_density
        i = bisect_left(self.checkpoints, step)
        return self.targets[i] if i < len(self.targets) else self.target_density

    def decay_window(self, step: int) -> DecayWindow:
        """Whether ``step`` is inside the decay window of the next checkpoint after it, and whether it is the
        window's last step (``t_k - 1``)."""
        i = bisect_right(self.checkpoints, step)  # first checkpoint strictly after step
        if i < len(self.windows):
            first, last = self.windows[i]
            if first <= step <= last:
                # the masks move toward this window's checkpoint, also on a step that is itself the previous
                # checkpoint (a window may open there)
                return DecayWindow(inside=True, is_last=step == last, checkpoint=i, target=self.targets[i])
        return DecayWindow(inside=False, is_last=False, checkpoint=None, target=self.target_at(step))

    def budgets(self, initial_params: float, expansion: float = 4.0) -> tuple[float, ...]:
        """Adapter budget ``Delta(t_k)`` at every checkpoint (§6.3)."""
        return tuple(
            adapter_budget(t, self.start_step, self.end_step, initial_params, expansion)
            for t in self.checkpoints
        )


def pruning_schedule(
    start_step: int,
    end_step: int,
    warmup_end_step: int,
    num_checkpoints: int,
    target_density: float,
    decay_window: int = DEFAULT_DECAY_WINDOW,
    *,
    first_window_from_start: bool = False,
    initial_density: float = 1.0,
) -> PruningSchedule:
    """Build and validate a :class:`PruningSchedule` (raises ValueError/TypeError on bad arguments)."""
    return PruningSchedule(
        start_step,
        end_step,
        warmup_end_step,
        num_checkpoints,
        target_density,
        decay_window,
        first_window_from_start,
        initial_density,
    )


def mask_decay_step(
    mask_value: float, keep: bool, step_size: float = DEFAULT_MASK_STEP, last: bool = False
) -> float:
    """One mask-decay update (§5.3): keep -> ``min(1, z + step)``, drop -> ``max(0, z - step)``.
    With ``last=True`` (last step of a window) the mask is hard-set to exactly 1.0 or 0.0."""
    if step_size <= 0:
        raise ValueError(f"step_size must be > 0, got {step_size}")
    if last:
        return 1.0 if keep else 0.0
    return min(1.0, mask_value + step_size) if keep else max(0.0, mask_value - step_size)


def mask_decay_tensor(
    mask: torch.Tensor, keep: torch.Tensor, step_size: float = DEFAULT_MASK_STEP, last: bool = False
) -> torch.Tensor:
    """Vectorised :func:`mask_decay_step`: returns a new tensor (same dtype/device); ``keep`` is a bool tensor
    broadcastable to ``mask``."""
    if step_size <= 0:
        raise ValueError(f"step_size must be > 0, got {step_size}")
    if keep.dtype != torch.bool:
        raise ValueError(f"keep must be a bool tensor, got dtype {keep.dtype}")
    if last:
        return torch.where(keep, torch.ones_like(mask), torch.zeros_like(mask))
    return torch.where(keep, (mask + step_size).clamp(max=1.0), (mask - step_size).clamp(min=0.0))


def adapter_budget(step: int, start: int, end: int, initial_params: float, expansion: float = 4.0) -> float:
    """Trainable-parameter budget ``Delta_t`` (§6.3): linear from ``initial_params`` at ``start`` to
    ``expansion * initial_params`` at ``end``, constant outside ``[start, end]``."""
    if end <= start:
        raise ValueError(f"end ({end}) must be greater than start ({start})")
    if initial_params <= 0:
        raise ValueError(f"initial_params must be > 0, got {initial_params}")
    if expansion < 1.0:
        raise ValueError(f"expansion must be >= 1 (the budget never shrinks), got {expansion}")
    frac = min(1.0, max(0.0, (step - start) / (end - start)))
    return initial_params * (1.0 + (expansion - 1.0) * frac)


def grow_rank_paper(rank: int, old_budget: float, new_budget: float) -> int:
    """Paper rule (§6.3): ``r' = floor(r * Delta_new / Delta_old)``; never below ``rank``.
    Not the library default, see :func:`grow_rank_fill`."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if old_budget <= 0 or new_budget <= 0:
        raise ValueError(f"budgets must be > 0, got old={old_budget}, new={new_budget}")
    return max(rank, math.floor(rank * Fraction(new_budget) / Fraction(old_budget)))


def grow_rank_fill(
    rank: int, budget: float, params_now: float, params_selected: float, r_max: int = R_MAX
) -> int:
    """Fill-the-budget rule (code, §6.3, §11.5), the library default.

    ``r' = int(r * (1 + (budget - params_now) / params_selected))``, capped at ``r_max`` and never below ``r``.
    ``params_now`` is the adapter parameter count after the current pruning, ``params_selected`` the part held
    by the adapters chosen to grow (top half by importance). APT's intent is to grow the top-half adapters so
    that the trainable-parameter budget is met; the paper's ratio rule (:func:`grow_rank_paper`) ignores the
    parameters that pruning freed, so it undershoots the budget. This rule fills it, which is why the library
    uses it. Computed exactly (Fraction) so integer inputs have no rounding error.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if params_selected <= 0:
        raise ValueError(f"params_selected must be > 0, got {params_selected}")
    if r_max < 1:
        raise ValueError(f"r_max must be >= 1, got {r_max}")
    grown = math.floor(rank * (1 + (Fraction(budget) - Fraction(params_now)) / Fraction(params_selected)))
    return max(rank, min(r_max, grown))


def distill_weight(step: int, start: int, end: int) -> float:
    """Distillation weight ``mu_t = min(1, max(0, (t - t_s) / (t_e - t_s)))`` over the pruning window (§7.5)."""
    if end <= start:
        raise ValueError(f"end ({end}) must be greater than start ({start})")
    return min(1.0, max(0.0, (step - start) / (end - start)))
