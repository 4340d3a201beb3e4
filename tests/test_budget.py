"""The budget counts exactly what compaction leaves, and per-block costs follow the method spec (§3.3)."""

from __future__ import annotations

from conftest import tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aptune
from aptune.budget import (
    AttentionShape,
    FFNShape,
    StructureShape,
    count_prunable,
    counted_parameters,
    head_cost,
    hidden_cost,
    neuron_cost,
)


def bert_shape(layers: int, hidden: int, heads: int, head_dim: int, ffn: int) -> StructureShape:
    return StructureShape(
        hidden,
        tuple(AttentionShape(heads, heads, head_dim) for _ in range(layers)),
        tuple(FFNShape(ffn) for _ in range(layers)),
    )


def test_roberta_base_count_matches_the_reference_figure():
    # method spec §3.3: RoBERTa-base counts 85,054,464 prunable parameters
    shape = bert_shape(12, 768, 12, 64, 3072)
    assert count_prunable(shape) == 85_054_464
    # code formula: total = D'(4 N_h d_h + 2 N_f + 6L) + 3 N_h d_h + N_f
    assert count_prunable(shape) == 768 * (4 * 144 * 64 + 2 * 12 * 3072 + 6 * 12) + 3 * 144 * 64 + 12 * 3072


def test_block_costs_follow_the_spec_formulas():
    shape = bert_shape(12, 768, 12, 64, 3072)
    assert head_cost(shape, 0) == 4 * 768 * 64 + 3 * 64
    assert neuron_cost(shape, 5) == 2 * 768 + 1
    # one hidden channel: 4 (#heads kept) d_h + 2 (#neurons kept) + 6L
    assert hidden_cost(shape) == 4 * 144 * 64 + 2 * 12 * 3072 + 6 * 12


def test_last_head_of_a_layer_frees_its_whole_sublayer():
    shape = bert_shape(2, 32, 1, 8, 40)
    sublayer = 4 * 32 * 8 + 3 * 8 + 32 + 2 * 32  # projections, q/k/v biases, o bias, LayerNorm
    assert head_cost(shape, 0) == sublayer


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_count_equals_numel_of_compacted_model(data):
    model = tiny_model("BertForSequenceClassification", seed=data.draw(st.integers(0, 3)))
    masks = aptune.StructuralMasks.for_model(model)
    for i in range(len(masks.heads)):
        masks.set_heads(i, data.draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=4, max_size=4)))
        masks.set_neurons(i, data.draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=40, max_size=40)))
    hidden = data.draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=32, max_size=32))
    hidden[0] = 1.0  # at least one channel survives
    masks.set_hidden(hidden)
    expected_heads = [int(m.sum()) for m in masks.heads]
    aptune.compact(model, masks)
    structure = aptune.describe(model)
    shape = StructureShape.of(structure)
    assert list(shape.heads) == expected_heads
    assert count_prunable(shape) == sum(p.numel() for p in counted_parameters(structure))
    report = aptune.param_report(model)
    assert report["total"] == sum(p.numel() for p in model.parameters())
    assert (
        report["prunable"] + report["embeddings"] + report["task_head"] + report["adapters"]
        == report["total"]
    )


def test_report_on_a_dense_model():
    model = tiny_model("RobertaForSequenceClassification")
    report = aptune.param_report(model)
    assert report["density"] == 1.0
    assert report["prunable"] == sum(p.numel() for p in model.roberta.encoder.parameters())
    assert report["task_head"] == sum(p.numel() for p in model.classifier.parameters())
    assert (
        report["prunable"] + report["embeddings"] + report["task_head"] + report["adapters"]
        == report["total"]
    )


def test_adapters_are_counted_apart():
    from aptune.adapter import wrap_linear

    model = tiny_model("BertForSequenceClassification")
    before = aptune.param_report(model)
    layer = model.bert.encoder.layer[0]
    wrap_linear(layer.attention.self, "query", rank=4)
    after = aptune.param_report(model)
    assert after["prunable"] == before["prunable"]
    assert after["adapters"] == 4 * (32 + 32)
    assert after["total"] == before["total"] + after["adapters"]
    structure = aptune.describe(model)
    assert sum(p.numel() for p in counted_parameters(structure)) == count_prunable(
        StructureShape.of(structure)
    )
