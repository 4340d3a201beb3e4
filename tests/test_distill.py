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


HEAD = ("classifier", "bert.pooler")  # the task head (BERT's pooler belongs to it) is trained, not frozen


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
    assert accuracy(model, valid) >= 0.9
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
