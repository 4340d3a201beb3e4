"""The chunked causal-LM loss (:mod:`aptune.tasks.lm_loss`): the model's own loss and gradients without the
logits, for every decoder family it applies to, and the model's own forward for every call that needs more."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_batch, tiny_model
from tiny_lm import tiny_family_lm

from aptune.tasks.lm_loss import (
    chunked_loss_unsupported,
    lm_head_loss,
    use_chunked_loss,
    use_model_loss,
    uses_chunked_loss,
)


def lm(family: str, seed: int = 0):
    if family in ("llama", "qwen2", "mistral"):
        name = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}[family]
        return tiny_model(f"{name}ForCausalLM", seed=seed)
    return tiny_family_lm(family, seed=seed)


def chat_like_batch(seed: int = 1):
    """Padding in one row and labels on part of each row only (the assistant's tokens)."""
    b = tiny_batch(seed=seed, batch=3, length=11)
    labels = b["input_ids"].clone()
    labels[:, :4] = -100
    labels[b["attention_mask"] == 0] = -100
    return {**b, "labels": labels}


def loss_and_grads(model, batch, **kwargs):
    model.zero_grad()
    out = model(**batch, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "qwen3", "gemma", "gemma3", "phi3"])
def test_same_loss_and_gradients_as_the_models_own(family):
    model = lm(family).train()
    batch = chat_like_batch()
    own, own_grads = loss_and_grads(model, batch)
    assert use_chunked_loss(model)
    chunked, grads = loss_and_grads(model, batch)
    assert chunked.logits is None  # no vocabulary-sized tensor was returned
    assert torch.allclose(chunked.loss, own.loss, rtol=1e-5, atol=1e-6), (chunked.loss, own.loss)
    assert grads.keys() == own_grads.keys()
    for name, g in grads.items():
        assert torch.allclose(g, own_grads[name], rtol=1e-4, atol=1e-6), name


def test_frozen_head_and_num_items_in_batch():
    """The usual fine-tuning case (the head frozen, only part of the model trains) and a trainer's
    ``num_items_in_batch`` (the loss is the sum over that count)."""
    model = tiny_model("LlamaForCausalLM").train()
    for name, p in model.named_parameters():
        p.requires_grad_("layers.2" in name)
    batch = chat_like_batch(seed=3)
    own, own_grads = loss_and_grads(model, batch, num_items_in_batch=torch.tensor(40))
    use_chunked_loss(model)
    chunked, grads = loss_and_grads(model, batch, num_items_in_batch=torch.tensor(40))
    assert torch.allclose(chunked.loss, own.loss, rtol=1e-5)
    assert grads.keys() == own_grads.keys() and all("layers.2" in n for n in grads)
    for name, g in grads.items():
        assert torch.allclose(g, own_grads[name], rtol=1e-4, atol=1e-6), name


def test_bf16_autocast_loss_close_to_the_models_own():
    model = tiny_model("LlamaForCausalLM").train()
    batch = chat_like_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        own = model(**batch).loss
        use_chunked_loss(model)
        chunked = model(**batch).loss
    assert chunked.dtype == torch.float32
    assert abs(chunked.item() - own.item()) < 0.02 * own.item()


def test_calls_that_need_logits_get_the_models_own_forward():
    model = tiny_model("LlamaForCausalLM")
    batch = chat_like_batch()
    own = model(**batch)
    use_chunked_loss(model)
    no_labels = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert torch.equal(no_labels.logits, own.logits)
    hidden = model(**batch, output_hidden_states=True)  # self-distillation reads the student's logits
    assert torch.equal(hidden.logits, own.logits) and hidden.hidden_states is not None
    last = model(input_ids=batch["input_ids"], logits_to_keep=1)
    assert last.logits.shape[1] == 1
    generated = model.generate(input_ids=batch["input_ids"][:1], max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, batch["input_ids"].shape[1] + 3)


def test_a_deep_copy_runs_its_own_weights_and_the_switch_undoes():
    model = tiny_model("LlamaForCausalLM")
    batch = chat_like_batch()
    use_chunked_loss(model)
    teacher = copy.deepcopy(model)  # how the last distillation phase copies the model
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(0.5)
    assert uses_chunked_loss(teacher)
    assert not torch.allclose(teacher(**batch).loss, model(**batch).loss)
    use_chunked_loss(teacher)
    use_model_loss(teacher)
    assert not uses_chunked_loss(teacher) and teacher(**batch).logits is not None
    assert uses_chunked_loss(model)


def test_refused_where_it_does_not_apply():
    softcapped = tiny_family_lm("gemma2")  # soft-capped logits: tanh between head and loss
    assert "soft-caps" in chunked_loss_unsupported(softcapped)
    assert not use_chunked_loss(softcapped) and not uses_chunked_loss(softcapped)
    encoder = tiny_model("BertForSequenceClassification")
    assert "model type 'bert'" in chunked_loss_unsupported(encoder)


def test_no_labelled_token_is_nan_like_the_models_own():
    head = torch.nn.Linear(4, 7, bias=False)
    loss = lm_head_loss(torch.randn(1, 3, 4), head, torch.full((1, 3), -100))
    assert torch.isnan(loss)


def test_hugging_face_trainer_trains_the_same_with_it(tmp_path):
    """Trainer reads the forward's signature to keep dataset columns and hands ``num_items_in_batch`` to a forward
    with ``**kwargs``: both must still work, and training must give the same weights as the model's own loss."""
    import inspect

    from datasets import Dataset
    from tiny_lm import tiny_causal_lm, tiny_tokenizer
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    tok = tiny_tokenizer()
    rows = []
    for i in range(8):
        ids = tok(f"row {i}: the quick brown fox " + "jumps " * (i % 3))["input_ids"]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids), "note": "x"})

    def run(chunked: bool):
        model = tiny_causal_lm(seed=0)
        if chunked:
            assert use_chunked_loss(model)
            assert {"input_ids", "attention_mask", "labels"} <= set(
                inspect.signature(model.forward).parameters
            )
        args = TrainingArguments(
            output_dir=str(tmp_path / f"run-{chunked}"),
            use_cpu=True,
            report_to=[],
            save_strategy="no",
            disable_tqdm=True,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,  # the Trainer passes num_items_in_batch
            learning_rate=1e-3,
            max_steps=3,
            seed=0,
        )
        collate = DataCollatorForSeq2Seq(tok, padding=True)
        trainer = Trainer(
            model=model, args=args, train_dataset=Dataset.from_list(rows), data_collator=collate
        )
        trainer.train()
        return model

    own, chunked = run(False), run(True)
    # Adam divides by the root of the squared gradients: where a gradient is near 0, rounding differences of
    # 1e-7 in it move the step by up to 1e-4 (lr 1e-3); everywhere else the weights agree to 2e-7
    for (name, a), b in zip(own.state_dict().items(), chunked.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-4), name
    assert not torch.allclose(own.lm_head.weight, tiny_causal_lm(seed=0).lm_head.weight)  # it trained


def test_validation_perplexity_without_logits_equals_the_full_computation():
    """labelled_perplexity takes the path without logits for a model and for a PEFT model (through its base
    model, adapters included); both equal the perplexity from the whole logits."""
    import math

    from peft import LoraConfig, get_peft_model

    from aptune.tasks.causal_lm import labelled_perplexity

    batches = [chat_like_batch(seed=s) for s in (1, 2)]

    def from_logits(model):
        total = count = 0
        with torch.no_grad():
            for b in batches:
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
                target = b["labels"][:, 1:]
                total += torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
                ).item()
                count += int((target != -100).sum())
        return math.exp(total / count)

    model = tiny_model("LlamaForCausalLM")
    assert chunked_loss_unsupported(model) is None
    assert labelled_perplexity(model, batches) == pytest.approx(from_logits(model), rel=1e-5)
    peft = get_peft_model(
        tiny_model("LlamaForCausalLM"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_()  # adapters that change the outputs
    assert "PEFT" in chunked_loss_unsupported(peft)
    assert labelled_perplexity(peft, batches) == pytest.approx(from_logits(peft), rel=1e-5)
    assert labelled_perplexity(peft, batches) != pytest.approx(labelled_perplexity(model, batches), rel=1e-3)


@pytest.mark.parametrize("older_pytorch", [False, True])
def test_many_chunks_give_the_same_loss_and_gradients(monkeypatch, older_pytorch):
    """Chunks of 4 tokens, with PyTorch's linear_cross_entropy and with the checkpointed chunks an older
    PyTorch gets."""
    import aptune.tasks.lm_loss as lm_loss

    if older_pytorch:
        monkeypatch.delattr(torch.nn.functional, "linear_cross_entropy")
    monkeypatch.setattr(lm_loss, "MIN_ROWS", 4)
    monkeypatch.setattr(lm_loss, "CHUNK_BYTES", {"cpu": 1, "cuda": 1})
    assert lm_loss.chunk_rows(97, "cpu") == 4
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 97, bias=True)
    hidden = torch.randn(3, 23, 16, requires_grad=True)
    labels = torch.randint(0, 97, (3, 23))
    labels[0, :5] = -100
    loss = lm_loss.lm_head_loss(hidden, head, labels)  # 3 x 22 - 5 = 61 labelled tokens: 16 chunks
    (g_hidden, g_weight) = torch.autograd.grad(loss, [hidden, head.weight])
    logits = head(hidden)[:, :-1]
    ref = torch.nn.functional.cross_entropy(
        logits.reshape(-1, 97), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    r_hidden, r_weight = torch.autograd.grad(ref, [hidden, head.weight])
    assert torch.allclose(loss, ref, rtol=1e-6)
    assert torch.allclose(g_hidden, r_hidden, atol=1e-7) and torch.allclose(g_weight, r_weight, atol=1e-7)


def test_an_older_pytorch_trains_the_same(monkeypatch):
    model = tiny_model("LlamaForCausalLM").train()
    batch = chat_like_batch()
    own, own_grads = loss_and_grads(model, batch)
    monkeypatch.delattr(torch.nn.functional, "linear_cross_entropy")
    assert use_chunked_loss(model)
    chunked, grads = loss_and_grads(model, batch)
    assert chunked.logits is None and torch.allclose(chunked.loss, own.loss, rtol=1e-6)
    for name, g in grads.items():
        assert torch.allclose(g, own_grads[name], rtol=1e-4, atol=1e-6), name
