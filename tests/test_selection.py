"""Block selection meets the budget exactly, with aligned widths and a bounded slack (method spec §5.2)."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aptune.budget import AttentionShape, FFNShape, StructureShape, count_prunable, head_cost
from aptune.selection import select_blocks


def bert_shape(layers: int, hidden: int, heads: int, head_dim: int, ffn: int) -> StructureShape:
    return StructureShape(
        hidden,
        tuple(AttentionShape(heads, heads, head_dim) for _ in range(layers)),
        tuple(FFNShape(ffn) for _ in range(layers)),
    )


def random_scores(shape: StructureShape, seed: int = 0, levels: int = 0):
    """Uniform scores; with ``levels`` > 0, rounded to that many values (many ties, some zeros)."""
    g = torch.Generator().manual_seed(seed)

    def draw(n: int) -> torch.Tensor:
        s = torch.rand(n, generator=g, dtype=torch.float64)
        return (s * levels).floor() if levels else s

    return [draw(h) for h in shape.heads], [draw(n) for n in shape.neurons], draw(shape.hidden)


def allowed(k: int, full: int, multiple: int) -> bool:
    return k in (0, full) or k % multiple == 0


def next_count(k: int, full: int, multiple: int) -> int:
    return min(k + multiple, full)


def bumped_counts(shape: StructureShape, sel, ffn_multiple: int, head_multiple: int, hidden_multiple: int):
    """For every site (and the hidden channels) not kept in full: the count of the next aligned selection."""
    kept = sel.shape
    out = []
    for i, a in enumerate(shape.attention):
        k = kept.attention[i].heads
        if k < a.heads:
            h = next_count(k, a.heads, head_multiple)
            att = list(kept.attention)
            att[i] = replace(att[i], heads=h, kv_heads=h)
            out.append(count_prunable(replace(kept, attention=tuple(att))))
    for i, f in enumerate(shape.ffn):
        k = kept.ffn[i].neurons
        if k < f.neurons:
            ffn = list(kept.ffn)
            ffn[i] = replace(ffn[i], neurons=next_count(k, f.neurons, ffn_multiple))
            out.append(count_prunable(replace(kept, ffn=tuple(ffn))))
    if kept.hidden < shape.hidden:
        out.append(
            count_prunable(replace(kept, hidden=next_count(kept.hidden, shape.hidden, hidden_multiple)))
        )
    return out


def check_selection(shape, scores, sel, target, ffn_multiple=64, head_multiple=1, hidden_multiple=1):
    heads, neurons, hidden = scores
    # flags agree with the reported shape, and the count is exact and within budget
    assert [int(f.sum()) for f in sel.heads] == list(sel.shape.heads)
    assert [int(f.sum()) for f in sel.neurons] == list(sel.shape.neurons)
    assert int(sel.hidden.sum()) == sel.shape.hidden >= 1
    assert sel.params == count_prunable(sel.shape) <= target
    # aligned counts
    for k, full in zip(sel.shape.neurons, shape.neurons, strict=True):
        assert allowed(k, full, ffn_multiple)
    for k, full in zip(sel.shape.heads, shape.heads, strict=True):
        assert allowed(k, full, head_multiple)
    assert allowed(sel.shape.hidden, shape.hidden, hidden_multiple)
    # within a site, the kept blocks are the best-scoring ones
    for flags, s in [
        *zip(sel.heads, heads, strict=True),
        *zip(sel.neurons, neurons, strict=True),
        (sel.hidden, hidden),
    ]:
        if flags.any() and (~flags).any():
            assert s[flags].min() >= s[~flags].max()
    # slack: every next aligned group would break the budget, so the slack is below each group's cost
    bumped = bumped_counts(shape, sel, ffn_multiple, head_multiple, hidden_multiple)
    assert all(c > target for c in bumped)
    if bumped:
        assert target - sel.params < max(c - sel.params for c in bumped)
    else:
        assert sel.params == count_prunable(shape)


@st.composite
def shapes(draw):
    hidden = draw(st.integers(1, 40))
    attention = tuple(
        AttentionShape(
            h := draw(st.integers(0, 6)),
            h,
            draw(st.integers(1, 12)),
            qkv_bias=draw(st.booleans()),
            o_bias=draw(st.booleans()),
            norm_params_per_channel=draw(st.sampled_from([1, 2])),
        )
        for _ in range(draw(st.integers(0, 4)))
    )
    ffn = tuple(
        FFNShape(
            draw(st.integers(0, 150)),
            gated=draw(st.booleans()),
            in_bias=draw(st.booleans()),
            down_bias=draw(st.booleans()),
            norm_params_per_channel=draw(st.sampled_from([1, 2])),
        )
        for _ in range(draw(st.integers(0, 4)))
    )
    return StructureShape(hidden, attention, ffn)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=shapes(),
    seed=st.integers(0, 1000),
    fraction=st.floats(0.0, 1.2),
    ffn_multiple=st.integers(1, 70),
    head_multiple=st.integers(1, 3),
    hidden_multiple=st.integers(1, 4),
    prune_hidden=st.booleans(),
    levels=st.sampled_from([0, 0, 3]),
)
def test_budget_alignment_and_slack_on_random_shapes(
    shape, seed, fraction, ffn_multiple, head_multiple, hidden_multiple, prune_hidden, levels
):
    scores = random_scores(shape, seed, levels)
    target = max(1, int(fraction * count_prunable(shape)))
    sel = select_blocks(
        shape, *scores, target, ffn_multiple, head_multiple, prune_hidden, hidden_multiple=hidden_multiple
    )
    check_selection(shape, scores, sel, target, ffn_multiple, head_multiple, hidden_multiple)
    if not prune_hidden:
        assert bool(sel.hidden.all())


def test_full_target_keeps_everything_even_unaligned_widths():
    shape = StructureShape(
        24, (AttentionShape(3, 3, 8), AttentionShape(2, 2, 8)), (FFNShape(100), FFNShape(64), FFNShape(30))
    )
    scores = random_scores(shape, 3)
    full = count_prunable(shape)
    for target in (full, full + 1000):
        sel = select_blocks(shape, *scores, target)
        assert sel.params == full
        assert all(bool(f.all()) for f in [*sel.heads, *sel.neurons, sel.hidden])


def test_clearly_worst_heads_are_dropped_first():
    shape = bert_shape(3, 32, 4, 8, 128)
    heads, neurons, hidden = random_scores(shape, 5)
    heads = [h + 1.0 for h in heads]
    heads[0][2] = 0.0
    heads[2][1] = 0.0
    neurons = [n + 100.0 for n in neurons]  # neurons and hidden channels clearly beat every head
    hidden = hidden + 100.0
    cost = head_cost(shape, 0)
    assert cost == 4 * 32 * 8 + 3 * 8
    target = count_prunable(shape) - 2 * cost
    sel = select_blocks(shape, heads, neurons, hidden, target, ffn_multiple=64)
    assert sel.params == target
    assert [f.tolist() for f in sel.heads] == [
        [True, True, False, True],
        [True, True, True, True],
        [True, False, True, True],
    ]
    assert all(bool(f.all()) for f in [*sel.neurons, sel.hidden])
    # one parameter less: the next-worst head goes too, and nothing else
    sel = select_blocks(shape, heads, neurons, hidden, target - 1, ffn_multiple=64)
    assert sel.params == target - cost
    third = min(((h[h > 0].min().item(), i) for i, h in enumerate(heads)))
    dropped = {(i, j) for i, f in enumerate(sel.heads) for j in range(4) if not f[j]}
    site = third[1]
    assert dropped == {(0, 2), (2, 1), (site, int((heads[site] == third[0]).nonzero()))}
    check_selection(shape, (heads, neurons, hidden), sel, target - 1)


def test_worthless_ffn_is_dropped_whole():
    shape = bert_shape(2, 16, 2, 8, 128)
    heads, neurons, hidden = random_scores(shape, 7)
    neurons[1] = torch.zeros(128, dtype=torch.float64)
    target = count_prunable(shape) - 128 * (2 * 16 + 1) - 16 - 2 * 16  # minus the whole FFN sublayer 1
    sel = select_blocks(shape, heads, neurons, hidden, target)
    assert sel.shape.neurons == (128, 0) and sel.params == target


def test_bert_base_at_density_0_4_is_aligned_and_fast():
    shape = bert_shape(12, 768, 12, 64, 3072)
    full = count_prunable(shape)
    assert full == 85_054_464
    scores = random_scores(shape, 11)
    target = int(0.4 * full)
    start = time.perf_counter()
    sel = select_blocks(shape, *scores, target)
    elapsed = time.perf_counter() - start
    check_selection(shape, scores, sel, target)
    assert all(n % 64 == 0 for n in sel.shape.neurons)
    assert sel.params <= 0.4 * full
    # the slack is below one 64-neuron group (64 * (2D + 1) = 98,368) or one head or one hidden channel
    assert target - sel.params < 196_800
    assert elapsed < 5.0


def test_prune_hidden_false_keeps_all_channels():
    shape = bert_shape(4, 48, 4, 12, 256)
    scores = random_scores(shape, 2)
    target = int(0.5 * count_prunable(shape))
    sel = select_blocks(shape, *scores, target, prune_hidden=False)
    assert bool(sel.hidden.all()) and sel.shape.hidden == 48
    check_selection(shape, scores, sel, target)


def test_invalid_inputs_raise_clear_errors():
    shape = bert_shape(2, 16, 2, 8, 64)
    heads, neurons, hidden = random_scores(shape)
    target = count_prunable(shape) // 2
    with pytest.raises(ValueError, match="head_scores\\[1\\] has 3 entries"):
        select_blocks(shape, [heads[0], torch.rand(3)], neurons, hidden, target)
    with pytest.raises(ValueError, match="score tensors"):
        select_blocks(shape, heads[:1], neurons, hidden, target)
    with pytest.raises(ValueError, match="hidden_scores has 15 entries"):
        select_blocks(shape, heads, neurons, hidden[:15], target)
    with pytest.raises(ValueError, match="non-negative"):
        select_blocks(shape, heads, [neurons[0], -neurons[1]], hidden, target)
    with pytest.raises(ValueError, match="non-negative"):
        select_blocks(shape, heads, neurons, torch.full((16,), float("nan")), target)
    with pytest.raises(ValueError, match="target_params must be positive"):
        select_blocks(shape, heads, neurons, hidden, 0)
    with pytest.raises(ValueError, match="must be >= 1, got 0, 1, 1"):
        select_blocks(shape, heads, neurons, hidden, target, ffn_multiple=0)
    with pytest.raises(ValueError, match="must be >= 1, got 64, 0, 1"):
        select_blocks(shape, heads, neurons, hidden, target, head_multiple=0)
