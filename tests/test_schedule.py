"""Tests for aptune.schedule (spec §5.1, §5.3, §5.6, §6.3, §7.5)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aptune.schedule import (
    R_MAX,
    adapter_budget,
    distill_weight,
    grow_rank_fill,
    grow_rank_paper,
    mask_decay_step,
    mask_decay_tensor,
    pruning_schedule,
)

SST2_EPOCH = 2105
RTE_EPOCH = 78


@pytest.fixture
def sst2():
    return pruning_schedule(200, 3 * SST2_EPOCH, 200 + SST2_EPOCH, 10, 0.4)


@pytest.fixture
def rte():
    return pruning_schedule(200, 24 * RTE_EPOCH, 200 + 4 * RTE_EPOCH, 8, 0.4)


# ---------------------------------------------------------------- §5.6 tables


def test_sst2_table(sst2):
    assert sst2.checkpoints == (811, 1423, 2034, 2646, 3257, 3869, 4480, 5092, 5703, 6315)
    expected = [1, 1, 1, 0.860, 0.666, 0.536, 0.457, 0.417, 0.402, 0.400]
    assert [round(t, 3) for t in sst2.targets] == pytest.approx(expected, abs=1e-9)
    assert sst2.targets[-1] == 0.4


def test_rte_table(rte):
    assert rte.checkpoints == (409, 618, 827, 1036, 1245, 1454, 1663, 1872)
    expected = [1, 0.870, 0.672, 0.539, 0.459, 0.417, 0.402, 0.400]
    assert [round(t, 3) for t in rte.targets] == pytest.approx(expected, abs=1e-9)
    assert rte.targets[-1] == 0.4


def test_targets_monotone_and_bounded(sst2, rte):
    for s in (sst2, rte):
        assert all(a >= b for a, b in zip(s.targets, s.targets[1:], strict=False))
        assert all(s.target_density <= t <= 1.0 for t in s.targets)
        assert s.targets[-1] == s.target_density


def test_target_at_piecewise_constant(sst2):
    assert sst2.target_at(0) == 1.0
    assert sst2.target_at(199) == 1.0
    assert sst2.target_at(200) == sst2.targets[0]
    assert sst2.target_at(2646) == sst2.targets[3]  # at the checkpoint: its own target
    assert sst2.target_at(2035) == sst2.targets[3]  # interval ending at t_k aims at rho(t_k)
    assert sst2.target_at(2647) == sst2.targets[4]
    assert sst2.target_at(6315) == 0.4
    assert sst2.target_at(6316) == 0.4
    assert sst2.target_at(84_200) == 0.4


def test_is_checkpoint(sst2):
    assert all(sst2.is_checkpoint(t) for t in sst2.checkpoints)
    assert [sst2.checkpoint_index(t) for t in sst2.checkpoints] == list(range(10))
    assert not sst2.is_checkpoint(200)
    assert not sst2.is_checkpoint(812)
    assert sst2.checkpoint_index(6316) is None


# ---------------------------------------------------------------- §5.3 decay windows


def test_decay_windows_end_one_step_before_checkpoints(sst2, rte):
    for s in (sst2, rte):
        for (first, last), t in zip(s.windows, s.checkpoints, strict=True):
            assert last == t - 1
            assert last - first + 1 == 200
            state = s.decay_window(t - 1)
            assert state.inside and state.is_last
            assert not s.decay_window(t - 2).is_last
            assert s.decay_window(t - 200).inside
            assert not s.decay_window(t - 201).inside
            assert not s.decay_window(t).inside  # the checkpoint step itself is outside (intervals > 200)


def test_decay_window_details(sst2):
    assert sst2.windows[0] == (611, 810)
    assert sst2.windows[3] == (2446, 2645)  # spec §1: 200-step decay toward 0.86 begins at 2446
    state = sst2.decay_window(2500)
    assert state.inside and not state.is_last and state.checkpoint == 3
    assert state.target == pytest.approx(0.860, abs=5e-4) and state.active
    warm = sst2.decay_window(700)
    assert warm.inside and warm.checkpoint == 0 and warm.target == 1.0 and not warm.active
    after = sst2.decay_window(6315)
    assert not after.inside and after.checkpoint is None and after.target == 0.4
    assert not sst2.decay_window(100).inside


def test_first_window_can_open_at_start():
    s = pruning_schedule(200, 6315, 2305, 10, 0.4, first_window_from_start=True)
    assert s.windows[0] == (200, 810)
    assert s.windows[1:] == pruning_schedule(200, 6315, 2305, 10, 0.4).windows[1:]
    # A short first interval: the default window is clipped at start_step.
    short = pruning_schedule(0, 500, 0, 2, 0.5)
    assert short.windows == ((50, 249), (300, 499))
    tight = pruning_schedule(100, 300, 100, 1, 0.5, decay_window=200)
    assert tight.windows == ((100, 299),)


def test_interval_equal_to_window_is_allowed():
    s = pruning_schedule(0, 400, 0, 2, 0.5, decay_window=200)
    assert s.checkpoints == (200, 400)
    assert s.windows == ((0, 199), (200, 399))
    assert s.is_checkpoint(200) and s.decay_window(200).checkpoint == 1


def test_no_warmup_first_target_below_one():
    s = pruning_schedule(0, 1000, 0, 4, 0.5, decay_window=100)
    assert s.checkpoints == (250, 500, 750, 1000)
    assert s.targets[0] == pytest.approx(0.5 + 0.5 * 0.75**3)
    assert s.targets[-1] == 0.5


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_density": 0.0}, "target_density"),
        ({"target_density": 1.5}, "target_density"),
        ({"target_density": -0.1}, "target_density"),
        ({"end_step": 200}, "end_step"),
        ({"end_step": 100}, "end_step"),
        ({"start_step": -1, "warmup_end_step": 0}, "start_step"),
        ({"warmup_end_step": 199}, "warmup_end_step"),
        ({"warmup_end_step": 6315}, "warmup_end_step"),
        ({"num_checkpoints": 0}, "num_checkpoints"),
        ({"num_checkpoints": 40}, "shorter than decay_window"),
        ({"decay_window": 0}, "decay_window"),
        ({"decay_window": 700}, "shorter than decay_window"),
    ],
)
def test_validation(kwargs, match):
    args = {
        "start_step": 200,
        "end_step": 6315,
        "warmup_end_step": 2305,
        "num_checkpoints": 10,
        "target_density": 0.4,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        pruning_schedule(**args)


def test_validation_types():
    with pytest.raises(TypeError, match="end_step"):
        pruning_schedule(200, 6315.0, 2305, 10, 0.4)
    with pytest.raises(TypeError, match="num_checkpoints"):
        pruning_schedule(200, 6315, 2305, True, 0.4)


def test_target_density_one_keeps_everything():
    s = pruning_schedule(0, 1000, 0, 5, 1.0)
    assert s.targets == (1.0,) * 5
    assert not any(s.decay_window(t).active for t in range(0, 1100))


@st.composite
def schedules(draw):
    start = draw(st.integers(0, 500))
    k = draw(st.integers(1, 12))
    window = draw(st.integers(1, 50))
    end = start + k * window + draw(st.integers(0, 400))
    warmup = draw(st.integers(start, end - 1))
    rho = draw(st.floats(0.01, 1.0))
    return pruning_schedule(start, end, warmup, k, rho, decay_window=window)


@settings(max_examples=60, deadline=None)
@given(schedules())
def test_random_schedules(s):
    rho = s.target_density
    assert len(s.checkpoints) == s.num_checkpoints
    assert s.checkpoints[-1] == s.end_step
    assert all(a < b for a, b in zip(s.checkpoints, s.checkpoints[1:], strict=False))
    assert all(a >= b for a, b in zip(s.targets, s.targets[1:], strict=False))
    assert all(rho <= t <= 1.0 for t in s.targets)
    assert s.targets[-1] == rho
    # Targets equal the formula and are 1 at checkpoints inside the warm-up.
    for t, target in zip(s.checkpoints, s.targets, strict=True):
        if t <= s.warmup_end_step:
            assert target == 1.0
    # Brute force over all steps: target_at and decay_window agree with the windows/targets.
    for step in range(max(0, s.start_step - 3), s.end_step + 3):
        nxt = next((i for i, t in enumerate(s.checkpoints) if t >= step), None)
        expected = 1.0 if step < s.start_step else (rho if nxt is None else s.targets[nxt])
        assert s.target_at(step) == expected
        state = s.decay_window(step)
        inside = [i for i, (a, b) in enumerate(s.windows) if a <= step <= b]
        assert state.inside == bool(inside)
        assert state.checkpoint == (inside[0] if inside else None)
        assert state.is_last == (state.inside and step + 1 == s.checkpoints[state.checkpoint])
    for i, (first, last) in enumerate(s.windows):
        assert last == s.checkpoints[i] - 1
        assert first >= s.start_step
        assert last - first + 1 == s.decay_steps or (i == 0 and first == s.start_step)


# ---------------------------------------------------------------- §5.3 mask decay


def test_mask_decay_step():
    assert mask_decay_step(1.0, keep=True) == 1.0
    assert mask_decay_step(0.5, keep=True) == pytest.approx(0.51)
    assert mask_decay_step(0.995, keep=True) == 1.0
    assert mask_decay_step(0.5, keep=False) == pytest.approx(0.49)
    assert mask_decay_step(0.005, keep=False) == 0.0
    assert mask_decay_step(0.0, keep=False) == 0.0
    assert mask_decay_step(0.37, keep=True, last=True) == 1.0
    assert mask_decay_step(0.37, keep=False, last=True) == 0.0
    assert mask_decay_step(0.5, keep=False, step_size=0.25) == 0.25
    with pytest.raises(ValueError, match="step_size"):
        mask_decay_step(0.5, True, step_size=0.0)


def test_drop_takes_100_steps():
    z = 1.0
    for _ in range(99):
        z = mask_decay_step(z, keep=False)
    assert 0.0 < z < 0.02
    assert mask_decay_step(z, keep=False) == 0.0


def test_mask_decay_tensor():
    mask = torch.tensor([1.0, 0.5, 0.005, 0.995, 0.0])
    keep = torch.tensor([True, False, False, True, True])
    out = mask_decay_tensor(mask, keep)
    assert torch.allclose(out, torch.tensor([1.0, 0.49, 0.0, 1.0, 0.01]))
    assert out.dtype == mask.dtype and mask[1] == 0.5  # input untouched
    hard = mask_decay_tensor(mask, keep, last=True)
    assert torch.equal(hard, torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0]))
    for z, k, o in zip(mask.tolist(), keep.tolist(), out.tolist(), strict=True):
        assert o == pytest.approx(mask_decay_step(z, k))
    m2 = torch.full((2, 3), 0.5, dtype=torch.float64)
    out2 = mask_decay_tensor(m2, torch.tensor([True, False, True]))
    assert out2.shape == (2, 3) and out2.dtype == torch.float64
    with pytest.raises(ValueError, match="bool"):
        mask_decay_tensor(mask, torch.ones(5))
    with pytest.raises(ValueError, match="step_size"):
        mask_decay_tensor(mask, keep, step_size=-0.01)


# ---------------------------------------------------------------- §6.3 budget and ranks


def test_budget_ratios_exact():
    ratios = [adapter_budget(t, 0, 1000, 100.0) / 100.0 for t in range(100, 1001, 100)]
    assert ratios == pytest.approx([1.3, 1.6, 1.9, 2.2, 2.5, 2.8, 3.1, 3.4, 3.7, 4.0])


def test_budget_sst2(sst2):
    delta0 = 12 * 8 * (1536 + 1536 + 3840)
    assert delta0 == 663_552
    ratios = [b / delta0 for b in sst2.budgets(delta0)]
    assert ratios == pytest.approx([1.3 + 0.3 * i for i in range(10)], abs=1e-3)  # int-truncated t_k
    assert ratios[-1] == 4.0


def test_budget_clamped_and_validated():
    assert adapter_budget(-5, 200, 6315, 10.0) == 10.0
    assert adapter_budget(200, 200, 6315, 10.0) == 10.0
    assert adapter_budget(10**6, 200, 6315, 10.0) == 40.0
    assert adapter_budget(500, 0, 1000, 10.0, expansion=1.0) == 10.0
    with pytest.raises(ValueError, match="end"):
        adapter_budget(0, 10, 10, 1.0)
    with pytest.raises(ValueError, match="initial_params"):
        adapter_budget(0, 0, 10, 0)
    with pytest.raises(ValueError, match="expansion"):
        adapter_budget(0, 0, 10, 1.0, expansion=0.5)


def test_grow_rank_paper():
    assert grow_rank_paper(8, 100, 130) == 10  # floor(10.4)
    assert grow_rank_paper(8, 100, 200) == 16
    assert grow_rank_paper(10, 130, 160) == 12  # floor(12.307...)
    assert grow_rank_paper(8, 100, 100) == 8
    assert grow_rank_paper(8, 100, 50) == 8  # never shrinks
    with pytest.raises(ValueError, match="budgets"):
        grow_rank_paper(8, 0, 100)
    with pytest.raises(ValueError, match="rank"):
        grow_rank_paper(0, 100, 200)


def test_grow_rank_fill():
    # Budget exceeds the current count by exactly what the selected adapters hold: ranks double.
    assert grow_rank_fill(8, budget=2000, params_now=1000, params_selected=1000) == 16
    assert grow_rank_fill(8, budget=1300, params_now=1000, params_selected=500) == 12  # 8 * 1.6 = 12.8
    assert grow_rank_fill(8, budget=1000, params_now=1000, params_selected=500) == 8
    assert grow_rank_fill(8, budget=900, params_now=1000, params_selected=500) == 8  # never below r
    assert grow_rank_fill(40, budget=10_000, params_now=1000, params_selected=500) == R_MAX  # cap
    assert grow_rank_fill(8, budget=10_000, params_now=1000, params_selected=500, r_max=20) == 20
    assert grow_rank_fill(80, budget=10_000, params_now=1000, params_selected=500) == 80  # above cap: keep
    # Exact arithmetic: 3 * (1 + 1/3) is exactly 4, not 3.999...
    assert grow_rank_fill(3, budget=4, params_now=3, params_selected=3) == 4
    with pytest.raises(ValueError, match="params_selected"):
        grow_rank_fill(8, 100, 50, 0)
    with pytest.raises(ValueError, match="r_max"):
        grow_rank_fill(8, 100, 50, 10, r_max=0)


def test_fill_rule_meets_budget():
    """Top half grows, the rest keeps r: the resulting count is within one rank-row of the budget."""
    row = 1536 + 1536  # params per rank of a query adapter (in + out)
    ranks = [8] * 12
    params_now = sum(r * row for r in ranks)
    budget = 1.6 * params_now
    selected = list(range(6))
    p_sel = sum(ranks[i] * row for i in selected)
    new = [grow_rank_fill(r, budget, params_now, p_sel) if i in selected else r for i, r in enumerate(ranks)]
    total = sum(r * row for r in new)
    assert total <= budget < total + len(selected) * row
    assert math.floor(8 * 1.6) < new[0]  # the paper's rule would undershoot (12 vs 17)


# ---------------------------------------------------------------- §7.5 distillation weight


def test_distill_weight():
    assert distill_weight(0, 200, 6315) == 0.0
    assert distill_weight(200, 200, 6315) == 0.0
    assert distill_weight(6315, 200, 6315) == 1.0
    assert distill_weight(45_358, 200, 6315) == 1.0
    assert distill_weight(3258, 200, 6315) == pytest.approx(0.50, abs=0.01)  # spec §7.5: mu ≈ 0.50
    values = [distill_weight(t, 200, 6315) for t in range(0, 7000, 7)]
    assert all(a <= b for a, b in zip(values, values[1:], strict=False))
    with pytest.raises(ValueError, match="end"):
        distill_weight(0, 5, 5)
