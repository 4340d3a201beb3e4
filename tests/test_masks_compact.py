"""Masked models and their compacted copies compute the same thing; saving and loading keeps it."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import first_output, tiny_batch, tiny_model
from transformers import AutoModelForSequenceClassification

import aptune
from aptune.budget import counted_parameters

CLASSES = ["BertForSequenceClassification", "RobertaForSequenceClassification", "BertForQuestionAnswering"]


def random_binary_masks(model, seed: int, dead_attention: int | None = None, dead_ffn: int | None = None):
    """Random binary masks with heads, neurons and hidden channels off (at least one of each kept)."""
    g = torch.Generator().manual_seed(seed)
    masks = aptune.StructuralMasks.for_model(model)
    for i, m in enumerate(masks.heads):
        v = (torch.rand(len(m), generator=g) < 0.6).float()
        v[torch.randint(len(m), (1,), generator=g)] = 1.0
        masks.set_heads(i, torch.zeros(len(m)) if i == dead_attention else v)
    for i, m in enumerate(masks.neurons):
        v = (torch.rand(len(m), generator=g) < 0.5).float()
        v[0] = 1.0
        masks.set_neurons(i, torch.zeros(len(m)) if i == dead_ffn else v)
    h = (torch.rand(len(masks.hidden), generator=g) < 0.75).float()
    h[:2] = 1.0
    masks.set_hidden(h)
    return masks


@pytest.mark.parametrize("class_name", CLASSES)
@pytest.mark.parametrize("seed", [0, 1])
def test_masked_equals_compacted_and_reloaded(class_name, seed, tmp_path):
    model = tiny_model(class_name, seed=seed)
    batch = tiny_batch(seed)
    dense_out = first_output(model(**batch))
    masks = random_binary_masks(model, seed, dead_attention=1 if seed else None, dead_ffn=2 if seed else None)
    aptune.apply_masks(model, masks)
    with torch.no_grad():
        masked_out = first_output(model(**batch))
    assert not torch.allclose(masked_out, dense_out, atol=1e-3), "masks should change the outputs"

    compacted = aptune.compact(model)
    with torch.no_grad():
        compact_out = first_output(compacted(**batch))
    torch.testing.assert_close(compact_out, masked_out, atol=1e-5, rtol=0)
    assert type(compacted).__name__ == class_name

    shape = aptune.StructureShape.of(aptune.describe(compacted))
    assert list(shape.heads) == [int(m.sum()) for m in masks.heads]
    assert list(shape.neurons) == [int(m.sum()) for m in masks.neurons]
    assert shape.hidden == int(masks.hidden.sum())

    aptune.save_pruned(compacted, tmp_path / "m")
    loaded = aptune.load_pruned(tmp_path / "m")
    with torch.no_grad():
        loaded_out = first_output(loaded(**batch))
    torch.testing.assert_close(loaded_out, masked_out, atol=1e-5, rtol=0)
    assert aptune.param_report(loaded)["prunable"] == aptune.param_report(compacted)["prunable"]
    assert aptune.param_report(loaded)["prunable_before"] == aptune.param_report(compacted)["prunable_before"]


def test_soft_masks_at_one_are_bit_identical(batch):
    model = tiny_model("BertForSequenceClassification")
    with torch.no_grad():
        ref = model(**batch).logits
        aptune.apply_masks(model)  # all ones
        assert torch.equal(model(**batch).logits, ref)


def test_fractional_masks_change_outputs_smoothly(batch):
    model = tiny_model("BertForSequenceClassification")
    masks = aptune.StructuralMasks.for_model(model)
    aptune.apply_masks(model, masks)
    outs = []
    with torch.no_grad():
        for value in (1.0, 0.99, 0.5):
            masks.set_heads(0, [1.0, value, 1.0, 1.0])
            masks.set_neurons(1, torch.full((40,), value))
            outs.append(model(**batch).logits)
    step_small = (outs[1] - outs[0]).abs().max()
    step_big = (outs[2] - outs[0]).abs().max()
    assert 0 < step_small < step_big


def _layer_io(model, batch, layer):
    with torch.no_grad():
        hs = model(**batch, output_hidden_states=True).hidden_states
    return hs[layer], hs[layer + 1]


def test_dead_attention_skips_the_sublayer():
    model = tiny_model("BertForSequenceClassification")
    batch = {"input_ids": tiny_batch()["input_ids"]}  # no padding: the layer needs no attention mask here
    x, _ = _layer_io(model, batch, 1)
    layer = model.bert.encoder.layer[1]
    with torch.no_grad():
        expected = layer.feed_forward_chunk(x)  # the FFN alone, on the untouched input
    masks = aptune.StructuralMasks.for_model(model)
    masks.set_heads(1, torch.zeros(4))
    aptune.apply_masks(model, masks)
    x_masked, y_masked = _layer_io(model, batch, 1)
    assert torch.equal(x_masked, x)
    assert torch.equal(y_masked, expected)


def test_dead_ffn_skips_the_sublayer():
    model = tiny_model("BertForSequenceClassification")
    batch = {"input_ids": tiny_batch()["input_ids"]}
    x, _ = _layer_io(model, batch, 2)
    with torch.no_grad():
        expected = model.bert.encoder.layer[2].attention(x)[0]  # attention alone
    masks = aptune.StructuralMasks.for_model(model)
    masks.set_neurons(2, torch.zeros(40))
    aptune.apply_masks(model, masks)
    _, y = _layer_io(model, batch, 2)
    assert torch.equal(y, expected)


def test_uniform_structure_loads_with_plain_from_pretrained(tmp_path, batch):
    model = tiny_model("BertForSequenceClassification")
    masks = aptune.StructuralMasks.for_model(model)
    # 2 of 4 heads in every layer and hidden 32 -> 16 = 2 heads x 8: expressible in a stock BERT config
    for i in range(3):
        masks.set_heads(i, [1, 0, 0, 1] if i != 1 else [0, 1, 1, 0])
        masks.set_neurons(i, (torch.arange(40) % 4 < 2).float())  # 20 neurons everywhere
    masks.set_hidden((torch.arange(32) % 2 == 0).float())
    aptune.apply_masks(model, masks)
    with torch.no_grad():
        masked_out = model(**batch).logits
    aptune.save_pruned(aptune.compact(model), tmp_path / "m")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    assert plain.config.hidden_size == 16 and plain.config.intermediate_size == 20
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, masked_out, atol=1e-5, rtol=0)


def test_non_uniform_structure_refuses_plain_loading(tmp_path):
    model = tiny_model("BertForSequenceClassification")
    masks = random_binary_masks(model, seed=3)
    aptune.save_pruned(aptune.compact(model, masks), tmp_path / "m")
    assert aptune.read_structure(tmp_path / "m").plain_loadable is False
    with pytest.raises(RuntimeError):  # a size mismatch, never silently re-initialised weights
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "m")
    aptune.load_pruned(tmp_path / "m")


def test_compact_twice_keeps_the_original_as_reference(batch):
    model = tiny_model("BertForSequenceClassification")
    before = aptune.param_report(model)["prunable"]
    masks = aptune.StructuralMasks.for_model(model)
    masks.set_heads(0, [1, 1, 0, 1])
    aptune.compact(model, masks)
    masks = aptune.StructuralMasks.for_model(model)
    masks.set_neurons(0, (torch.arange(40) < 10).float())
    aptune.compact(model, masks)
    report = aptune.param_report(model)
    assert report["prunable_before"] == before
    assert report["prunable"] == sum(p.numel() for p in counted_parameters(aptune.describe(model)))


def test_masks_state_round_trip():
    model = tiny_model("BertForSequenceClassification")
    masks = random_binary_masks(model, seed=5)
    masks.set_heads(0, [0.25, 1, 0.5, 0])
    again = aptune.StructuralMasks.from_state_dict(copy.deepcopy(masks.state_dict()))
    for a, b in zip(again.all_tensors(), masks.all_tensors(), strict=True):
        assert torch.equal(a, b)
