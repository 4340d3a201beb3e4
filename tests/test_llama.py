"""LLaMA-family decoders (LLaMA, Qwen2, Mistral) with grouped-query attention: masks, compaction, budget,
salience, selection, saving and loading, and every training method end to end on a tiny classifier.

The tiny decoders have 4 query heads in 2 key/value groups (head size 8): a head unit is one key/value head
with its 2 query heads.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import first_output, tiny_batch, tiny_model
from test_baselines import run_method
from test_train_cli import make_tiny_folder
from transformers import AutoModelForCausalLM

import aptune
from aptune.arch import describe
from aptune.budget import StructureShape, count_prunable, counted_parameters, head_cost, hidden_cost
from aptune.methods.structure import group_scores, selection_masks
from aptune.salience import SalienceCollector
from aptune.selection import select_blocks

DECODERS = ["LlamaForCausalLM", "Qwen2ForSequenceClassification", "MistralForCausalLM"]


def decoder_masks(model, seed: int):
    """Binary masks that drop a head unit in layer 0, every head of layer 1, every neuron of layer 2, some
    neurons elsewhere and a quarter of the hidden channels."""
    g = torch.Generator().manual_seed(seed)
    masks = aptune.StructuralMasks.for_model(model)
    masks.set_heads(0, [1.0, 0.0] if seed % 2 else [0.0, 1.0])
    masks.set_heads(1, [0.0, 0.0])
    for i, m in enumerate(masks.neurons):
        v = (torch.rand(len(m), generator=g) < 0.5).float()
        v[0] = 1.0
        masks.set_neurons(i, torch.zeros(len(m)) if i == 2 else v)
    hidden = (torch.rand(len(masks.hidden), generator=g) < 0.75).float()
    hidden[:2] = 1.0
    masks.set_hidden(hidden)
    return masks


@pytest.mark.parametrize("class_name", DECODERS)
@pytest.mark.parametrize("tie", [False, True])
def test_masked_equals_compacted_and_reloaded(class_name, tie, tmp_path):
    model = tiny_model(class_name, seed=int(tie), tie_word_embeddings=tie)
    structure = describe(model)
    assert [(s.num_heads, s.num_kv_heads, s.num_units, s.unit_width) for s in structure.attention] == [
        (4, 2, 2, 16)
    ] * 3
    batch = tiny_batch(seed=2)
    with torch.no_grad():
        dense = first_output(model(**batch))
    masks = decoder_masks(model, seed=int(tie))
    aptune.apply_masks(model, masks)
    with torch.no_grad():
        masked = first_output(model(**batch))
    assert not torch.allclose(masked, dense, atol=1e-3), "masks should change the outputs"

    compacted = aptune.compact(model)
    with torch.no_grad():
        torch.testing.assert_close(first_output(compacted(**batch)), masked, atol=1e-5, rtol=0)
    shape = StructureShape.of(describe(compacted))
    assert shape.heads == (2, 0, 4) and shape.units == (1, 0, 2)  # whole groups: the group size stays 2
    assert shape.neurons == (int(masks.neurons[0].sum()), int(masks.neurons[1].sum()), 0)
    assert shape.hidden == int(masks.hidden.sum())
    layer0 = compacted.model.layers[0].self_attn
    assert layer0.q_proj.out_features == 16 and layer0.k_proj.out_features == 8
    if tie and hasattr(compacted, "lm_head"):
        assert compacted.lm_head.weight is compacted.model.embed_tokens.weight
    # the budget counts exactly the live tensors
    report = aptune.param_report(compacted)
    assert report["prunable"] == count_prunable(shape)
    assert report["prunable"] == sum(p.numel() for p in counted_parameters(describe(compacted)))

    aptune.save_pruned(compacted, tmp_path / "m")
    loaded = aptune.load_pruned(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(first_output(loaded(**batch)), masked, atol=1e-5, rtol=0)
    assert aptune.param_report(loaded)["prunable_before"] == report["prunable_before"]
    if tie and hasattr(loaded, "lm_head"):
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_hidden_mask_alone_uses_rms_statistics_of_kept_channels():
    """With only hidden channels off, the masked model equals its compacted copy (RMS over kept channels)."""
    model = tiny_model("LlamaForCausalLM")
    masks = aptune.StructuralMasks.for_model(model)
    masks.set_hidden((torch.arange(32) % 3 != 0).float())
    aptune.apply_masks(model, masks)
    batch = tiny_batch(seed=4)
    with torch.no_grad():
        masked = model(**batch).logits
        compacted = aptune.compact(model)
        torch.testing.assert_close(compacted(**batch).logits, masked, atol=1e-5, rtol=0)
    assert compacted.model.norm.weight.shape == (21,)


def test_costs_equal_the_parameters_that_removal_frees():
    model = tiny_model("Qwen2ForSequenceClassification")  # q/k/v biases, no o bias
    shape = StructureShape.of(describe(model))
    before = aptune.param_report(model)["prunable"]
    assert before == count_prunable(shape)
    unit = head_cost(shape, 0)
    masks = aptune.StructuralMasks.for_model(model)
    masks.set_heads(0, [1.0, 0.0])
    aptune.compact(model, masks)
    assert before - aptune.param_report(model)["prunable"] == unit
    # one unit = 2 query heads + 1 key/value head: rows of q (16) k (8) v (8) with biases, 16 columns of o
    assert unit == 32 * (16 + 8 + 8) + (16 + 8 + 8) + 16 * 32
    # one hidden channel: a column of every q/k/v/gate/up, a row of every o/down, an entry of every norm
    channel = hidden_cost(StructureShape.of(describe(model)))
    before = aptune.param_report(model)["prunable"]
    masks = aptune.StructuralMasks.for_model(model)
    masks.set_hidden((torch.arange(32) != 5).float())
    aptune.compact(model, masks)
    assert before - aptune.param_report(model)["prunable"] == channel
    assert (
        channel == (16 + 8 + 8 + 16) + 2 * (32 + 16 + 16 + 32) + 3 * (40 + 40 + 40) + 6
    )  # layer 0: one unit


def test_selection_keeps_whole_groups_under_the_budget():
    model = tiny_model("LlamaForCausalLM")
    shape = StructureShape.of(describe(model))
    g = torch.Generator().manual_seed(0)
    heads = [torch.rand(2, generator=g) for _ in range(3)]
    neurons = [torch.rand(40, generator=g) for _ in range(3)]
    hidden = torch.rand(32, generator=g)
    target = int(0.5 * count_prunable(shape))
    sel = select_blocks(shape, heads, neurons, hidden, target_params=target, ffn_multiple=8)
    assert sel.params <= target and sel.params == count_prunable(sel.shape)
    assert all(len(k) == 2 for k in sel.heads)
    assert sel.shape.heads == tuple(2 * int(k.sum()) for k in sel.heads)
    assert sel.shape.units == tuple(int(k.sum()) for k in sel.heads)
    # the masks of the selection cut the model to exactly the counted shape
    aptune.compact(model, selection_masks(sel))
    assert aptune.param_report(model)["prunable"] == sel.params


def test_salience_scores_one_value_per_unit():
    model = tiny_model("LlamaForSequenceClassification")
    with torch.no_grad():  # unit 1 of layer 0 reads a zero value head: its context, hence its score, is 0
        model.model.layers[0].self_attn.v_proj.weight[8:16] = 0
    for p in model.parameters():
        p.requires_grad_(True)
    collector = SalienceCollector(model, describe(model))
    collector.start()
    batch = {**tiny_batch(seed=3), "labels": torch.tensor([0, 1, 2])}
    model(**batch).loss.backward()
    scores = collector.scores()
    assert [len(h) for h in scores.heads] == [2, 2, 2]
    assert scores.heads[0][1] == 0 and scores.heads[0][0] > 0
    assert all(bool((h > 0).all()) for h in scores.heads[1:])
    assert len(scores.hidden) == 32 and bool((scores.hidden > 0).all())


def test_group_scores_sum_each_units_rows_and_columns():
    model = tiny_model("Qwen2ForSequenceClassification")
    heads, _ = group_scores(model, lambda lin: (lin.weight.detach().abs(), None))
    model.requires_grad_(False)
    for site, got in zip(describe(model).attention, heads, strict=True):
        want = []
        for u in range(2):
            q = site.q.weight[u * 16 : (u + 1) * 16].abs().sum()
            kv = sum(p.weight[u * 8 : (u + 1) * 8].abs().sum() for p in (site.k, site.v))
            o = site.o.weight[:, u * 16 : (u + 1) * 16].abs().sum()
            want.append(float(q + kv + o))
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=0)


def test_uniform_structure_loads_with_plain_from_pretrained(tmp_path):
    model = tiny_model("LlamaForCausalLM", tie_word_embeddings=True)
    masks = aptune.StructuralMasks.for_model(model)
    for i in range(3):
        masks.set_heads(i, [0.0, 1.0] if i == 1 else [1.0, 0.0])
        masks.set_neurons(i, (torch.arange(40) % 2 == 0).float())
    masks.set_hidden((torch.arange(32) < 24).float())  # 24 != heads x head size (16): config.head_dim says 8
    aptune.apply_masks(model, masks)
    batch = tiny_batch(seed=6)
    with torch.no_grad():
        masked = model(**batch).logits
    aptune.save_pruned(aptune.compact(model), tmp_path / "m")
    assert aptune.read_structure(tmp_path / "m").plain_loadable
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    config = plain.config
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (24, 2, 1)
    assert (config.intermediate_size, config.head_dim) == (20, 8)
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, masked, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    return make_tiny_folder(tmp_path_factory.mktemp("llama"), "LlamaForSequenceClassification")


@pytest.mark.parametrize(
    "method, extra",
    [
        ("apt", ["--epochs", "3", "--num-checkpoints", "4", "--learning-rate", "3e-3"]),
        ("apt", ["--epochs", "3", "--num-checkpoints", "4", "--distill"]),  # off by default for decoders
        ("lora-prune", ["--epochs", "1", "--pretune-epochs", "1", "--calibration-batches", "2"]),
        ("loraprune", ["--epochs", "3", "--iterative-steps", "4"]),
        ("llm-pruner", ["--epochs", "1", "--calibration-batches", "2"]),
    ],
)
def test_every_pruning_method_trains_a_gqa_decoder(llama_folder, method, extra, monkeypatch):
    report, out, _, final = run_method(
        llama_folder, method, "--density", "0.5", *extra, monkeypatch=monkeypatch
    )
    before, after = report["params_before"], report["params_after"]
    assert before["family"] == "llama"
    target = int(0.5 * before["prunable"])
    assert after["prunable"] <= target
    model = aptune.load_pruned(out / "model")
    shape = StructureShape.of(describe(model))
    assert all(a.heads == 2 * a.kv_heads for a in shape.attention)  # groups stay whole
    assert count_prunable(shape) == after["prunable"]
    batch = tiny_batch(seed=5, batch=4, vocab=20)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, final.eval()(**batch).logits, rtol=1e-5, atol=1e-6)


def test_cli_info_shows_key_value_heads(tmp_path, capsys):
    from aptune.cli import main

    model = tiny_model("MistralForCausalLM")
    masks = aptune.StructuralMasks.for_model(model)
    masks.set_heads(2, [0.0, 1.0])
    aptune.save_pruned(aptune.compact(model, masks), tmp_path / "m")
    assert main(["info", str(tmp_path / "m"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (
        info["heads"] == [4, 4, 2] and info["kv_heads"] == [2, 2, 1] and info["kv_heads_before"] == [2, 2, 2]
    )
    assert main(["info", str(tmp_path / "m")]) == 0
    table = capsys.readouterr().out
    assert "kv heads" in table and re.search(
        r"\n\s+2\s+2/4\s+1/2\s", table
    )  # layer 2: 2 of 4 heads, 1 of 2 kv
