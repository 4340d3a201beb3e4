"""The decoder families beyond LLaMA: Qwen3 (per-head q/k norms), Gemma, Gemma 2 and the text-only Gemma 3
(``(1 + weight)`` RMSNorm, a scaled embedding, tied embeddings, a head size unrelated to the hidden size; Gemma 2/3:
pre- and post-norms around each sublayer, sliding-window layers; Gemma 2: soft-capping; Gemma 3: q/k norms).

Tiny random models from :func:`tiny_lm.tiny_family_lm`: 3 layers, 4 query heads in 2 key/value groups, hidden 32,
FFN 40; the Gemma models have head size 12 and a sliding window of 4 tokens on layers 0 and 2.
"""

from __future__ import annotations

import json
import math
import types

import pytest
import torch
from conftest import tiny_batch
from tiny_lm import tiny_family_lm, tiny_tokenizer, write_lm_folder
from transformers import AutoModelForCausalLM

import aptune
from aptune.arch import UnsupportedModelError, describe, get_spec
from aptune.budget import (
    StructureShape,
    attention_params,
    count_prunable,
    counted_parameters,
    ffn_params,
    head_cost,
    hidden_cost,
    neuron_cost,
)

FAMILIES = ["qwen3", "gemma", "gemma2", "gemma3"]
GEMMAS = ["gemma", "gemma2", "gemma3"]
POST_NORMS = ["gemma2", "gemma3"]  # a pre- and a post-norm around each sublayer
HEAD_DIM = {"qwen3": 8, "gemma": 12, "gemma2": 12, "gemma3": 12}
GREEDY = dict(max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)


def prompt() -> dict[str, torch.Tensor]:
    """Two rows of 9 tokens, the second left-padded by 3 (generation pads on the left)."""
    batch = tiny_batch(seed=3, batch=2, length=9)
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    batch["attention_mask"][1, :3] = 0
    return batch


def case_masks(model, case: str):
    """Binary masks for one test case: ``unit`` drops one key/value group (layer 1) and some neurons; ``blocks``
    drops the whole attention sublayer of layer 0 (the first layer, whose cache length transformers reads) and
    the whole FFN of layer 2; ``hidden`` drops a quarter of the hidden channels; ``all`` does everything."""
    masks = aptune.StructuralMasks.for_model(model)
    if case in ("unit", "all"):
        masks.set_heads(1, [1.0, 0.0])
        masks.set_neurons(1, (torch.arange(40) % 3 != 0).float())
    if case in ("blocks", "all"):
        masks.set_heads(0, [0.0, 0.0])
        masks.set_neurons(2, torch.zeros(40))
    if case in ("hidden", "all"):
        masks.set_hidden((torch.arange(32) % 4 != 1).float())
    return masks


def test_structure_of_each_family():
    for family in FAMILIES:
        model = tiny_family_lm(family)
        structure = describe(model)
        assert structure.family == ("llama" if family == "qwen3" else "gemma")
        per_site = 2 if family in POST_NORMS else 1
        assert [(s.num_heads, s.num_kv_heads, s.head_dim, len(s.norms)) for s in structure.attention] == [
            (4, 2, HEAD_DIM[family], per_site)
        ] * 3
        assert all(len(s.norms) == per_site and s.gate is not None for s in structure.ffn)
        hidden_norms = {id(n) for n in structure.hidden.norms}
        assert len(hidden_norms) == 3 * 2 * per_site + 1  # the final norm too
        # the per-head q/k norms (size head_dim; Qwen3, Gemma 3) are not hidden-channel norms, nor counted
        counted = {id(p) for p in counted_parameters(structure)}
        for layer in model.model.layers:
            if family in ("gemma", "gemma2"):
                assert not hasattr(layer.self_attn, "q_norm")
                continue
            assert layer.self_attn.q_norm.weight.shape == (HEAD_DIM[family],)
            assert id(layer.self_attn.q_norm) not in hidden_norms
            assert id(layer.self_attn.k_norm.weight) not in counted
        assert bool(structure.hidden.tied) == (family in GEMMAS)


@pytest.mark.parametrize("case", ["unit", "blocks", "hidden", "all"])
@pytest.mark.parametrize("family", FAMILIES)
def test_masked_equals_compacted_and_reloaded_and_generates_alike(family, case, tmp_path):
    model = tiny_family_lm(family, seed=1)
    batch = prompt()
    with torch.no_grad():
        dense = model(**batch).logits
    masks = case_masks(model, case)
    aptune.apply_masks(model, masks)
    with torch.no_grad():
        masked = model(**batch).logits
        masked_tokens = model.generate(**batch, **GREEDY)
    assert (masked - dense).abs().max() > 1e-2, "the masks should change the outputs"

    compacted = aptune.compact(model)
    shape = StructureShape.of(describe(compacted))
    assert shape.hidden == int(masks.hidden.sum())
    assert shape.units == tuple(int(m.sum()) for m in masks.heads)
    assert shape.neurons == tuple(int(m.sum()) for m in masks.neurons)
    assert aptune.param_report(compacted)["prunable"] == count_prunable(shape)
    aptune.save_pruned(compacted, tmp_path / "m")
    loaded = aptune.load_pruned(tmp_path / "m")
    for other in (compacted, loaded):
        with torch.no_grad():
            torch.testing.assert_close(other(**batch).logits, masked, atol=1e-5, rtol=0)
            assert torch.equal(other.generate(**batch, **GREEDY), masked_tokens)
    if family in GEMMAS:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # still tied
        assert float(loaded.model.embed_tokens.embed_scale) == pytest.approx(math.sqrt(32))


@pytest.mark.parametrize("family", POST_NORMS)
def test_a_skipped_sublayer_adds_nothing_through_its_post_norm(family):
    """With every head of layer 0 and every neuron of layer 2 masked, the post-norms of those sublayers output
    exact zeros (the residual stream passes unchanged), under a partial hidden mask too."""
    model = tiny_family_lm(family)
    masks = case_masks(model, "all")
    aptune.apply_masks(model, masks)
    seen = {}
    layers = model.model.layers
    hooks = [
        layers[0].post_attention_layernorm.register_forward_hook(lambda m, a, out: seen.update(attn=out)),
        layers[2].post_feedforward_layernorm.register_forward_hook(lambda m, a, out: seen.update(ffn=out)),
        layers[1].post_attention_layernorm.register_forward_hook(lambda m, a, out: seen.update(live=out)),
    ]
    with torch.no_grad():
        model(**prompt())
    for h in hooks:
        h.remove()
    assert torch.count_nonzero(seen["attn"]) == 0 and torch.count_nonzero(seen["ffn"]) == 0
    pruned = masks.hidden == 0
    assert torch.count_nonzero(seen["live"][..., pruned]) == 0  # a live post-norm keeps pruned channels at 0
    assert torch.count_nonzero(seen["live"][..., ~pruned]) > 0


@pytest.mark.parametrize("family", GEMMAS)
def test_the_embedding_scale_stays_the_original_after_hidden_pruning(family, tmp_path):
    """``embed_scale`` is sqrt(config.hidden_size) when a model is built, so the saved config keeps the original
    hidden size; the pruned model is then rebuilt by aptune.load_pruned, not by a plain from_pretrained."""
    model = tiny_family_lm(family)
    masks = aptune.StructuralMasks.for_model(model)
    masks.set_hidden((torch.arange(32) < 20).float())
    compacted = aptune.compact(model, masks)
    aptune.save_pruned(compacted, tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["hidden_size"] == 32 and not aptune.read_structure(tmp_path / "m").plain_loadable
    loaded = aptune.load_pruned(tmp_path / "m")
    assert loaded.model.embed_tokens.weight.shape == (97, 20)
    assert float(loaded.model.embed_tokens.embed_scale) == pytest.approx(math.sqrt(32))
    assert float(loaded.model.embed_tokens.embed_scale) != pytest.approx(math.sqrt(20))


@pytest.mark.parametrize("family", FAMILIES)
def test_costs_equal_the_parameters_that_removal_frees(family):
    model = tiny_family_lm(family)

    def prunable() -> int:
        return aptune.param_report(model)["prunable"]

    def removing(**sets) -> int:
        """Parameters freed by compacting ``model`` with the masks ``sets`` describes."""
        before = prunable()
        masks = aptune.StructuralMasks.for_model(model)
        for name, (site, values) in sets.items():
            getattr(masks, f"set_{name}")(*(() if site is None else (site,)), values)
        aptune.compact(model, masks)
        assert prunable() == sum(p.numel() for p in counted_parameters(describe(model)))
        return before - prunable()

    shape = StructureShape.of(describe(model))
    assert prunable() == count_prunable(shape)
    d, norms = HEAD_DIM[family], (2 if family in POST_NORMS else 1)
    unit = head_cost(shape, 0)
    assert removing(heads=(0, [1.0, 0.0])) == unit
    # one unit: 2 query heads and 1 key/value head: rows of q (2d), k (d), v (d), columns of o (2d); no biases
    assert unit == 32 * 4 * d + 2 * d * 32
    neuron = neuron_cost(StructureShape.of(describe(model)), 1)
    assert removing(neurons=(1, (torch.arange(40) != 7).float())) == neuron == 3 * 32
    # the last unit of a sublayer frees all of it, its norms included
    shape = StructureShape.of(describe(model))
    last = attention_params(shape.attention[0], 32)
    assert removing(heads=(0, [0.0])) == last == unit + norms * 32
    ffn = ffn_params(shape.ffn[2], 32)
    assert removing(neurons=(2, torch.zeros(40))) == ffn == 40 * 3 * 32 + norms * 32
    # one hidden channel: a column of every live q/k/v/gate/up, a row of every o/down, an entry of every norm
    shape = StructureShape.of(describe(model))
    channel = hidden_cost(shape)
    assert removing(hidden=(None, (torch.arange(32) != 5).float())) == channel
    # live: attention in layers 1 and 2 (4 heads: q 4d, k 2d, v 2d, o 4d), FFN in layers 0 (40) and 1 (39)
    assert channel == 2 * (12 * d + norms) + (3 * 40 + norms) + (3 * 39 + norms)


@pytest.mark.parametrize("family", FAMILIES)
def test_uniform_result_loads_with_plain_from_pretrained(family, tmp_path):
    model = tiny_family_lm(family, seed=2)
    masks = aptune.StructuralMasks.for_model(model)
    for i in range(3):
        masks.set_heads(i, [0.0, 1.0] if i == 1 else [1.0, 0.0])
        masks.set_neurons(i, (torch.arange(40) % 2 == i % 2).float())
    aptune.apply_masks(model, masks)
    batch = prompt()
    with torch.no_grad():
        masked = model(**batch).logits
        tokens = model.generate(**batch, **GREEDY)
    aptune.save_pruned(aptune.compact(model), tmp_path / "m")
    assert aptune.read_structure(tmp_path / "m").plain_loadable
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert type(plain).__name__ == type(model).__name__
    config = plain.config
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (32, 2, 1)
    assert (config.intermediate_size, config.head_dim) == (20, HEAD_DIM[family])
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, masked, atol=1e-5, rtol=0)
        assert torch.equal(plain.generate(**batch, **GREEDY), tokens)


def test_unsupported_relatives_are_one_clear_line():
    def fake(class_name: str, model_type: str) -> torch.nn.Module:
        """A stand-in with the class name and model type of a real model (building one would be slow)."""
        model = type(class_name, (torch.nn.Module,), {})()
        model.config = types.SimpleNamespace(model_type=model_type)
        return model

    with pytest.raises(UnsupportedModelError, match="multimodal Gemma 3.*Gemma3ForCausalLM") as err:
        get_spec(fake("Gemma3ForConditionalGeneration", "gemma3"))
    assert "\n" not in str(err.value)
    with pytest.raises(UnsupportedModelError, match="mixture-of-experts"):
        get_spec(fake("Qwen3MoeForCausalLM", "qwen3_moe"))
    with pytest.raises(UnsupportedModelError, match="fused qkv_proj"):
        get_spec(fake("Phi3ForCausalLM", "phi3"))
    with pytest.raises(
        UnsupportedModelError, match="supported families: .*gemma \\(model types gemma, gemma2"
    ):
        get_spec(fake("FooForCausalLM", "foo"))


def test_cli_info_shows_family_facts(tmp_path, capsys):
    from aptune.cli import main

    for family in ("gemma2", "qwen3"):
        model = tiny_family_lm(family)
        masks = aptune.StructuralMasks.for_model(model)
        masks.set_heads(2, [0.0, 1.0])
        aptune.save_pruned(aptune.compact(model, masks), tmp_path / family)
    assert main(["info", str(tmp_path / "gemma2"), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)["family_facts"]
    assert facts["sliding window"].startswith("4 tokens in 2 of 3 layers")
    assert facts["soft-capping"] == "attention 3, final logits 5"
    assert "tied embeddings" in facts and facts["embedding scale"].startswith(f"{math.sqrt(32):g}")
    assert main(["info", str(tmp_path / "qwen3")]) == 0
    table = capsys.readouterr().out
    assert "q/k norms" in table and "per head (size 8)" in table and "sliding window" not in table


# -- aptune train on the causal-LM task ------------------------------------------------------------------------


TRAINED = ["qwen3", "gemma2", "gemma3"]  # Gemma (1) takes Gemma 2's code paths, less the post-norms


@pytest.fixture(scope="module")
def lm_root(tmp_path_factory):
    """The tiny text data of tests/tiny_lm.py, and one tiny model folder per family (with the tiny tokenizer)."""
    root = write_lm_folder(
        tmp_path_factory.mktemp("families"),
        sizes=(("train", 8), ("validation", 3), ("test", 3)),
        chat=False,
        mc=0,
    )
    tok = tiny_tokenizer()
    for family in TRAINED:
        model = tiny_family_lm(family, vocab_size=len(tok), initializer_range=0.05, intermediate_size=64)
        model.save_pretrained(root / family)
        tok.save_pretrained(root / family)
    return root


TRAIN = [
    "--max-length",
    "32",
    "--batch-size",
    "4",
    "--eval-batch-size",
    "4",
    "--no-progress",
    "--no-measure-speed",
]
METHODS = {
    "apt": ["--epochs", "1", "--one-shot-batches", "2", "--num-checkpoints", "2", "--learning-rate", "3e-3"],
    "llm-pruner": ["--epochs", "1", "--calibration-batches", "2"],
}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", TRAINED)
def test_aptune_train_prunes_and_tunes_each_family(lm_root, family, method):
    from aptune.cli import main

    out = lm_root / f"run-{family}-{method}"
    argv = ["train", "--model", str(lm_root / family), "--data", str(lm_root / "text"), "--output", str(out)]
    extra = ["--method", method, "--density", "0.6", "--ffn-multiple", "8", "--shape", "per-layer"]
    assert main(argv + TRAIN + extra + METHODS[method]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "causal-lm" and report["metrics"]["best_validation"] > 1
    before, after = report["params_before"], report["params_after"]
    assert before["family"] == ("llama" if family == "qwen3" else "gemma")
    assert after["prunable"] <= int(0.6 * before["prunable"])
    model = aptune.load_pruned(out / "model")
    assert count_prunable(StructureShape.of(describe(model))) == after["prunable"]
    ids = torch.tensor([tiny_tokenizer()("the quick brown fox")["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
