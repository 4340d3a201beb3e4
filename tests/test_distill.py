"""Self-distillation: a teacher that shares the student's backbone, the mu schedule, zero loss at equality,
and distillation that carries on across physical pruning."""

from __future__ import annotations

from dataclasses import replace

import torch
from conftest import tiny_model
from test_controller import SMALL_SCHEDULE, accuracy, run_apt, synthetic_batches

import aptune
from aptune.adapter import APTLinear
from aptune.config import APTConfig
from aptune.controller import APTController
from aptune.distill import map_layers, prediction_loss, sample_teacher_layers

CONFIG = replace(SMALL_SCHEDULE, distill=True)


def make(seed=0, **overrides):
    model = tiny_model(
        "BertForSequenceClassification", seed=seed, num_labels=2, initializer_range=0.05, intermediate_size=64
    )
    config = APTConfig(**{**CONFIG.to_dict(), **overrides})
    return model, APTController(model, config, total_steps=160, steps_per_epoch=20)


HEAD = ("classifier",)  # the new task layer trains; the pretrained pooler stays frozen (issue 11, finding 3)


def backbone_storage(model):
    return {
        n: p.data_ptr() for n, p in model.named_parameters() if "lora_" not in n and not n.startswith(HEAD)
    }


def test_teacher_shares_the_backbone():
    model, controller = make()
    controller.distiller.snapshot()
    before = backbone_storage(model)
    seen = {}
    with controller.distiller.teacher_mode():
        seen = backbone_storage(model)
        assert all(a.use_teacher for a in model.modules() if isinstance(a, APTLinear))
    assert seen == before  # the very same tensors, not copies
    # the teacher's own state is only the adapter factors and the head: no copy of any frozen weight
    adapters = [a for a in model.modules() if isinstance(a, APTLinear)]
    teacher_numel = sum(a.teacher_A.numel() + a.teacher_B.numel() for a in adapters)
    teacher_numel += sum(t.numel() for t in controller.distiller.teacher_head.values())
    lora_numel = sum(a.lora_A.numel() + a.lora_B.numel() for a in adapters)
    head_numel = sum(p.numel() for n, p in model.named_parameters() if n.startswith(HEAD))
    assert teacher_numel == lora_numel + head_numel


def test_mu_schedule_values():
    _, controller = make()
    c = controller.config  # salience from step 10, pruning ends at step 90
    expected = {0: 0.0, 10: 0.0, 30: 0.25, 50: 0.5, 90: 1.0, 120: 1.0}
    for step, mu in expected.items():
        controller.step = step
        assert controller.distill_weight() == mu
    controller.step = c.warmup_end - 1
    assert not controller.distilling
    controller.step = c.warmup_end
    assert controller.distilling
    controller.step = c.distill_end
    assert not controller.distilling


def test_losses_are_zero_when_the_student_is_the_teacher():
    model, controller = make()
    batch = synthetic_batches(1, seed=3)[0]
    # give the adapters and head non-trivial values first
    with torch.no_grad():
        for a in model.modules():
            if isinstance(a, APTLinear):
                a.lora_B.normal_(0, 0.1)
    controller.distiller.snapshot()
    model.eval()
    student = model(**batch, output_hidden_states=True)
    teacher = controller.distiller.teacher_outputs(batch)
    assert torch.equal(student.logits, teacher.logits)
    assert controller.distiller.loss(student, teacher, [True] * 3) == 0
    assert prediction_loss(student.logits, student.logits + 1.0, 4.0) < 1e-6  # a constant shift is no change
    assert prediction_loss(student.logits, -student.logits, 4.0) > 0


def test_layer_mapping_uses_the_nearest_alive_layer():
    hidden = [torch.full((1, 2, 4), float(i)) for i in range(4)]
    identity = torch.nn.Identity()
    assert map_layers([0, 1, 2, 3], [True, True, True, True], hidden, hidden, identity) == [
        (0, 0),
        (1, 1),
        (2, 2),
        (3, 3),
    ]
    # layer 2 is gone: teacher layer 2 (value 2) is closer to student layer 3 (value 3.0)? no: 1 and 3 tie, below wins
    assert map_layers([2], [True, True, False, True], hidden, hidden, identity) == [(2, 1)]
    teacher = [h + 0.6 for h in hidden]
    assert map_layers([2], [True, True, False, True], hidden, teacher, identity) == [(2, 3)]
    assert map_layers([1], [False, False, False, False], hidden, hidden, identity) == []
    layers = sample_teacher_layers(12, torch.Generator().manual_seed(0))
    assert [layer // 3 for layer in layers] == [0, 1, 2, 3]


def test_distillation_carries_on_across_physical_pruning():
    model, controller = make(seed=1)
    train, valid = synthetic_batches(20, seed=0), synthetic_batches(8, seed=1)
    run_apt(model, controller, train[:5], epochs=4)  # 20 steps: distillation starts here
    controller.before_forward()
    controller.compute_loss(train[0]).backward()
    assert controller.distiller.has_teacher
    controller.after_backward()
    # prune heads, neurons and hidden channels now, in the middle of distillation
    masks = controller.masks
    for i, m in enumerate(masks.heads):  # end the running decay window: everything kept but our choice
        masks.set_heads(i, torch.ones_like(m))
    for i, m in enumerate(masks.neurons):
        masks.set_neurons(i, torch.ones_like(m))
    masks.set_heads(0, [1, 0, 1, 0])
    masks.set_neurons(1, (torch.arange(64) < 32).float())
    masks.set_hidden((torch.arange(32) % 4 != 3).float())
    controller.prune_physically()
    shape = aptune.StructureShape.of(aptune.describe(model))
    assert shape.heads[0] == 2 and shape.neurons[1] == 32 and shape.hidden == 24
    for a in model.modules():
        if isinstance(a, APTLinear) and a.teacher_A is not None:
            assert a.teacher_A.shape[1] == a.in_features and a.teacher_B.shape[0] == a.out_features
    assert controller.distiller.transform.in_features == 24
    loss = controller.compute_loss(train[1])
    assert torch.isfinite(loss)
    loss.backward()
    assert controller.distiller.transform.lora_A.grad is not None  # Tr keeps training
    # and the whole run still learns and meets its budget
    run_apt(model, controller, train, epochs=7)
    # 0.85, not 0.9: this short run is chaotic. The same code lands between 0.89 and 0.95 at this seed when
    # only the summation order of the (unpadded) layer MSE changes, and between 0.94 and 0.99 at other seeds.
    assert accuracy(model, valid) >= 0.85
    assert controller.density() <= 0.5


def test_state_round_trip_keeps_the_teacher():
    model, controller = make()
    run_apt(model, controller, synthetic_batches(5, seed=2), epochs=5)  # 25 steps: teacher taken at step 20
    state = controller.state_dict()
    assert state["distiller"]["teacher_head"] is not None
    twin, other = make()
    other.load_state_dict(state)
    again = other.state_dict()["distiller"]
    for (a1, b1), (a2, b2) in zip(
        state["distiller"]["teacher_factors"], again["teacher_factors"], strict=True
    ):
        assert torch.equal(a1, a2) and torch.equal(b1, b2)
    for k, v in state["distiller"]["transform"].items():
        assert torch.equal(v, again["transform"][k])


# -- question answering and token classification heads (spec §7.1) ---------------------------------------


def kl_rows(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """``T^2 KL(softmax(teacher / T) || softmax(student / T))`` of each row, written out."""
    p_teacher = torch.softmax(teacher.double() / t, dim=-1)
    log_ratio = torch.log_softmax(teacher.double() / t, dim=-1) - torch.log_softmax(
        student.double() / t, dim=-1
    )
    return t * t * (p_teacher * log_ratio).sum(-1)


def qa_batches(n_batches: int, seed: int, batch: int = 8, length: int = 12):
    """The answer span starts at the first token above 60 and ends at the next one (or at the start)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(2, 60, (batch, length), generator=g)
        start = torch.randint(1, length - 2, (batch,), generator=g)
        ids[torch.arange(batch), start] = 70
        ids[torch.arange(batch), start + 1] = 71
        attention = torch.ones_like(ids)
        attention[0, length - 2 :] = 0  # one padded row
        out.append(
            {
                "input_ids": ids,
                "attention_mask": attention,
                "start_positions": start,
                "end_positions": start + 1,
            }
        )
    return out


def test_question_answering_distils_start_and_end_logits():
    model = tiny_model("BertForQuestionAnswering", initializer_range=0.05, intermediate_size=64)
    controller = APTController(model, CONFIG, total_steps=160, steps_per_epoch=20)
    distiller = controller.distiller
    assert distiller is not None
    # through the controller: warm-up, the start of distillation and the pruning window, with backward passes
    run_apt(model, controller, qa_batches(10, seed=0), epochs=4)  # 40 steps: distillation from step 20
    assert distiller.has_teacher and controller.distilling and controller.distill_weight() > 0

    batch = qa_batches(1, seed=5)[0]
    with torch.no_grad():
        for a in model.modules():  # a student that differs from its teacher
            if isinstance(a, APTLinear):
                a.lora_B.add_(0.05 * torch.randn_like(a.lora_B))
    model.train()
    controller.before_forward()
    loss = controller.compute_loss(batch)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(a.lora_A.grad is not None for a in controller.adapters)
    assert distiller.transform.lora_A.grad is not None
    controller.after_backward()

    # the prediction loss is the mean of the start KL and the end KL, each with the teacher as the target
    model.eval()
    student = model(**batch, output_hidden_states=True)
    teacher = distiller.teacher_outputs(batch)
    t = distiller.temperature
    start = kl_rows(student.start_logits, teacher.start_logits, t).mean()
    end = kl_rows(student.end_logits, teacher.end_logits, t).mean()
    expected = (start + end) / 2
    assert expected > 1e-4  # the student does differ from the teacher
    pred = aptune.distill.output_prediction_loss(student, teacher, t, batch["attention_mask"])
    torch.testing.assert_close(pred.double(), expected, atol=1e-6, rtol=1e-5)
    distiller.layer_weight = 0.0
    total = distiller.loss(student, teacher, controller._alive_layers(), batch["attention_mask"])
    torch.testing.assert_close(total.double(), distiller.pred_weight * expected, atol=1e-6, rtol=1e-5)
    # a KL with the student as the target would be another number
    reversed_kl = (
        kl_rows(teacher.start_logits, student.start_logits, t).mean()
        + kl_rows(teacher.end_logits, student.end_logits, t).mean()
    ) / 2
    assert not torch.isclose(pred.double(), reversed_kl, rtol=1e-3)

    # and the run goes on to the end of distillation
    run_apt(model, controller, qa_batches(10, seed=1), epochs=12)
    assert controller.step == 160 and not controller.distilling


def token_batch(seed: int = 0, batch: int = 4, length: int = 10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 90, (batch, length), generator=g)
    attention = torch.ones_like(ids)
    attention[1, 6:] = 0
    attention[3, 3:] = 0
    labels = torch.randint(0, 3, (batch, length), generator=g).masked_fill(attention == 0, -100)
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def token_setup():
    model = tiny_model("BertForTokenClassification", initializer_range=0.05, intermediate_size=64)
    controller = APTController(model, CONFIG, total_steps=160, steps_per_epoch=20)
    with torch.no_grad():
        for a in model.modules():
            if isinstance(a, APTLinear):
                a.lora_B.normal_(0, 0.1)
    controller.distiller.snapshot()
    with torch.no_grad():
        for a in model.modules():  # the student moves away from the teacher
            if isinstance(a, APTLinear):
                a.lora_B.add_(0.1 * torch.randn_like(a.lora_B))
    return model, controller


def with_logits(out, logits):
    return type(out)(logits=logits, hidden_states=out.hidden_states)


def test_token_classification_kl_ignores_padding():
    model, controller = token_setup()
    distiller = controller.distiller
    batch = token_batch()
    mask = batch["attention_mask"]
    student = model(**batch, output_hidden_states=True)
    teacher = distiller.teacher_outputs(batch)
    t = distiller.temperature
    pred = aptune.distill.output_prediction_loss(student, teacher, t, mask)
    per_token = kl_rows(student.logits, teacher.logits, t)
    torch.testing.assert_close(pred.double(), per_token[mask == 1].mean(), atol=1e-6, rtol=1e-5)

    def loss_with(logits):
        distiller.generator.manual_seed(0)  # the same sampled layers for every call
        return distiller.loss(with_logits(student, logits), teacher, [True] * 3, mask)

    base = loss_with(student.logits)
    noise = 5 * torch.randn(student.logits.shape, generator=torch.Generator().manual_seed(1))
    padded, real = (mask == 0)[..., None], (mask == 1)[..., None]
    assert torch.equal(loss_with(student.logits + noise * padded), base)
    assert not torch.isclose(loss_with(student.logits + noise * real), base, rtol=1e-3)


def test_layer_loss_ignores_padding():
    model, controller = token_setup()
    distiller = controller.distiller
    batch = token_batch(seed=1)
    mask = batch["attention_mask"]
    student = model(**batch, output_hidden_states=True)
    teacher = distiller.teacher_outputs(batch)
    distiller.pred_weight = 0.0

    def loss_with(hidden):
        distiller.generator.manual_seed(0)
        out = type(student)(logits=student.logits, hidden_states=hidden)
        return distiller.loss(out, teacher, [True] * 3, mask)

    g = torch.Generator().manual_seed(2)
    padded = [
        h + 3 * torch.randn(h.shape, generator=g) * (mask == 0)[..., None] for h in student.hidden_states
    ]
    real = [h + 3 * torch.randn(h.shape, generator=g) * (mask == 1)[..., None] for h in student.hidden_states]
    base = loss_with(student.hidden_states)
    assert base > 0
    assert torch.equal(loss_with(padded), base)
    assert not torch.isclose(loss_with(real), base, rtol=1e-3)
    # the value: a mean over real tokens and channels (Tr is the identity at initialisation)
    distiller.generator.manual_seed(0)
    layers = sample_teacher_layers(3, distiller.generator)
    real_tokens = mask == 1
    expected = sum(
        (student.hidden_states[i + 1][real_tokens] - teacher.hidden_states[i + 1][real_tokens]).pow(2).mean()
        for i in layers
    )
    torch.testing.assert_close(base, distiller.layer_weight * expected, atol=1e-6, rtol=1e-5)


def test_controller_passes_the_attention_mask():
    """Changing the token ids at padded positions changes nothing the distillation loss may look at."""
    model, controller = token_setup()
    controller.step = controller.config.warmup_end + 10  # inside the distillation window, mu > 0
    assert controller.distilling and controller.distill_weight() > 0
    batch = token_batch(seed=2)
    other = dict(batch, input_ids=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 50))
    losses = []
    for b in (batch, other):
        controller.distiller.generator.manual_seed(0)
        losses.append(controller.compute_loss(b))
    assert torch.equal(losses[0], losses[1])


def test_after_the_last_checkpoint_the_student_runs_compacted_and_the_teacher_is_unchanged():
    """Finding 7: once the structure is final the student stops running full width while distilling; the
    teacher keeps the blocks and its outputs do not change; the model object the user holds is the student."""
    model, controller = make(seed=0)
    train = synthetic_batches(20, seed=0) * 5
    last = controller.schedule.checkpoints[-1]
    probe = train[3]
    controller.observe_validation(0.5)  # never beaten below: the teacher is not refreshed, blocks stay masked
    run_apt(model, controller, train[: last - 1], epochs=1)  # stop one step before the last checkpoint
    assert controller.distiller.has_teacher and not controller.distiller.separate
    assert controller.density() < 0.6 and all(
        len(h) == 4 for h in controller.masks.heads
    )  # masked, not removed
    optimizer = torch.optim.AdamW(controller.trainable_parameters(), lr=1e-3)
    model.train()
    controller.before_forward()
    controller.compute_loss(train[last - 1]).backward()
    controller.after_backward()
    optimizer.step()
    optimizer.zero_grad()
    teacher_before = controller.distiller.teacher_outputs(probe)
    model.eval()
    with torch.no_grad():
        student_before = model(**probe).logits
    shape_before = aptune.StructureShape.of(aptune.describe(model))
    assert controller.after_step()  # the last checkpoint: the structure changed
    assert controller.step == last and controller.model is model and controller.distiller.separate
    assert controller.masks.is_binary() and all(bool((m == 1).all()) for m in controller.masks.all_tensors())
    shape_after = aptune.StructureShape.of(aptune.describe(model))
    assert aptune.budget.count_prunable(shape_after) < aptune.budget.count_prunable(shape_before)
    assert aptune.budget.count_prunable(shape_after) <= 0.5 * controller.base_params
    with torch.no_grad():
        student_after = model(**probe).logits  # compacted == masked
    torch.testing.assert_close(student_after, student_before, rtol=1e-4, atol=1e-5)
    teacher_after = controller.distiller.teacher_outputs(probe)
    torch.testing.assert_close(teacher_after.logits, teacher_before.logits)
    for a, b in zip(teacher_after.hidden_states, teacher_before.hidden_states, strict=True):
        torch.testing.assert_close(a, b)
    # the teacher shares the frozen tensors the student kept whole, and nothing of it trains
    teacher = controller.distiller.teacher_model
    assert not any(p.requires_grad for p in teacher.parameters())
    shared = {p.data_ptr() for p in teacher.parameters()} & {p.data_ptr() for p in model.parameters()}
    assert model.bert.embeddings.position_embeddings.weight.data_ptr() in shared or shape_after.hidden < 32
    # distillation goes on: the loss is finite and the transform trains; at its end the teacher goes away
    model.train()
    loss = controller.compute_loss(train[0])
    loss.backward()
    assert torch.isfinite(loss) and controller.distiller.transform.lora_A.grad is not None
    run_apt(model, controller, train[:60], epochs=1)
    assert controller.step > controller.config.distill_end and controller.distiller.teacher_model is None
