"""APT end to end on a tiny BERT: it learns while pruning, meets the budget, and its state round-trips."""

from __future__ import annotations

from dataclasses import replace

import torch
from conftest import tiny_model

import aptune
from aptune.adapter import APTLinear
from aptune.budget import StructureShape, count_prunable
from aptune.config import APTConfig, ConfigError
from aptune.controller import APTController

# 160 steps: salience from step 10, four checkpoints up to step 90, density 0.5, FFN widths in multiples of 8
SMALL_SCHEDULE = APTConfig(
    target_density=0.5,
    ffn_multiple=8,
    num_checkpoints=4,
    salience_start=10,
    pruning_end=90,
    warmup_end=20,
    decay_window=16,
)


def synthetic_batches(n_batches: int, seed: int, batch: int = 16, length: int = 10):
    """Class 0 uses tokens 2..39, class 1 tokens 40..79: separable, but only by reading the tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        labels = torch.randint(0, 2, (batch,), generator=g)
        low = torch.randint(2, 40, (batch, length), generator=g)
        high = torch.randint(40, 80, (batch, length), generator=g)
        ids = torch.where(labels[:, None] == 1, high, low)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def run_apt(model, controller, batches, epochs: int, lr: float = 3e-3):
    optimizer = torch.optim.AdamW(controller.trainable_parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for batch in batches:
            controller.before_forward()
            controller.compute_loss(batch).backward()
            controller.after_backward()
            optimizer.step()
            optimizer.zero_grad()
            if controller.after_step():
                optimizer = torch.optim.AdamW(controller.trainable_parameters(), lr=lr)
    model.eval()


def accuracy(model, batches) -> float:
    with torch.no_grad():
        right = sum(int((model(**b).logits.argmax(-1) == b["labels"]).sum()) for b in batches)
    return right / sum(len(b["labels"]) for b in batches)


def test_tiny_bert_learns_while_pruning_to_half_density():
    model = tiny_model(
        "BertForSequenceClassification", num_labels=2, initializer_range=0.05, intermediate_size=64
    )
    train, valid = synthetic_batches(20, seed=0), synthetic_batches(8, seed=1)
    controller = APTController(model, SMALL_SCHEDULE, total_steps=160, steps_per_epoch=20)
    base = controller.base_params
    run_apt(model, controller, train, epochs=8)

    # the budget is met after every checkpoint, and the final structure is physically pruned
    targets = dict(zip(controller.schedule.checkpoints, controller.schedule.targets, strict=True))
    for record in controller.history:
        assert record["density"] <= targets[record["step"]] + 1e-9
    model = controller.finish()
    shape = StructureShape.of(aptune.describe(model))
    assert count_prunable(shape) <= 0.5 * base
    assert all(n % 8 == 0 for n in shape.neurons)
    # ranks grew where the budget allowed, never above the cap
    assert max(a.rank for a in controller.adapters) > 8
    assert all(a.rank <= 64 for a in controller.adapters)
    assert accuracy(model, valid) >= 0.9


def test_controller_state_round_trips():
    model = tiny_model("BertForSequenceClassification", num_labels=2, intermediate_size=64)
    config = APTConfig(
        target_density=0.6,
        ffn_multiple=8,
        num_checkpoints=2,
        salience_start=2,
        pruning_end=30,
        warmup_end=4,
        decay_window=8,
    )
    controller = APTController(model, config, total_steps=40, steps_per_epoch=10)
    run_apt(model, controller, synthetic_batches(5, seed=2), epochs=1)
    state = controller.state_dict()

    twin = tiny_model("BertForSequenceClassification", num_labels=2, intermediate_size=64)
    other = APTController(twin, config, total_steps=40, steps_per_epoch=10)
    other.load_state_dict(state)
    again = other.state_dict()
    assert again["step"] == state["step"] == 5
    for key in ("masks", "scores"):
        for name, tensor in state[key].items():
            assert torch.equal(again[key][name], tensor), (key, name)
    assert again["ranks"] == state["ranks"]
    assert all(torch.equal(a, b) for a, b in zip(again["rank_scores"], state["rank_scores"], strict=True))


def test_adapters_and_trainable_parameters():
    model = tiny_model("BertForSequenceClassification", num_labels=2)
    controller = APTController(model, APTConfig(), total_steps=400, steps_per_epoch=100)
    adapters = [m for m in model.modules() if isinstance(m, APTLinear)]
    assert len(adapters) == 3 * 3  # q, v, FFN up in 3 layers
    trainable = {id(p) for p in controller.trainable_parameters()}
    assert all(id(a.lora_A) in trainable and id(a.lora_B) in trainable for a in adapters)
    assert all(id(p) in trainable for p in model.classifier.parameters())
    assert not any(id(a.base.weight) in trainable for a in adapters)


def test_every_checkpoint_below_density_one_removes_blocks_physically():
    """Finding 2: with checkpoint intervals equal to the decay window, the next window opens on each
    checkpoint's step; the checkpoint must still remove the blocks its window dropped before decay resumes."""
    model = tiny_model(
        "BertForSequenceClassification", num_labels=2, initializer_range=0.05, intermediate_size=64
    )
    config = replace(SMALL_SCHEDULE, decay_window=20, distill=False)  # intervals of 20 steps
    controller = APTController(model, config, total_steps=120, steps_per_epoch=20)
    schedule = controller.schedule
    assert schedule.windows[1][0] == schedule.checkpoints[0]  # the situation of the bug
    targets = dict(zip(schedule.checkpoints, schedule.targets, strict=True))
    optimizer = torch.optim.AdamW(controller.trainable_parameters(), lr=3e-3)
    removed_at = []
    model.train()
    for batch in synthetic_batches(20, seed=0) * 6:
        controller.before_forward()
        controller.compute_loss(batch).backward()
        controller.after_backward()
        optimizer.step()
        optimizer.zero_grad()
        before = count_prunable(StructureShape.of(aptune.describe(controller.model)))
        if controller.after_step():
            optimizer = torch.optim.AdamW(controller.trainable_parameters(), lr=3e-3)
        after = count_prunable(StructureShape.of(aptune.describe(controller.model)))
        if controller.step in targets and targets[controller.step] < 1:
            # the budget is met by the physical structure, not by masks waiting for a later checkpoint
            assert after <= targets[controller.step] * controller.base_params, controller.step
            if after < before:
                removed_at.append(controller.step)
    assert len(removed_at) >= 2, removed_at


def test_only_new_task_layers_train_besides_the_adapters():
    """Finding 3: BERT's pretrained pooler stays frozen; the new classifier trains; the same for every
    adapter baseline and for PEFT's LoRA."""
    from aptune.methods import BaselineConfig, build_method

    def trained_heads(model, params) -> set[str]:
        ids = {id(p) for p in params}
        return {n.split(".")[0] for n, p in model.named_parameters() if id(p) in ids and "lora_" not in n}

    model = tiny_model("BertForSequenceClassification", num_labels=2)
    assert model.bert.pooler is not None
    controller = APTController(
        model, replace(SMALL_SCHEDULE, distill=False), total_steps=160, steps_per_epoch=20
    )
    assert trained_heads(model, controller.trainable_parameters()) == {"classifier"}
    for name in ("lora", "lora-prune", "loraprune", "llm-pruner"):
        model = tiny_model("BertForSequenceClassification", num_labels=2)
        method = build_method(
            name,
            model,
            total_steps=100,
            steps_per_epoch=20,
            apt=APTConfig(),
            baseline=BaselineConfig(),
            lora_rank=8,
            lora_targets=None,
            calibration=None,
        )
        names = {n for n, p in method.model.named_parameters() if p.requires_grad and "lora_" not in n}
        assert names and all("classifier" in n for n in names), (name, names)
    llama = tiny_model("LlamaForSequenceClassification")
    controller = APTController(
        llama, replace(SMALL_SCHEDULE, distill=False), total_steps=160, steps_per_epoch=20
    )
    assert trained_heads(llama, controller.trainable_parameters()) == {"score"}


def test_bad_config_is_refused():
    for kwargs, message in [
        ({"target_density": 0.0}, "target_density"),
        ({"target_density": 1.5}, "target_density"),
        ({"adapter_targets": ("q", "x")}, "unknown adapter targets"),
        ({"initial_rank": 80}, "initial_rank"),
    ]:
        try:
            APTConfig(**kwargs)
        except ConfigError as e:
            assert message in str(e)
        else:
            raise AssertionError(f"{kwargs} was accepted")
    assert APTConfig.from_dict(APTConfig(target_density=0.3).to_dict()) == APTConfig(target_density=0.3)
