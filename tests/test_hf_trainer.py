"""APTCallback: APT inside transformers.Trainer, on a tiny BERT and a synthetic separable task (CPU, seconds)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import tiny_model
from test_controller import SMALL_SCHEDULE
from transformers import Trainer, TrainerCallback, TrainingArguments

import aptune
from aptune.budget import StructureShape, count_prunable
from aptune.controller import APTController
from aptune.integrations import APTCallback, UnsupportedTrainerSetup, training_steps

# the Trainer computes its own loss: no self-distillation under the callback
CONFIG = replace(SMALL_SCHEDULE, distill=False)
LR = 3e-3


def examples(n: int, seed: int, length: int = 10) -> list[dict[str, torch.Tensor]]:
    """Class 0 uses tokens 2..39, class 1 tokens 40..79: separable, but only by reading the tokens."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    low = torch.randint(2, 40, (n, length), generator=g)
    high = torch.randint(40, 80, (n, length), generator=g)
    ids = torch.where(labels[:, None] == 1, high, low)
    return [
        {"input_ids": ids[i], "attention_mask": torch.ones_like(ids[i]), "labels": labels[i]}
        for i in range(n)
    ]


class Examples(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


TRAIN = Examples(examples(320, seed=0))  # 20 batches of 16
VALID = examples(128, seed=1)


def make_model():
    return tiny_model(
        "BertForSequenceClassification", num_labels=2, initializer_range=0.05, intermediate_size=64
    )


def make_args(tmp_path, **overrides) -> TrainingArguments:
    kwargs = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        per_device_train_batch_size=16,
        num_train_epochs=8,
        learning_rate=LR,
        disable_tqdm=True,
    )
    return TrainingArguments(**{**kwargs, **overrides})


def accuracy(model) -> float:
    model.eval()
    batch = torch.utils.data.default_collate(VALID)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return float((logits.argmax(-1) == batch["labels"]).float().mean())


class Recorder(TrainerCallback):
    """Per optimizer step: the lr of every param group of the optimizer that is about to step, and how many
    trainable parameters it misses and how many other tensors it holds."""

    def __init__(self, controller: APTController | None = None):
        self.controller = controller
        self.lrs: list[list[float]] = []
        self.scheduler_lrs: list[list[float]] = []
        self.missing_extra: list[tuple[int, int]] = []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        self.lrs.append([g["lr"] for g in optimizer.param_groups])
        self.scheduler_lrs.append(list(lr_scheduler.get_last_lr()))
        if self.controller is not None:
            held = {id(p) for g in optimizer.param_groups for p in g["params"]}
            trainable = {id(p) for p in self.controller.trainable_parameters()}
            self.missing_extra.append((len(trainable - held), len(held - trainable)))


def test_trainer_prunes_grows_learns_and_keeps_the_lr_schedule(tmp_path):
    model = make_model()
    controller = APTController(model, CONFIG, total_steps=160, steps_per_epoch=20)
    base = controller.base_params
    recorder = Recorder(controller)
    trainer = Trainer(model=model, args=make_args(tmp_path), train_dataset=TRAIN, callbacks=[recorder])
    assert training_steps(trainer) == (160, 20)
    callback = APTCallback.attach(trainer, controller)
    trainer.train()

    assert trainer.state.global_step == controller.step == 160
    assert callback.after_backward_calls == 160
    # the budget is met after every checkpoint, and the final structure is physically pruned
    targets = dict(zip(controller.schedule.checkpoints, controller.schedule.targets, strict=True))
    assert [r["step"] for r in controller.history] == list(controller.schedule.checkpoints)
    for record in controller.history:
        assert record["density"] <= targets[record["step"]] + 1e-9
    assert callback.rebuilds >= 3  # pruning and growth replaced parameters at the checkpoints
    # the optimizer that stepped always held exactly the current trainable parameters
    assert recorder.missing_extra == [(0, 0)] * 160
    assert "_clip_grad_norm" not in vars(trainer)  # the clipping wrapper is gone after training
    # ranks grew, and the grown columns of B were trained (the rebuilt optimizer really stepped them)
    grown = [a for a in controller.adapters if a.rank > CONFIG.initial_rank]
    assert grown and all(a.rank <= CONFIG.max_rank for a in controller.adapters)
    assert all(float(a.lora_B.detach()[:, CONFIG.initial_rank :].abs().sum()) > 0 for a in grown)

    model = controller.finish()
    shape = StructureShape.of(aptune.describe(model))
    assert count_prunable(shape) <= 0.5 * base
    assert all(n % 8 == 0 for n in shape.neurons)
    assert accuracy(model) >= 0.9

    # the lr sequence is the one a run without any rebuild sees: a plain Trainer run of the same length
    reference = Recorder()
    Trainer(model=make_model(), args=make_args(tmp_path), train_dataset=TRAIN, callbacks=[reference]).train()
    assert len(reference.lrs) == 160
    assert [lrs[0] for lrs in recorder.lrs] == [lrs[0] for lrs in reference.lrs]
    assert all(lrs == [lrs[0]] * len(lrs) for lrs in recorder.lrs)  # every group, also after rebuilds
    assert recorder.scheduler_lrs == reference.scheduler_lrs
    assert recorder.lrs[0][0] == LR and recorder.lrs[80][0] == pytest.approx(LR / 2)


def _reseeded(controller: APTController) -> None:
    """Rank growth draws new rows of A from the global RNG; seed it per step so that two runs which use the
    RNG differently elsewhere (the Trainer seeds it and draws from it) still grow the same rows."""
    after_step = controller.after_step

    def step() -> bool:
        torch.manual_seed(1000 + controller.step)
        return after_step()

    controller.after_step = step


def test_trainer_run_equals_the_controllers_plain_loop(tmp_path):
    """Same data order, optimizer and clipping: the Trainer with APTCallback gives exactly the plain loop's
    result (after_backward before clipping, fresh optimizer at rebuilds, constant lr)."""
    max_grad_norm = 1.0
    args = make_args(
        tmp_path,
        lr_scheduler_type="constant",
        train_sampling_strategy="sequential",
        optim="adamw_torch",
        max_grad_norm=max_grad_norm,
    )
    model_t = make_model()
    ctrl_t = APTController(model_t, CONFIG, total_steps=160, steps_per_epoch=20)
    _reseeded(ctrl_t)
    trainer = Trainer(model=model_t, args=args, train_dataset=TRAIN)
    APTCallback.attach(trainer, ctrl_t)
    trainer.train()

    def plain_loop(clip_before_salience: bool = False):
        model = make_model()
        controller = APTController(model, CONFIG, total_steps=160, steps_per_epoch=20)
        _reseeded(controller)
        batches = [torch.utils.data.default_collate(TRAIN.items[i : i + 16]) for i in range(0, 320, 16)]
        optimizer = torch.optim.AdamW(controller.trainable_parameters(), lr=LR, weight_decay=0.0)
        model.train()
        for _ in range(8):
            for batch in batches:
                controller.before_forward()
                model(**batch).loss.backward()
                if clip_before_salience:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
                controller.after_backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
                if controller.after_step():
                    optimizer = torch.optim.AdamW(controller.trainable_parameters(), lr=LR, weight_decay=0.0)
        return model, controller

    model_p, ctrl_p = plain_loop()
    assert ctrl_t.history == ctrl_p.history
    state_t, state_p = model_t.state_dict(), model_p.state_dict()
    assert state_t.keys() == state_p.keys()
    for key, value in state_p.items():
        torch.testing.assert_close(state_t[key], value, rtol=1e-5, atol=1e-6, msg=key)
    for a, b in zip(ctrl_t.rank_scores, ctrl_p.rank_scores, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)

    # the placement matters here: salience from clipped gradients would give other rank scores
    _, ctrl_c = plain_loop(clip_before_salience=True)
    assert any(
        not torch.allclose(a, b, rtol=1e-3)
        for a, b in zip(ctrl_c.rank_scores, ctrl_p.rank_scores, strict=True)
    )


def test_gradient_accumulation_calls_after_backward_once_per_optimizer_step(tmp_path):
    train = Examples(examples(328, seed=0))  # 41 micro-batches of 8: 21 optimizer steps, the last one short
    model = make_model()
    args = make_args(tmp_path, per_device_train_batch_size=8, gradient_accumulation_steps=2)
    trainer = Trainer(model=model, args=args, train_dataset=train)
    total, per_epoch = training_steps(trainer)
    assert (total, per_epoch) == (168, 21)
    controller = APTController(model, CONFIG, total_steps=total, steps_per_epoch=per_epoch)
    base = controller.base_params

    salience_calls: list[int] = []
    after_backward = controller.after_backward

    def counted() -> None:
        salience_calls.append(controller.step)
        after_backward()

    controller.after_backward = counted
    forwards: list[tuple[int, bool]] = []  # (step, salience collection on) for every micro-batch
    model.register_forward_pre_hook(
        lambda m, a: forwards.append((controller.step, controller.collector.active))
    )
    callback = APTCallback.attach(trainer, controller)
    trainer.train()

    assert trainer.state.global_step == controller.step == 168
    assert salience_calls == list(range(168)) and callback.after_backward_calls == 168
    per_step: dict[int, list[bool]] = {}
    for step, active in forwards:
        per_step.setdefault(step, []).append(active)
    assert sorted(per_step) == list(range(168))
    assert all(len(v) == (1 if s % 21 == 20 else 2) for s, v in per_step.items())
    # collection is on for every micro-batch of the steps inside the salience window, and only there
    for step, active in per_step.items():
        assert all(active) if CONFIG.salience_start <= step < CONFIG.pruning_end else not any(active)

    targets = dict(zip(controller.schedule.checkpoints, controller.schedule.targets, strict=True))
    assert all(r["density"] <= targets[r["step"]] + 1e-9 for r in controller.history)
    assert max(a.rank for a in controller.adapters) > CONFIG.initial_rank
    model = controller.finish()
    assert count_prunable(StructureShape.of(aptune.describe(model))) <= 0.5 * base
    assert accuracy(model) >= 0.9


def test_user_optimizer_and_scheduler_keep_groups_and_schedule(tmp_path):
    """An optimizer and LambdaLR passed in by the user (the scheduler bound to the raw optimizer, not to
    accelerate's wrapper), a group of frozen parameters, no gradient clipping: after rebuilds each parameter
    stays in its group, frozen ones are dropped, and each group follows its lr."""
    model = make_model()
    controller = APTController(model, CONFIG, total_steps=160, steps_per_epoch=20)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    adapters = [p for n, p in trainable if "lora_" in n]
    head_names = {n for n, _ in trainable if "lora_" not in n}  # pooler and classifier
    head = [p for n, p in trainable if n in head_names]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    groups = [
        {"params": adapters, "lr": LR},
        {"params": head, "lr": 1e-3, "weight_decay": 0.0},
        {"params": frozen, "lr": 1e-4},
    ]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / 160)
    recorder = Recorder(controller)
    trainer = Trainer(
        model=model,
        args=make_args(tmp_path, max_grad_norm=0.0),
        train_dataset=TRAIN,
        optimizers=(optimizer, scheduler),
        callbacks=[recorder],
    )
    callback = APTCallback.attach(trainer, controller)
    trainer.train()

    assert callback.rebuilds >= 3 and callback.after_backward_calls == 160
    first = controller.history[0]["step"]  # the first rebuild: from then on only trainable parameters
    assert recorder.missing_extra[:first] == [(0, len(frozen))] * first
    assert recorder.missing_extra[first:] == [(0, 0)] * (160 - first)
    assert scheduler.optimizer is trainer.optimizer.optimizer is not optimizer
    expected = [[r * (1 - s / 160) for r in (LR, 1e-3, 1e-4)] for s in range(160)]
    for got, want in zip(recorder.lrs, expected, strict=True):
        assert got == pytest.approx(want, rel=1e-12)
    final = trainer.optimizer.optimizer
    assert type(final) is torch.optim.AdamW
    assert [g["weight_decay"] for g in final.param_groups] == [0.01, 0.0, 0.01]
    assert final.param_groups[2]["params"] == []
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in final.param_groups[1]["params"]} == head_names
    assert all("lora_" in names[id(p)] for p in final.param_groups[0]["params"])
    assert accuracy(controller.finish()) >= 0.9


def test_misuse_and_unsupported_settings_are_refused(tmp_path):
    # optimizer built before the controller: it misses the adapters
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    controller = APTController(model, CONFIG, total_steps=160, steps_per_epoch=20)
    trainer = Trainer(
        model=model, args=make_args(tmp_path), train_dataset=TRAIN, optimizers=(optimizer, None)
    )
    APTCallback.attach(trainer, controller)
    with pytest.raises(ValueError, match="does not hold .* trainable parameters"):
        trainer.train()

    # a callback that was never bound to its Trainer
    model = make_model()
    controller = APTController(model, CONFIG, total_steps=160, steps_per_epoch=20)
    trainer = Trainer(
        model=model, args=make_args(tmp_path), train_dataset=TRAIN, callbacks=[APTCallback(controller)]
    )
    with pytest.raises(RuntimeError, match="not bound"):
        trainer.train()

    # a schedule longer than the run
    controller_long = APTController(make_model(), CONFIG, total_steps=400, steps_per_epoch=20)
    model = controller_long.model
    trainer = Trainer(model=model, args=make_args(tmp_path, num_train_epochs=2), train_dataset=TRAIN)
    APTCallback.attach(trainer, controller_long)
    with pytest.raises(ValueError, match="prunes until step 90 but the Trainer runs only 40"):
        trainer.train()

    # a different model, fp16 loss scaling, gradient checkpointing
    other = Trainer(model=make_model(), args=make_args(tmp_path), train_dataset=TRAIN)
    with pytest.raises(ValueError, match="different model"):
        APTCallback.attach(other, controller)
    for setting, message in [
        ({"fp16": True}, "fp16"),
        (
            {"activation_checkpointing": True, "activation_checkpointing_kwargs": {"use_reentrant": True}},
            "reentrant",
        ),
    ]:
        model = make_model()
        controller = APTController(model, CONFIG, total_steps=160, steps_per_epoch=20)
        trainer = Trainer(model=model, args=make_args(tmp_path, **setting), train_dataset=TRAIN)
        with pytest.raises(UnsupportedTrainerSetup, match=message):
            APTCallback.attach(trainer, controller)
