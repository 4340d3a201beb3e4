"""The decoder families beyond LLaMA: Qwen3 (per-head q/k norms), Gemma, Gemma 2 and the text-only Gemma 3
(``(1 + weight)`` RMSNorm, a scaled embedding, tied embeddings, a head size unrelated to the hidden size; Gemma 2/3:
pre- and post-norms around each sublayer, sliding-window layers; Gemma 2: soft-capping; Gemma 3: q/k norms), and
Phi-3 / Phi-4-mini (fused ``qkv_proj`` and ``gate_up_proj``, partial rotary embeddings, tied embeddings).

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
from aptune.compact import load_state_strictly

FAMILIES = ["qwen3", "gemma", "gemma2", "gemma3", "phi3"]
GEMMAS = ["gemma", "gemma2", "gemma3"]
POST_NORMS = ["gemma2", "gemma3"]  # a pre- and a post-norm around each sublayer
QK_NORMS = ["qwen3", "gemma3"]  # per-head q_norm / k_norm
TIED = [*GEMMAS, "phi3"]
SPEC = {"qwen3": "llama", "gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "phi3": "phi3"}
HEAD_DIM = {"qwen3": 8, "gemma": 12, "gemma2": 12, "gemma3": 12, "phi3": 8}
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
        assert structure.family == SPEC[family]
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
            if family not in QK_NORMS:
                assert not hasattr(layer.self_attn, "q_norm")
                continue
            assert layer.self_attn.q_norm.weight.shape == (HEAD_DIM[family],)
            assert id(layer.self_attn.q_norm) not in hidden_norms
            assert id(layer.self_attn.k_norm.weight) not in counted
        assert bool(structure.hidden.tied) == (family in TIED)
        assert all(s.fused == (family == "phi3") for s in [*structure.attention, *structure.ffn])


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
    if family in TIED:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # still tied
    if family in GEMMAS:
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
    with pytest.raises(UnsupportedModelError, match="Phi-3.5-MoE .*dense Phi-3"):
        get_spec(fake("PhimoeForCausalLM", "phimoe"))
    with pytest.raises(
        UnsupportedModelError, match="supported families: .*gemma \\(model types gemma, gemma2"
    ):
        get_spec(fake("FooForCausalLM", "foo"))


def test_cli_info_shows_family_facts(tmp_path, capsys):
    from aptune.cli import main

    for family in ("gemma2", "qwen3", "phi3"):
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
    assert main(["info", str(tmp_path / "phi3"), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)["family_facts"]
    assert facts["fused projections"].startswith("qkv_proj (q, k, v rows) and gate_up_proj (gate, up rows)")
    assert facts["partial rotary"].startswith("6 of 8 channels per head")
    assert "tied embeddings" in facts and "q/k norms" not in facts and "sliding window" not in facts
    phi3_mini = tiny_family_lm("phi3", sliding_window=2047)  # Phi-3-mini-4k: one window for every layer
    assert get_spec(phi3_mini).facts(phi3_mini)["sliding window"] == "2047 tokens in every layer"


# -- aptune train on the causal-LM task ------------------------------------------------------------------------


TRAINED = ["qwen3", "gemma2", "gemma3", "phi3"]  # Gemma (1) takes Gemma 2's code paths, less the post-norms


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
    assert before["family"] == SPEC[family]
    assert after["prunable"] <= int(0.6 * before["prunable"])
    model = aptune.load_pruned(out / "model")
    assert count_prunable(StructureShape.of(describe(model))) == after["prunable"]
    ids = torch.tensor([tiny_tokenizer()("the quick brown fox")["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()


# -- Phi-3: fused qkv_proj and gate_up_proj ----------------------------------------------------------------------


def _fused_rows(weight: torch.Tensor, sizes: list[int], widths: list[int], kept: list[torch.Tensor]):
    """The rows a fused projection keeps: for each part (of ``sizes`` rows, in units of ``widths`` rows), the rows
    of its ``kept`` units, part after part."""
    parts = weight.split(sizes)
    return torch.cat(
        [p.view(-1, w, p.shape[1])[k].flatten(0, 1) for p, w, k in zip(parts, widths, kept, strict=True)]
    )


@pytest.mark.parametrize(
    "kv_heads", [2, 4]
)  # Phi-4-mini's grouped-query attention; Phi-3-mini's one head per unit
def test_phi3_compaction_keeps_each_units_rows_of_the_fused_projections(kv_heads):
    model = tiny_family_lm("phi3", seed=5, num_key_value_heads=kv_heads)
    att, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    qkv, gate_up = att.qkv_proj.weight.detach().clone(), mlp.gate_up_proj.weight.detach().clone()
    units = (torch.arange(kv_heads) % 2 == 1).float()  # drop every other unit
    neurons = torch.arange(40) % 3 != 0
    masks = aptune.StructuralMasks.for_model(model)
    masks.set_heads(1, units)
    masks.set_neurons(1, neurons.float())
    aptune.apply_masks(model, masks)
    batch = prompt()
    with torch.no_grad():
        masked = model(**batch).logits
        tokens = model.generate(**batch, **GREEDY)
    aptune.compact(model)

    kept, group = torch.nonzero(units).flatten(), 4 // kv_heads
    expected = _fused_rows(qkv, [32, 8 * kv_heads, 8 * kv_heads], [8 * group, 8, 8], [kept] * 3)
    assert torch.equal(att.qkv_proj.weight, expected)  # kept q rows, then kept k rows, then kept v rows
    assert torch.equal(mlp.gate_up_proj.weight, _fused_rows(gate_up, [40, 40], [1, 1], [neurons] * 2))
    # Phi3Attention splits qkv by head counts it reads from its module: they follow the layer, not the model
    assert att.num_key_value_heads == len(kept) and att.config.num_attention_heads == len(kept) * group
    assert (
        model.config.num_attention_heads == 4
        and model.model.layers[0].self_attn.config.num_attention_heads == 4
    )
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, masked, atol=1e-5, rtol=0)
        assert torch.equal(model.generate(**batch, **GREEDY), tokens)


def test_phi3_adapters_on_q_and_v_adapt_only_those_rows():
    from aptune.adapter import FusedAPTLinear, add_adapters

    model = tiny_family_lm("phi3")
    att, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        qkv_before, gate_up_before = att.qkv_proj(x), mlp.gate_up_proj(x)
    adapters = add_adapters(model, ["q", "v", "up"])  # the decoder default (q, v), and one FFN part
    names = {n for n, m in model.named_modules() if isinstance(m, aptune.APTLinear)}
    assert names == {
        f"model.layers.{i}.{where}.adapters.{role}"
        for i in range(3)
        for where, role in (
            ("self_attn.qkv_proj", "q"),
            ("self_attn.qkv_proj", "v"),
            ("mlp.gate_up_proj", "up"),
        )
    }
    assert len(adapters) == 9 and isinstance(att.qkv_proj, FusedAPTLinear)
    q, v, up = att.qkv_proj.adapters["q"], att.qkv_proj.adapters["v"], mlp.gate_up_proj.adapters["up"]
    assert (q.lora_B.shape, v.lora_B.shape, up.lora_B.shape, q.lora_A.shape) == (
        (32, 8),
        (16, 8),
        (40, 8),
        (8, 32),
    )
    with torch.no_grad():
        for a in adapters:
            a.lora_B.normal_()
        qkv, gate_up = att.qkv_proj(x), mlp.gate_up_proj(x)
    rows = {
        "q": slice(0, 32),
        "k": slice(32, 48),
        "v": slice(48, 64),
        "gate": slice(0, 40),
        "up": slice(40, 80),
    }
    assert torch.equal(qkv[..., rows["k"]], qkv_before[..., rows["k"]])  # the key rows are untouched
    assert torch.equal(gate_up[..., rows["gate"]], gate_up_before[..., rows["gate"]])
    for out, before, role in (
        (qkv, qkv_before, "q"),
        (qkv, qkv_before, "v"),
        (gate_up, gate_up_before, "up"),
    ):
        assert (out[..., rows[role]] - before[..., rows[role]]).abs().min() > 0  # every row of the part moves
    # the fused weights stay frozen (the adapters' factors train) and are stored once
    assert not att.qkv_proj.weight.requires_grad and not mlp.gate_up_proj.weight.requires_grad
    assert all(a.lora_A.requires_grad and a.lora_B.requires_grad for a in adapters)
    keys = [k for k in model.state_dict() if k.startswith("model.layers.0.self_attn.qkv_proj")]
    assert sorted(keys) == sorted(
        ["model.layers.0.self_attn.qkv_proj.base.weight"]
        + [f"model.layers.0.self_attn.qkv_proj.adapters.{r}.lora_{f}" for r in "qv" for f in "AB"]
    )


@pytest.mark.parametrize("case", ["unit", "all"])
def test_phi3_adapters_are_sliced_with_the_fused_projections(case, tmp_path):
    from aptune.adapter import add_adapters, merge_adapters
    from aptune.compact import cut_to, shape_and_ranks

    roles = ["q", "k", "v", "o", "gate", "up", "down"]
    model = tiny_family_lm("phi3", seed=4)
    with torch.no_grad():
        for a in add_adapters(model, roles):
            a.lora_B.normal_(std=0.2)
    masks = case_masks(model, case)
    aptune.apply_masks(model, masks)
    batch = prompt()
    with torch.no_grad():
        masked = model(**batch).logits
    aptune.compact(model)

    def check(m):
        with torch.no_grad():
            torch.testing.assert_close(m(**batch).logits, masked, atol=1e-5, rtol=0)

    check(model)
    # what a checkpoint resume does: a fresh model with the same adapters, cut to the saved shape and ranks
    fresh = tiny_family_lm("phi3", seed=9)
    add_adapters(fresh, roles)
    cut_to(fresh, shape_and_ranks(model))
    load_state_strictly(fresh, model.state_dict())
    check(fresh)
    # 4 roles per live attention sublayer, 3 per live FFN ("all" removed one of each)
    assert merge_adapters(model) == (3 * 4 + 3 * 3 if case == "unit" else 2 * 4 + 2 * 3)
    assert all(type(m) is torch.nn.Linear for n, m in model.named_modules() if n.endswith("_proj"))
    check(model)
    aptune.save_pruned(model, tmp_path / "m")
    check(aptune.load_pruned(tmp_path / "m"))


def _llama_twin(phi3: torch.nn.Module) -> torch.nn.Module:
    """The LLaMA model that computes what ``phi3`` computes: its fused projections split into q, k, v and gate, up."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = phi3.config
    config = LlamaConfig(
        **{
            k: getattr(c, k)
            for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
        },
        num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        intermediate_size=c.intermediate_size,
        rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=c.tie_word_embeddings,
        max_position_embeddings=c.max_position_embeddings,
    )
    twin = LlamaForCausalLM(config).eval()
    state = {}
    for key, value in phi3.state_dict().items():
        if key.endswith("qkv_proj.weight"):
            q, k, v = value.split([32, 16, 16])
            state.update(
                {key.replace("qkv_proj", f"{n}_proj"): t for n, t in zip("qkv", (q, k, v), strict=True)}
            )
        elif key.endswith("gate_up_proj.weight"):
            state.update(
                {
                    key.replace("gate_up_proj", n): t
                    for n, t in zip(("gate_proj", "up_proj"), value.chunk(2), strict=True)
                }
            )
        else:
            state[key] = value
    load_state_strictly(twin, state)
    return twin


def test_phi3_group_scores_equal_those_of_its_unfused_llama_twin():
    """LLM-Pruner's Taylor scores and LoRAPrune's LoRA-guided scores sum each unit's rows in each part of a fused
    projection: they equal the scores of the same model with q, k, v, gate and up as separate projections."""
    from aptune.adapter import add_adapters
    from aptune.methods.llm_pruner.importance import taylor_scores
    from aptune.methods.loraprune.importance import lora_guided_scores

    phi3 = tiny_family_lm("phi3", seed=6, partial_rotary_factor=1.0, initializer_range=0.1)
    twin = _llama_twin(phi3)
    batch = {**tiny_batch(seed=2), "labels": tiny_batch(seed=2)["input_ids"]}
    with torch.no_grad():
        torch.testing.assert_close(twin(**batch).logits, phi3(**batch).logits, atol=1e-5, rtol=0)

    def close(a, b):
        for x, y in zip([*a[0], *a[1]], [*b[0], *b[1]], strict=True):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-9)

    close(taylor_scores(phi3, [batch]), taylor_scores(twin, [batch]))
    roles = ["q", "k", "v", "o", "gate", "up", "down"]
    pairs = list(zip(add_adapters(phi3, roles), add_adapters(twin, roles), strict=True))
    with torch.no_grad():
        for a, b in pairs:
            a.lora_B.normal_(std=0.1)
            b.lora_A.copy_(a.lora_A)
            b.lora_B.copy_(a.lora_B)
    for m in (phi3, twin):
        m(**batch).loss.backward()
    close(lora_guided_scores(phi3), lora_guided_scores(twin))


def test_phi3_long_rope_configs_stay_valid(tmp_path):
    """A long-RoPE config (Phi-3-128k, Phi-3.5-mini, Phi-4-mini) lists head_dim * partial_rotary_factor / 2 factors,
    which transformers checks against hidden_size // num_attention_heads: uniform head pruning alone cannot be
    written into it (the result is rebuilt by aptune.load_pruned), head and hidden pruning that keep that ratio can."""
    rope = {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": [1.0, 1.5, 2.0],
        "long_factor": [3.0] * 3,
    }
    batch = prompt()
    for hidden, plain in ((32, False), (16, True)):
        model = tiny_family_lm("phi3", seed=7, rope_parameters=rope, original_max_position_embeddings=32)
        masks = aptune.StructuralMasks.for_model(model)
        for i in range(3):
            masks.set_heads(i, [0.0, 1.0])
            masks.set_neurons(i, (torch.arange(40) < 24).float())
        masks.set_hidden((torch.arange(32) < hidden).float())
        aptune.apply_masks(model, masks)
        with torch.no_grad():
            masked = model(**batch).logits
            tokens = model.generate(**batch, **GREEDY)
        folder = tmp_path / f"hidden{hidden}"
        aptune.save_pruned(aptune.compact(model), folder)
        assert aptune.read_structure(folder).plain_loadable == plain
        saved = json.loads((folder / "config.json").read_text())
        assert (saved["num_attention_heads"], saved["hidden_size"]) == ((2, 16) if plain else (4, 32))
        loaded = (AutoModelForCausalLM.from_pretrained if plain else aptune.load_pruned)(folder).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(**batch).logits, masked, atol=1e-5, rtol=0)
            assert torch.equal(loaded.generate(**batch, **GREEDY), tokens)
