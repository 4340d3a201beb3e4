"""Tests that catch wrong math (issue 11): the algorithm's choices are the right ones, not only well formed.

Each test plants known values (importance, salience, losses, validation metrics, masks) where the controller
reads them, and checks the one outcome the method spec allows (apt-method.md §4.2, §5.2, §6.2, §7). Each one
fails when the behaviour it names is broken: the docstrings say how. The state round trip is checked against an
independent uninterrupted run. The teacher-layer sampler is part of the saved state (a resumed distillation run
compares the same layers). One gap is a strict xfail until the resume issue (13) lands: the separate teacher of
the last distillation phase is not in the saved state.
"""

from __future__ import annotations

import io
import math
from dataclasses import replace

import pytest
import torch
from conftest import tiny_model
from test_controller import SMALL_SCHEDULE, synthetic_batches
from test_distill import kl_rows, make

import aptune
from aptune.adapter import APTLinear
from aptune.compact import compact, masks_for_shape
from aptune.controller import APTController
from aptune.distill import prediction_loss
from aptune.masks import attached_hooks
from aptune.salience import BlockScores

BETA = 0.85  # spec §4.2 and §6.1: S_bar <- 0.85 S_bar + 0.15 S~


def bert(seed: int = 0, **overrides):
    """The tiny BERT of test_distill's ``make`` (3 layers of 4 heads, 64 FFN neurons, 32 hidden channels)."""
    return tiny_model(
        "BertForSequenceClassification",
        seed=seed,
        **{"num_labels": 2, "initializer_range": 0.05, "intermediate_size": 64, **overrides},
    )


def controller_for(model, config=SMALL_SCHEDULE) -> APTController:
    return APTController(model, config, total_steps=160, steps_per_epoch=20)


def moved_adapters(model, scale: float, seed: int) -> None:
    """Give every adapter's B factor (and so its output) a random nudge: a student that is not its teacher."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in model.modules():
            if isinstance(a, APTLinear):
                a.lora_B.add_(scale * torch.randn(a.lora_B.shape, generator=g))


def planted_scores(controller: APTController, seed: int) -> BlockScores:
    """Random positive scores shaped like the controller's masks, all distinct."""
    g = torch.Generator().manual_seed(seed)
    masks = controller.masks
    return BlockScores(
        [torch.rand(len(m), generator=g) + 0.01 for m in masks.heads],
        [torch.rand(len(m), generator=g) + 0.01 for m in masks.neurons],
        torch.rand(len(masks.hidden), generator=g) + 0.01,
    )


def student_apart_from_teacher(model, controller: APTController) -> None:
    """Take a teacher snapshot of non-trivial adapters, then move the student's adapters and head well away
    from it (so that distillation losses are clearly positive and the two KL directions differ)."""
    moved_adapters(model, 0.3, seed=0)
    controller.distiller.snapshot()
    moved_adapters(model, 1.0, seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        model.classifier.weight.add_(torch.randn(model.classifier.weight.shape, generator=g))


def clone_scores(s: BlockScores) -> BlockScores:
    return BlockScores([t.clone() for t in s.heads], [t.clone() for t in s.neurons], s.hidden.clone())


# -- §6.2: the most important half of the adapters grows --------------------------------------------------


def grown_at_first_checkpoint(importance: list[float], low: set[int]) -> tuple[APTController, set[int]]:
    """Plant rank-score moving averages whose means are ``importance``, run the first checkpoint, and return
    the adapters whose rank grew. Adapters in ``low`` get all their salience on one rank (a high maximum, a
    low mean), so ranking by the maximum instead of the mean would pick them."""
    controller = controller_for(bert())
    rank = controller.config.initial_rank
    controller.rank_scores = [
        torch.tensor([rank * v] + [0.0] * (rank - 1)) if i in low else torch.full((rank,), v)
        for i, v in enumerate(importance)
    ]
    controller.step = controller.schedule.checkpoints[0] - 1
    assert controller.after_step()  # the checkpoint: ranks grew
    return controller, {i for i, a in enumerate(controller.adapters) if a.rank > rank}


def test_the_most_important_half_of_the_adapters_grows():
    """At a checkpoint exactly the top half of the adapters by importance (the mean of their rank-salience
    moving average, spec §6.1-6.2) grows; the others keep their rank, and swapping the planted importance
    swaps which grow. It fails if growth picks any other half: the bottom half (reversed sort), the first
    adapters in model order, random ones, or ranks adapters by their largest rank score instead of the mean."""
    # 9 adapters (q, v, up in 3 layers): the top 4 grow; adapter 3 lies between the two halves
    top, bottom = [1, 4, 6, 8], [0, 2, 5, 7]

    def importance(high: list[int], low: list[int]) -> list[float]:
        values = [2.0] * 9
        for k, i in enumerate(high):
            values[i] = 3.0 + 0.1 * k
        for k, i in enumerate(low):
            values[i] = 1.0 + 0.1 * k
        return values

    controller, grown = grown_at_first_checkpoint(importance(top, bottom), low=set(bottom))
    assert len(controller.adapters) == 9 and grown == set(top)
    for i, a in enumerate(controller.adapters):  # the moving averages follow the grown ranks
        assert len(controller.rank_scores[i]) == a.rank
    _, grown = grown_at_first_checkpoint(importance(bottom, top), low=set(top))  # the halves swapped
    assert grown == set(bottom)


# -- §4.2, §6.1: the moving averages blend old and new scores ---------------------------------------------


def set_rank_saliences(controller: APTController, values: list[torch.Tensor]) -> None:
    """Set each adapter's ``lora_A.grad`` so that its per-rank salience |sum_j A_kj dL/dA_kj| is ``values``."""
    for a, v in zip(controller.adapters, values, strict=True):
        A = a.lora_A.detach()
        a.lora_A.grad = A * (v / A.pow(2).sum(1))[:, None]


def test_moving_averages_blend_old_and_new_scores(monkeypatch):
    """Through ``after_backward`` with known collector outputs and known rank saliences: the first step's
    scores are taken as they are, every later step gives 0.85 * old + 0.15 * new, for the block scores and for
    the rank scores. It fails with a beta of 0 (only the new scores), of 1 (only the old), with the weights
    swapped, or without blending (the latest scores replace the average)."""
    controller = controller_for(bert())
    assert controller.config.beta == BETA
    controller.step = controller.config.salience_start
    assert controller.collecting
    rounds = [planted_scores(controller, seed) for seed in (1, 2, 3)]
    expected = [clone_scores(s) for s in rounds]  # the controller may keep and update what it is given
    feed = iter(rounds)
    monkeypatch.setattr(controller.collector, "scores", lambda: next(feed))
    g = torch.Generator().manual_seed(4)
    saliences = [[torch.rand(a.rank, generator=g) + 0.1 for a in controller.adapters] for _ in range(3)]

    average, rank_average = None, None
    for step in range(3):
        set_rank_saliences(controller, saliences[step])
        controller.after_backward()
        if average is None:
            average, rank_average = expected[0], saliences[0]
        else:
            average = BlockScores(
                [BETA * o + (1 - BETA) * n for o, n in zip(average.heads, expected[step].heads, strict=True)],
                [
                    BETA * o + (1 - BETA) * n
                    for o, n in zip(average.neurons, expected[step].neurons, strict=True)
                ],
                BETA * average.hidden + (1 - BETA) * expected[step].hidden,
            )
            rank_average = [
                BETA * o + (1 - BETA) * n for o, n in zip(rank_average, saliences[step], strict=True)
            ]
        for got, want in zip(controller.scores.tensors(), average.tensors(), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        for got, want in zip(controller.rank_scores, rank_average, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # the average is not the latest scores nor the first ones
    assert not torch.allclose(controller.scores.hidden, expected[2].hidden, rtol=1e-3)
    assert not torch.allclose(controller.scores.hidden, expected[0].hidden, rtol=1e-3)


# -- §7.5: mu weights the distillation loss ---------------------------------------------------------------


def test_mu_weights_the_distillation_loss_not_the_task_loss(monkeypatch):
    """``compute_loss`` at steps where mu is 0.25 and 0.75, with the distiller's loss and the task loss
    known separately: the total is mu * distill + (1 - mu) * task. It fails when the roles are swapped
    (mu weighting the task loss), when mu is ignored, or when mu is read at another step."""
    model, controller = make()
    batch = synthetic_batches(1, seed=3)[0]
    student_apart_from_teacher(model, controller)  # the distillation loss is far from the task loss
    model.eval()
    distill_losses = []
    real_loss = controller.distiller.loss

    def spy(*args, **kwargs):
        distill_losses.append(real_loss(*args, **kwargs))
        return distill_losses[-1]

    monkeypatch.setattr(controller.distiller, "loss", spy)
    c = controller.config
    for mu in (0.25, 0.75):
        controller.step = round(c.salience_start + mu * (c.pruning_end - c.salience_start))
        assert controller.distilling and controller.distill_weight() == mu
        total = controller.compute_loss(batch)
        distill = distill_losses[-1]
        with torch.no_grad():
            task = model(**batch).loss
        assert abs(float(distill.detach()) - float(task)) > 0.5  # the two are told apart
        torch.testing.assert_close(total, mu * distill + (1 - mu) * task)
        assert not torch.isclose(total, (1 - mu) * distill + mu * task, rtol=1e-3)


# -- §7.2: the teacher is refreshed when validation improves, and only then ----------------------------


def teacher_state(controller: APTController) -> list[torch.Tensor]:
    factors = [t for a in controller.adapters for t in (a.teacher_A, a.teacher_B)]
    return [t.clone() for t in factors] + [t.clone() for t in controller.distiller.teacher_head.values()]


def student_state(controller: APTController) -> list[torch.Tensor]:
    factors = [t for a in controller.adapters for t in (a.lora_A, a.lora_B)]
    head = controller._head_parameters()
    return [t.detach().clone() for t in factors] + [
        head[n].detach().clone() for n in controller.distiller.teacher_head
    ]


def test_teacher_is_refreshed_when_validation_improves_and_only_then():
    """The teacher is taken at the start of distillation with the validation metric seen then (0.5). At the
    next checkpoint a better metric (0.6) makes the student of that moment the new teacher; an equal (0.5)
    or worse (0.4) one leaves the teacher's factors and head bit-identical; and a better metric reported
    between checkpoints changes nothing before the checkpoint. It fails when the teacher is refreshed at every
    checkpoint, on ties, never, or as soon as a metric is reported."""
    batch = synthetic_batches(1, seed=3)[0]
    for metric, refreshed in ((0.6, True), (0.5, False), (0.4, False)):
        model, controller = make()
        moved_adapters(model, 0.3, seed=0)
        controller.observe_validation(0.5)
        controller.step = controller.config.warmup_end  # distillation starts: the teacher is taken
        controller.compute_loss(batch)
        assert controller.distiller.has_teacher and controller.teacher_validation == 0.5
        old = teacher_state(controller)
        moved_adapters(model, 0.3, seed=1)  # the student moves on
        with torch.no_grad():
            model.classifier.weight.add_(0.1)
        student = student_state(controller)
        controller.observe_validation(metric)
        assert all(torch.equal(a, b) for a, b in zip(teacher_state(controller), old, strict=True))
        controller.step = controller.schedule.checkpoints[0] - 1
        controller.after_step()  # the checkpoint (ranks grow there too; the teacher keeps its rank)
        new = teacher_state(controller)
        if refreshed:
            assert all(torch.equal(a, b) for a, b in zip(new, student, strict=True))
            assert controller.teacher_validation == metric
        else:
            assert all(torch.equal(a, b) for a, b in zip(new, old, strict=True))
            assert controller.teacher_validation == 0.5


# -- §7.1: each distillation term contributes -------------------------------------------------------------


def test_prediction_kl_has_the_teacher_as_the_target():
    """``L_pred = T^2 KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch, against a
    hand computation; the KL the other way round is another number, so computing it with the student as the
    target distribution (or without T^2, or without the temperature) fails."""
    student = [[1.0, -0.5, 0.2], [0.0, 2.0, -1.0]]
    teacher = [[0.3, 0.8, -1.0], [1.5, -0.5, 0.5]]
    t = 2.0

    def softmax(row):
        e = [math.exp(x / t) for x in row]
        return [x / sum(e) for x in e]

    def kl(p_rows, q_rows):  # mean over rows of sum p log(p / q), times T^2
        per_row = [
            sum(p * math.log(p / q) for p, q in zip(pr, qr, strict=True))
            for pr, qr in zip(p_rows, q_rows, strict=True)
        ]
        return t * t * sum(per_row) / len(per_row)

    p_teacher, p_student = [softmax(r) for r in teacher], [softmax(r) for r in student]
    forward, reverse = kl(p_teacher, p_student), kl(p_student, p_teacher)
    assert abs(forward - reverse) > 0.05
    got = float(prediction_loss(torch.tensor(student), torch.tensor(teacher), t))
    assert math.isclose(got, forward, rel_tol=1e-5)
    assert not math.isclose(got, reverse, rel_tol=1e-2)


def test_each_distillation_term_contributes():
    """On a tiny BERT whose student differs from its teacher: with the layer weight at 0 the distillation
    loss is ``w_pred`` times the hand-computed KL(teacher || student) of the logits; with the prediction
    weight at 0 it is the layer loss alone, which is positive; the full loss is their sum, so setting either
    weight to 0 changes it; and the gradient of the layer loss reaches the transform ``Tr`` (and, with the
    layer weight at 0, does not). It fails if either term is dropped or ignores its weight, if the KL has the
    student as the target, or if the transform is left out of (or detached from) the layer loss."""
    model, controller = make()
    distiller = controller.distiller
    distiller.temperature = 1.0  # at 1 the two KL directions differ by 25% here (at 4, by 2%)
    batch = synthetic_batches(1, seed=3)[0]
    student_apart_from_teacher(model, controller)
    model.eval()
    teacher = distiller.teacher_outputs(batch)
    alive = [True] * 3

    def loss(pred_weight: float, layer_weight: float) -> torch.Tensor:
        distiller.pred_weight, distiller.layer_weight = pred_weight, layer_weight
        distiller.generator.manual_seed(0)  # the same sampled layers every time
        distiller.transform.zero_grad()
        student = model(**batch, output_hidden_states=True)
        return distiller.loss(student, teacher, alive)

    with torch.no_grad():
        student_logits = model(**batch).logits
    kl = kl_rows(student_logits, teacher.logits, distiller.temperature).mean()
    assert kl > 0.1
    pred_only = loss(0.7, 0.0)
    torch.testing.assert_close(pred_only.double(), 0.7 * kl, rtol=1e-5, atol=1e-7)
    reverse = kl_rows(teacher.logits, student_logits, distiller.temperature).mean()
    assert not torch.isclose(pred_only.double(), 0.7 * reverse, rtol=0.1)
    pred_only.backward()
    grad = distiller.transform.lora_B.grad
    assert grad is None or not bool(grad.any())  # the prediction term does not touch Tr

    layer_only = loss(0.0, 0.9)
    assert layer_only > 1e-4
    layer_only.backward()
    assert distiller.transform.lora_B.grad is not None and distiller.transform.lora_B.grad.abs().sum() > 0
    full = loss(0.7, 0.9)
    torch.testing.assert_close(full, pred_only.detach() + layer_only.detach(), rtol=1e-5, atol=1e-7)
    assert not torch.isclose(full, pred_only.detach(), rtol=1e-3)
    assert not torch.isclose(full, layer_only.detach(), rtol=1e-3)
    torch.testing.assert_close(loss(0.7, 0.45), pred_only.detach() + layer_only.detach() / 2)


# -- §7.2: the teacher runs unmasked ----------------------------------------------------------------------


def test_teacher_runs_unmasked():
    """With heads, neurons and hidden channels masked to 0 for the student, the teacher's outputs (logits and
    hidden states) equal those of the unmasked model with the teacher's factors, and differ from the masked
    student's. It fails if the teacher's forward pass keeps the student's masks on (or uses the student's
    factors)."""
    model, controller = make()
    batch = synthetic_batches(1, seed=4)[0]
    moved_adapters(model, 0.3, seed=0)
    controller.distiller.snapshot()
    model.eval()
    with torch.no_grad():
        unmasked = model(**batch, output_hidden_states=True)  # the teacher's factors, no masks
    moved_adapters(model, 0.3, seed=1)
    masks = controller.masks
    masks.set_heads(0, [1, 0, 1, 0])
    masks.set_heads(2, [0, 0, 1, 1])
    masks.set_neurons(1, (torch.arange(64) < 24).float())
    masks.set_hidden((torch.arange(32) % 4 != 3).float())
    teacher = controller.distiller.teacher_outputs(batch)
    torch.testing.assert_close(teacher.logits, unmasked.logits, rtol=0, atol=0)
    for a, b in zip(teacher.hidden_states, unmasked.hidden_states, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with torch.no_grad():
        student = model(**batch).logits
    assert (student - teacher.logits).abs().max() > 1e-2
    # the masks do matter to the teacher's factors: a masked teacher would be another model
    with controller.distiller.teacher_mode():
        attached_hooks(model).enabled = True
        masked_teacher = model(**batch).logits
    assert (masked_teacher - teacher.logits).abs().max() > 1e-2


# -- §5.2: salience drives selection ----------------------------------------------------------------------


def test_salience_decides_which_blocks_survive():
    """Through the controller, with planted moving averages: a head with a huge score survives the first
    decay window and a head with a zero score is dropped, for several random draws of the other scores; with
    the two plants swapped, the fates swap. A selection that does not follow the scores (random, fixed by
    position, or inverted) cannot keep both planted heads' fates right in both arrangements."""
    for seed in (0, 1, 2):
        for salient, useless in (((0, 1), (2, 3)), ((2, 3), (0, 1))):
            controller = controller_for(bert())
            scores = planted_scores(controller, seed)
            scores.heads[salient[0]][salient[1]] = 1e6
            scores.heads[useless[0]][useless[1]] = 0.0
            controller.scores = scores
            last = controller.schedule.windows[0][1]
            controller.step = last - 1
            controller.after_step()  # the window's last step: masks are set to 0/1 by the selection
            masks = controller.masks
            assert masks.is_binary()
            assert masks.heads[salient[0]][salient[1]] == 1, (seed, salient)
            assert masks.heads[useless[0]][useless[1]] == 0, (seed, useless)
            dropped = sum(int((m == 0).sum()) for m in masks.heads)
            assert 1 <= dropped < 11  # a real choice: some heads go, most stay


# -- scores stay aligned with their blocks after compaction ---------------------------------------------


def test_scores_follow_their_blocks_through_compaction():
    """After ``prune_physically`` every kept head, neuron and hidden channel still has the score it had
    before, in the new order of the weights: the score at new position j belongs to the block whose weights
    are now at position j. The rank-salience averages follow their adapters, also when a dropped FFN takes its
    adapter away. It fails if scores are sliced with other indices (e.g. the first n kept), left unsliced,
    or if the rank scores are not filtered with the adapters."""
    model = bert()
    controller = controller_for(model)
    structure = aptune.describe(model)
    planted = planted_scores(controller, seed=5)
    controller.scores = clone_scores(planted)
    g = torch.Generator().manual_seed(6)
    rank_scores = {id(a): torch.rand(a.rank, generator=g) for a in controller.adapters}
    controller.rank_scores = [rank_scores[id(a)].clone() for a in controller.adapters]
    head_masks = [[1, 0, 1, 1], [0, 1, 0, 1], [1, 1, 1, 1]]
    neuron_masks = [  # the first FFN goes whole: its adapter (not the last one) goes with it
        torch.zeros(64, dtype=torch.bool),
        torch.rand(64, generator=g) < 0.6,
        torch.arange(64) % 3 != 0,
    ]
    hidden_mask = torch.arange(32) % 5 != 2
    for i, m in enumerate(head_masks):
        controller.masks.set_heads(i, m)
    for i, m in enumerate(neuron_masks):
        controller.masks.set_neurons(i, m.float())
    controller.masks.set_hidden(hidden_mask.float())
    width = structure.attention[0].head_dim
    old_o = [site.o.weight.detach().clone() for site in structure.attention]
    old_down = [site.down.weight.detach().clone() for site in structure.ffn]
    old_emb = model.bert.embeddings.word_embeddings.weight.detach().clone()
    adapters_before = len(controller.adapters)

    controller.prune_physically()
    new = aptune.describe(model)
    scores = controller.scores
    for i, (site, mask) in enumerate(zip(new.attention, head_masks, strict=True)):
        kept = torch.nonzero(torch.tensor(mask)).flatten()
        assert torch.equal(scores.heads[i], planted.heads[i][kept])
        for j, old_j in enumerate(kept.tolist()):  # the weights of the block scored at j came from old_j
            cols = old_o[i][hidden_mask][:, old_j * width : (old_j + 1) * width]
            assert torch.equal(site.o.weight[:, j * width : (j + 1) * width], cols)
    for i, mask in enumerate(neuron_masks):
        kept = torch.nonzero(mask).flatten()
        assert torch.equal(scores.neurons[i], planted.neurons[i][kept])
        if len(kept):
            assert torch.equal(new.ffn[i].down.weight, old_down[i][hidden_mask][:, kept])
        else:
            assert new.ffn[i].num_neurons == 0
    assert torch.equal(scores.hidden, planted.hidden[hidden_mask])
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, old_emb[:, hidden_mask])
    # the adapter of the dropped FFN is gone; every other one keeps its own rank scores
    assert len(controller.adapters) == adapters_before - 1 and new.ffn[0].num_neurons == 0
    for a, s in zip(controller.adapters, controller.rank_scores, strict=True):
        assert torch.equal(s, rank_scores[id(a)])


# -- the controller's state round-trips, against an independent run --------------------------------------

# Checkpoints at steps 30, 50, 70, 90. The first target is 1: ranks grow, nothing is removed. The second is below
# 1: the decay window 34-49 moves the masks, then ranks grow and blocks are removed physically (no distillation).
ROUND_TRIP = replace(SMALL_SCHEDULE, warmup_end=30, distill=False)
# Resume points: after a rank growth (30), inside a decay window with fractional masks (40), after a physical
# removal and a growth (50). Every run rebuilds its optimizer and reseeds the global RNG (new adapter ranks draw
# from it) at each of them, so a resumed run and an uninterrupted one do exactly the same arithmetic.
RESUME_AT = (30, 40, 50)


def train(
    model, controller, batches, start: int, stop: int, lr: float = 3e-3, on_step=None
) -> dict[int, bool]:
    """Steps ``start`` to ``stop`` as ``run_apt`` does them (a fresh AdamW after every structural change), plus
    a fresh AdamW and a reseeded RNG at each of ``RESUME_AT``. ``on_step(step)`` is called before those steps.
    Returns what ``after_step`` said, by step."""
    optimizer = None
    model.train()
    changed = {}
    for step in range(start, stop):
        assert controller.step == step
        if step in RESUME_AT:
            if on_step is not None:
                on_step(step)
            torch.manual_seed(1234 + step)
        if step in RESUME_AT or optimizer is None:
            optimizer = torch.optim.AdamW(controller.trainable_parameters(), lr=lr)
        batch = batches[step % len(batches)]
        controller.before_forward()
        controller.compute_loss(batch).backward()
        controller.after_backward()
        optimizer.step()
        optimizer.zero_grad()
        changed[step + 1] = controller.after_step()
        if changed[step + 1]:
            optimizer = torch.optim.AdamW(controller.trainable_parameters(), lr=lr)
    return changed


def saved(obj) -> dict:
    """``obj`` through ``torch.save`` and back, as a checkpoint file would carry it."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def resumed(controller_state: dict, model_state: dict, plan: dict, config, seed: int = 3, **model_args):
    """A fresh model with other random weights, cut to the saved structure when it was compacted, a fresh
    controller on it, and both loaded from the saved states."""
    model = bert(seed, **model_args)
    if aptune.StructureShape.of(aptune.describe(model)).plan_dict() != plan:
        compact(model, masks_for_shape(model, plan))
    controller = controller_for(model, config)
    controller.load_state_dict(controller_state)
    model.load_state_dict(model_state)
    return model, controller


def checkpoint(model, controller) -> tuple[dict, dict, dict]:
    plan = aptune.StructureShape.of(aptune.describe(model)).plan_dict()
    return saved(controller.state_dict()), saved(model.state_dict()), plan


def test_state_round_trips_after_growth_and_after_physical_pruning():
    """Run A trains 75 steps straight through a checkpoint with rank growth only (step 30), a decay window and
    a checkpoint with physical removal and growth (step 50), and one more (70). Run B trains the same way and
    saves the controller's and the model's state dicts at steps 30, 40 and 50. For each, a fresh controller on
    a fresh model (other random weights; cut to the saved structure at step 50) loads them and continues to
    step 75. Masks, ranks, rank scores, block scores, the structure, the ranks history and the outputs must
    match run A's. It fails if any state the later steps depend on (step, masks, moving averages, ranks) is
    not saved or not restored."""
    batches = synthetic_batches(20, seed=0)
    n = 75

    model_a = bert()
    a = controller_for(model_a, ROUND_TRIP)
    changed = train(model_a, a, batches, 0, n)
    assert changed[30] and changed[50]
    assert [h["step"] for h in a.history] == [30, 50, 70]
    assert a.history[0]["density"] == 1.0 and max(a.history[0]["ranks"]) > 8  # growth alone at 30
    removal = a.history[1]  # removal and growth at 50
    assert removal["density"] < 1 and removal["ranks"] != a.history[0]["ranks"]

    model_b = bert()
    b = controller_for(model_b, ROUND_TRIP)
    states = {}

    def save(step: int) -> None:  # at the start of the step: after the checkpoint that ended the one before
        states[step] = checkpoint(model_b, b)

    train(model_b, b, batches, 0, max(RESUME_AT) + 1, on_step=save)
    fractional = [t for t in states[40][0]["masks"].values() if bool(((t > 0) & (t < 1)).any())]
    assert fractional  # step 40 is inside a decay window
    assert states[50][2] != states[30][2]  # step 50 comes after a physical removal

    probe = synthetic_batches(1, seed=9)[0]
    model_a.eval()
    with torch.no_grad():
        expected_logits = model_a(**probe).logits
    for k in RESUME_AT:
        model_c, c = resumed(*states[k], ROUND_TRIP)
        assert c.step == k
        train(model_c, c, batches, k, n)
        assert [ad.rank for ad in c.adapters] == [ad.rank for ad in a.adapters], k
        shape_c = aptune.StructureShape.of(aptune.describe(model_c))
        assert shape_c == aptune.StructureShape.of(aptune.describe(model_a)), k
        for x, y in zip(c.masks.all_tensors(), a.masks.all_tensors(), strict=True):
            assert torch.equal(x, y), k
        for x, y in zip(c.rank_scores, a.rank_scores, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-9)
        for x, y in zip(c.scores.tensors(), a.scores.tensors(), strict=True):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-9)
        assert c.history == a.history, k
        model_c.eval()
        with torch.no_grad():
            torch.testing.assert_close(model_c(**probe).logits, expected_logits, rtol=1e-5, atol=1e-6)


# -- state that a resumed distillation run loses (bugs in src/, reported; see the reasons) ---------------


def test_resumed_distillation_samples_the_same_teacher_layers():
    """On a 6-layer model (two layers per quarter: the sampled teacher layers depend on the RNG), run B trains
    into the distillation window and saves its state at step 40; a fresh controller loads it. The next
    distillation losses on the same batches must equal those of B continuing. It fails if the layer-sampling
    RNG's state is not saved and restored."""
    config = replace(ROUND_TRIP, distill=True)  # distillation from step 30
    batches = synthetic_batches(20, seed=0)
    model_b = bert(num_hidden_layers=6)
    b = controller_for(model_b, config)
    train(model_b, b, batches, 0, 40)
    assert b.distiller.has_teacher and b.distilling
    model_c, c = resumed(*checkpoint(model_b, b), config, num_hidden_layers=6)
    for model in (model_b, model_c):
        model.eval()
    with torch.no_grad():
        losses_b = [float(b.compute_loss(batch)) for batch in batches[:4]]
        losses_c = [float(c.compute_loss(batch)) for batch in batches[:4]]
    assert losses_c == pytest.approx(losses_b, rel=1e-6)


@pytest.mark.xfail(
    strict=True,
    reason="resume issue 13: after the last checkpoint the teacher is a separate module (SelfDistiller.teacher_model) and the "
    "student's adapters drop their snapshot factors, so state_dict saves teacher_factors as all None and no "
    "teacher model: after load_state_dict the 'teacher' is the student's current adapters with the old head",
)
def test_resumed_distillation_keeps_the_separate_teacher():
    """With a validation metric that never improves, the teacher is not refreshed at the last checkpoint
    (step 90): the student is compacted there and the teacher becomes a separate copy. State saved at step 91
    and loaded by a fresh controller on a fresh model cut to the saved structure must give the same teacher
    outputs. It fails when the separate teacher is not part of the saved state."""
    config = replace(ROUND_TRIP, distill=True)
    batches = synthetic_batches(20, seed=0)
    model_b = bert()
    b = controller_for(model_b, config)
    b.observe_validation(0.5)
    train(model_b, b, batches, 0, 91)
    assert b.distiller.separate and b.distilling
    model_c, c = resumed(*checkpoint(model_b, b), config)
    probe = synthetic_batches(1, seed=9)[0]
    model_b.eval()
    expected = b.distiller.teacher_outputs(probe).logits
    with torch.no_grad():
        assert (expected - model_b(**probe).logits).abs().max() > 1e-3  # teacher and student differ
    torch.testing.assert_close(c.distiller.teacher_outputs(probe).logits, expected, rtol=1e-5, atol=1e-6)
