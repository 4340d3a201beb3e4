"""APTCallback on causal-LM fine-tuning: transformers' Trainer and TRL's SFTTrainer on a tiny LLaMA (CPU, seconds).

Each run prunes to the target density, trains only the adapters, and the exported model reloads with the same
logits and the same greedy generation (with the KV cache) as the model in memory.
"""

from __future__ import annotations

import warnings
from dataclasses import fields

import pytest
import torch
from datasets import Dataset
from tiny_lm import tiny_causal_lm, tiny_tokenizer
from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

import aptune
from aptune.controller import APTController
from aptune.integrations import APTCallback, UnsupportedTrainerSetup, training_steps

try:
    import trl
except ImportError:  # an optional extra: aptune[trl]
    trl = None
needs_trl = pytest.mark.skipif(trl is None, reason="TRL is not installed (pip install aptune[trl])")

TARGET = 0.5
SLACK = 0.06  # the tiny model's blocks are coarse: one FFN group of 8 neurons is 3 % of the prunable count
# An explicit gradual schedule that fits a 12-step run (where the config has recipes, not the decoders' one-shot)
GRADUAL = {"recipe": "gradual"} if "recipe" in {f.name for f in fields(aptune.APTConfig)} else {}
CONFIG = aptune.APTConfig(
    target_density=TARGET,
    shape="per-layer",  # the tiny model's uniform shapes are too coarse to land near the target
    ffn_multiple=8,
    prune_hidden=False,
    salience_start=2,
    pruning_end=10,
    num_checkpoints=3,
    initial_rank=4,
    **GRADUAL,
)
LR = 3e-3
STEPS = 12
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A language model predicts the next token from the ones before it.",
    "Pruning removes attention heads, neurons and hidden channels.",
    "Question: what is two plus two? Answer: four.",
    "The cat sat on the mat.",
    "The dog ran in the park. Birds sing in the morning.",
    "hello, how are you today?",
    "I am fine, thank you.",
]
CHATS = [
    ("what is two plus two?", "four."),
    ("hello, how are you today?", "I am fine, thank you."),
    ("what does a language model do?", "It predicts the next token."),
    ("where did the dog run?", "In the park."),
]


def common_args(tmp_path, **overrides) -> dict:
    return {
        "output_dir": str(tmp_path / "run"),
        "use_cpu": True,
        "report_to": [],
        "save_strategy": "no",
        "logging_strategy": "no",
        "disable_tqdm": True,
        "per_device_train_batch_size": 4,
        "learning_rate": LR,
        "max_steps": STEPS,
        "seed": 0,
        **overrides,
    }


def lm_dataset(tok, n: int = 16) -> Dataset:
    """Plain causal-LM records (rows of different lengths, so batches are padded)."""
    rows = []
    for i in range(n):
        ids = tok(TEXTS[i % len(TEXTS)])["input_ids"] + [tok.eos_token_id]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)})
    return Dataset.from_list(rows)


class GradWatch(TrainerCallback):
    """Names of the parameters that required gradients at every optimizer step, and the number of steps."""

    def __init__(self, model):
        self.model = model
        self.trainable: set[str] = set()
        self.steps = 0

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.steps += 1
        self.trainable |= {n for n, p in self.model.named_parameters() if p.requires_grad}


def run_apt(trainer, config=CONFIG) -> tuple[APTController, GradWatch]:
    """The controller built after the Trainer (as SFTTrainer needs), with the Trainer's own step counts."""
    total, per_epoch = training_steps(trainer)
    assert total == STEPS
    controller = APTController(trainer.model, config, total_steps=total, steps_per_epoch=per_epoch)
    watch = GradWatch(trainer.model)
    trainer.add_callback(watch)
    callback = APTCallback.attach(trainer, controller)
    trainer.train()
    assert controller.step == trainer.state.global_step == watch.steps == STEPS
    assert callback.after_backward_calls == STEPS
    return controller, watch


def check_export(trainer, controller, watch, tok, tmp_path):
    """Only adapters trained; the density meets the target; the saved model reloads with the same outputs."""
    assert watch.trainable and all("lora_" in n for n in watch.trainable), sorted(watch.trainable)
    # under bf16, accelerate leaves the model's forward wrapped in autocast: compare full-precision forwards
    assert trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False) is controller.model
    model = controller.finish()
    assert aptune.merge_adapters(model) > 0
    model.eval()
    density = aptune.param_report(model)["density"]
    assert TARGET - SLACK <= density <= TARGET + 1e-9
    path = aptune.save_pruned(model, tmp_path / "model", tokenizer=tok)
    loaded = aptune.load_pruned(path)
    assert aptune.param_report(loaded)["density"] == pytest.approx(density)

    batch = tok(TEXTS[:4], padding=True, return_tensors="pt")
    with torch.no_grad():
        mine = model(**batch).logits
        theirs = loaded(**batch).logits
    torch.testing.assert_close(theirs, mine, rtol=0, atol=1e-5)

    prompt = tok.apply_chat_template(
        [{"role": "user", "content": CHATS[0][0]}], add_generation_prompt=True, return_tensors="pt"
    )
    prompt = {"input_ids": prompt["input_ids"], "attention_mask": prompt["attention_mask"]}
    greedy = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": tok.pad_token_id}
    with torch.no_grad():
        cached = model.generate(**prompt, use_cache=True, **greedy)
        reloaded = loaded.generate(**prompt, use_cache=True, **greedy)
        uncached = model.generate(**prompt, use_cache=False, **greedy)
    assert cached.shape[1] > prompt["input_ids"].shape[1]
    assert torch.equal(cached, reloaded)
    assert torch.equal(cached, uncached)  # the cache of a pruned model (skipped sublayers included) is right


def test_trainer_prunes_a_causal_lm_and_it_reloads(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_causal_lm()
    args = TrainingArguments(**common_args(tmp_path))
    collator = DataCollatorForSeq2Seq(tok, padding=True)
    trainer = Trainer(model=model, args=args, train_dataset=lm_dataset(tok), data_collator=collator)
    controller, watch = run_apt(trainer)
    targets = dict(zip(controller.schedule.checkpoints, controller.schedule.targets, strict=True))
    assert [r["step"] for r in controller.history] == list(controller.schedule.checkpoints)
    assert all(r["density"] <= targets[r["step"]] + 1e-9 for r in controller.history)
    check_export(trainer, controller, watch, tok, tmp_path)


def chat_dataset(n: int = 16) -> Dataset:
    return Dataset.from_list(
        [
            {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in (CHATS[i % len(CHATS)] for i in range(n))
        ]
    )


@needs_trl
def test_sft_trainer_on_chats_with_its_defaults(tmp_path):
    """SFTConfig's defaults stay on: activation checkpointing (non-reentrant), bf16 autocast, TRL's chunked
    LM-head loss; the tokenizer's ChatML template formats the conversations."""
    tok = tiny_tokenizer()
    model = tiny_causal_lm()
    args = trl.SFTConfig(**common_args(tmp_path), max_length=64)
    assert args.activation_checkpointing and args.bf16
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=chat_dataset(), processing_class=tok)
    controller, watch = run_apt(trainer)
    assert model.is_activation_checkpointing  # the Trainer did checkpoint the layers
    check_export(trainer, controller, watch, tok, tmp_path)


@needs_trl
def test_sft_trainer_on_text_with_tied_embeddings(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_causal_lm(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    args = trl.SFTConfig(**common_args(tmp_path), max_length=64, bf16=False, activation_checkpointing=False)
    text = Dataset.from_list([{"text": TEXTS[i % len(TEXTS)]} for i in range(16)])
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=text, processing_class=tok)
    controller, watch = run_apt(trainer)
    check_export(trainer, controller, watch, tok, tmp_path)


@pytest.mark.skipif(not (GRADUAL and hasattr(APTController, "calibrate")), reason="no one-shot recipe")
def test_one_shot_recipe_is_calibrated_on_the_trainers_batches(tmp_path):
    """A controller that prunes once before training is calibrated at train begin, on the Trainer's own
    batches; the optimizer is rebuilt over the pruned model before the first step."""
    tok = tiny_tokenizer()
    model = tiny_causal_lm()
    args = TrainingArguments(**common_args(tmp_path))
    collator = DataCollatorForSeq2Seq(tok, padding=True)
    trainer = Trainer(model=model, args=args, train_dataset=lm_dataset(tok), data_collator=collator)
    config = aptune.APTConfig(
        recipe="one-shot", target_density=TARGET, shape="per-layer", ffn_multiple=8, num_checkpoints=2
    )
    total, per_epoch = training_steps(trainer)
    controller = APTController(model, config, total_steps=total, steps_per_epoch=per_epoch)
    assert not controller.calibrated
    watch = GradWatch(model)
    trainer.add_callback(watch)
    callback = APTCallback.attach(trainer, controller)
    trainer.train()
    assert controller.calibrated  # on the 4 batches of the first epoch (fewer than the config asks for)
    assert controller.history[0]["step"] == 0 and controller.history[0]["density"] <= TARGET
    assert callback.rebuilds >= 1 and watch.steps == STEPS
    held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.parameters() if p.requires_grad}
    check_export(trainer, controller, watch, tok, tmp_path)


class ScoreSnapshot(TrainerCallback):
    """The controller's block-salience averages right after the last step that updates them."""

    def __init__(self, controller, step: int):
        self.controller, self.step, self.scores = controller, step, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.scores = [t.clone() for t in self.controller.scores.tensors()]


def test_checkpointed_layers_are_scored_once(tmp_path):
    """Non-reentrant activation checkpointing recomputes each layer in the backward: the salience averages
    equal those of the run without checkpointing (a second count would double the activation sums of the
    blocks it recomputes). The reentrant form is refused."""
    tok = tiny_tokenizer()
    collator = DataCollatorForSeq2Seq(tok, padding=True)
    config = aptune.APTConfig(
        target_density=TARGET,
        ffn_multiple=8,
        prune_hidden=False,
        salience_start=0,
        pruning_end=4,
        num_checkpoints=1,
        **GRADUAL,
    )
    snapshots = []
    for checkpointing in (False, True):
        model = tiny_causal_lm()
        args = TrainingArguments(**common_args(tmp_path, max_steps=4, activation_checkpointing=checkpointing))
        trainer = Trainer(model=model, args=args, train_dataset=lm_dataset(tok), data_collator=collator)
        controller = APTController(model, config, total_steps=4, steps_per_epoch=4)
        snapshot = ScoreSnapshot(controller, step=4)  # before the checkpoint of step 4 removes blocks
        trainer.add_callback(snapshot)
        APTCallback.attach(trainer, controller)
        trainer.train()
        assert model.is_activation_checkpointing == checkpointing
        snapshots.append(snapshot.scores)
    # heads and neurons; the hidden channels differ by one site: with checkpointing, transformers makes the
    # embeddings' output require gradients, so the first layer's input is scored too
    n_blocks = len(snapshots[0]) - 1
    for plain, checkpointed in zip(snapshots[0][:n_blocks], snapshots[1][:n_blocks], strict=True):
        assert bool((plain > 0).all())
        torch.testing.assert_close(checkpointed, plain, rtol=1e-4, atol=0)

    model = tiny_causal_lm()
    controller = APTController(model, config, total_steps=4, steps_per_epoch=4)
    for kwargs in ({"use_reentrant": True}, {"preserve_rng_state": True}):  # torch's default is reentrant
        args = TrainingArguments(
            **common_args(tmp_path, activation_checkpointing=True, activation_checkpointing_kwargs=kwargs)
        )
        trainer = Trainer(model=model, args=args, train_dataset=lm_dataset(tok), data_collator=collator)
        with pytest.raises(UnsupportedTrainerSetup, match="reentrant"):
            APTCallback.attach(trainer, controller)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    trainer = Trainer(
        model=model, args=TrainingArguments(**common_args(tmp_path)), train_dataset=lm_dataset(tok)
    )
    with pytest.raises(UnsupportedTrainerSetup, match="reentrant"):  # turned on on the model itself
        APTCallback.attach(trainer, controller)


@needs_trl
def test_sft_trainer_with_a_peft_config_is_refused(tmp_path):
    peft = pytest.importorskip("peft")
    tok = tiny_tokenizer()
    model = tiny_causal_lm()
    controller = APTController(model, CONFIG, total_steps=16, steps_per_epoch=4)
    args = trl.SFTConfig(**common_args(tmp_path), max_length=64, bf16=False)
    lora = peft.LoraConfig(r=4, target_modules=["o_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.SFTTrainer(
            model=model, args=args, train_dataset=chat_dataset(4), processing_class=tok, peft_config=lora
        )
    with pytest.raises(ValueError, match="peft_config"):
        APTCallback.attach(trainer, controller)


class StopAfterFirstStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = True


def test_a_trainable_lm_head_is_reported(tmp_path):
    """The pretrained LM head and embeddings are not APT's to train: unfrozen after the controller froze them
    (as resizing the embeddings for new tokens does), they are named in a warning."""
    tok = tiny_tokenizer()
    model = tiny_causal_lm()
    controller = APTController(model, CONFIG, total_steps=STEPS, steps_per_epoch=4)
    assert not any(p.requires_grad for p in model.lm_head.parameters())
    assert not any(p.requires_grad for p in model.model.embed_tokens.parameters())
    model.lm_head.weight.requires_grad_(True)
    args = TrainingArguments(**common_args(tmp_path))
    collator = DataCollatorForSeq2Seq(tok, padding=True)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=lm_dataset(tok),
        data_collator=collator,
        callbacks=[StopAfterFirstStep()],
    )
    APTCallback.attach(trainer, controller)
    with pytest.warns(UserWarning, match=r"lm_head\.weight"):
        trainer.train()
