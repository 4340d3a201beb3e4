"""T5 encoder-decoders: v1.0 (ReLU FFN, lm_head tied to the embedding, decoder output scaled by d_model ** -0.5) and
v1.1 / LM-adapt (gated-GELU FFN, its own lm_head, no scale).

Tiny random models built from ``T5Config``: d_model 32, 4 heads of size 8, FFN 64, 2 encoder and 2 decoder layers,
so 6 attention sites (encoder self, decoder self, decoder cross) and 4 FFN sites. Covered: the structure and the
budget (cross-attention counted), masked = compacted = reloaded (logits and greedy generation with the KV cache) with
per-layer head sets that make every layer read other columns of the shared relative position bias, plain
``from_pretrained`` where it is possible, adapters (the paper's targets, sliced with the blocks), salience with
source and target padding, and APT end to end on a copy task, with and without self-distillation.
"""

from __future__ import annotations

import json
import types

import pytest
import torch
from torch import nn
from transformers import T5Config, T5ForConditionalGeneration, T5ForSequenceClassification

import aptune
from aptune.adapter import APTLinear, add_adapters
from aptune.arch import UnsupportedModelError, describe, get_spec
from aptune.budget import StructureShape, count_prunable, counted_parameters
from aptune.config import APTConfig
from aptune.controller import APTController
from aptune.masks import remove_masks
from aptune.salience import SalienceCollector

VOCAB = 100
GREEDY = dict(max_new_tokens=8, do_sample=False, use_cache=True)
SITES = [
    "encoder.layer.0.self_attention",
    "encoder.layer.1.self_attention",
    "decoder.layer.0.self_attention",
    "decoder.layer.0.cross_attention",
    "decoder.layer.1.self_attention",
    "decoder.layer.1.cross_attention",
]


def tiny_t5(gated: bool, seed: int = 0, cls=T5ForConditionalGeneration, **overrides) -> nn.Module:
    """A tiny T5 v1.0 (``gated=False``) or v1.1 (``gated=True``) in eval mode.

    transformers 5 builds a T5 with ``lm_head`` tied to the embedding whatever the config says (it unties them when
    a checkpoint has its own head, as v1.1 checkpoints do), so the v1.1 model gets its own head here.
    """
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        num_heads=4,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        feed_forward_proj="gated-gelu" if gated else "relu",
        tie_word_embeddings=not gated,
        **overrides,
    )
    model = cls(config).eval()
    if gated and hasattr(model, "lm_head"):
        model.lm_head.weight = nn.Parameter(torch.randn(VOCAB, 32))
    return model


def seq2seq_batch(seed: int = 1, batch: int = 3, source: int = 9, target: int = 6) -> dict[str, torch.Tensor]:
    """Random source and target tokens; row 1 has source padding and a shorter target (labels -100)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, source), generator=g)
    attention = torch.ones_like(ids)
    attention[1, 6:] = 0
    labels = torch.randint(2, VOCAB, (batch, target), generator=g)
    labels[1, 4:] = -100
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def prompt(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in ("input_ids", "attention_mask")}


def random_masks(model, seed: int, dead_heads: tuple[int, ...], dead_ffn: tuple[int, ...]):
    """Binary masks keeping other heads in every site (each site at least one), none in ``dead_heads``, random
    neurons, none in ``dead_ffn``, and three quarters of the hidden channels."""
    g = torch.Generator().manual_seed(seed)
    masks = aptune.StructuralMasks.for_model(model)
    for i in range(len(masks.heads)):
        keep = (torch.rand(4, generator=g) < 0.5).float()
        keep[i % 4] = 1.0  # a different head survives in each site
        keep[(i + 1) % 4] = 0.0  # and a different one goes
        masks.set_heads(i, torch.zeros(4) if i in dead_heads else keep)
    for i in range(len(masks.neurons)):
        keep = (torch.rand(64, generator=g) < 0.5).float()
        keep[0] = 1.0
        masks.set_neurons(i, torch.zeros(64) if i in dead_ffn else keep)
    hidden = (torch.rand(32, generator=g) < 0.75).float()
    hidden[:2] = 1.0
    masks.set_hidden(hidden)
    return masks


# -- structure and budget ------------------------------------------------------------------------------------


@pytest.mark.parametrize("gated", [False, True])
def test_structure_counts_every_attention_kind(gated):
    model = tiny_t5(gated)
    structure = describe(model)
    assert structure.family == "t5" and structure.num_layers == 4
    assert [s.name for s in structure.attention] == SITES
    assert [s.layer for s in structure.attention] == [0, 1, 2, 2, 3, 3]  # decoder layers follow the encoder's
    assert [(s.num_heads, s.num_units, s.head_dim) for s in structure.attention] == [(4, 4, 8)] * 6
    assert [s.name for s in structure.ffn] == [
        "encoder.layer.0.ffn",
        "encoder.layer.1.ffn",
        "decoder.layer.0.ffn",
        "decoder.layer.1.ffn",
    ]
    assert [s.num_neurons for s in structure.ffn] == [64] * 4
    cross = model.decoder.block[1].layer[1].EncDecAttention
    assert structure.attention[5].q is cross.q and structure.attention[5].k is cross.k
    dense = model.decoder.block[0].layer[2].DenseReluDense
    if gated:
        assert structure.ffn[2].gate is dense.wi_0 and structure.ffn[2].up is dense.wi_1
    else:
        assert structure.ffn[2].gate is None and structure.ffn[2].up is dense.wi

    # by hand: q, k, v, o (32 x 32 each, no biases) and one norm weight per attention site, cross-attention
    # included; wi (v1.0) or wi_0 and wi_1 (v1.1), wo and one norm weight per FFN site
    attention = 4 * 32 * 32 + 32
    ffn = (3 if gated else 2) * 32 * 64 + 32
    shape = StructureShape.of(structure)
    assert count_prunable(shape) == 6 * attention + 4 * ffn
    assert count_prunable(shape) == sum(p.numel() for p in counted_parameters(structure))
    report = aptune.param_report(model)
    assert report["prunable"] == 6 * attention + 4 * ffn
    # outside the budget: the shared embedding, the two final norms and the two position bias tables
    assert report["embeddings"] == VOCAB * 32 + 2 * 32 + 2 * 32 * 4
    assert report["task_head"] == VOCAB * 32  # lm_head (tied to the embedding in v1.0)


# -- masked = compacted = reloaded ------------------------------------------------------------------------------

CASES = {
    # encoder layer 0 holds the encoder's position bias table: its self-attention goes, the table stays
    "encoder-bias-holder": ((0,), (1,)),
    # decoder layer 0's self-attention (the decoder's table, and the cache length generation reads) and the
    # cross-attention of decoder layer 1
    "decoder-bias-holder": ((2, 5), (2,)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("gated", [False, True])
def test_masked_equals_compacted_and_reloaded_and_generates_alike(gated, case, tmp_path):
    model = tiny_t5(gated, seed=int(gated))
    batch = seq2seq_batch()
    with torch.no_grad():
        dense = model(**batch).logits
    dead_heads, dead_ffn = CASES[case]
    masks = random_masks(model, seed=3, dead_heads=dead_heads, dead_ffn=dead_ffn)
    aptune.apply_masks(model, masks)
    with torch.no_grad():
        masked = model(**batch).logits
        masked_tokens = model.generate(**prompt(batch), **GREEDY)
    assert (masked - dense).abs().max() > 1e-2, "the masks should change the outputs"

    compacted = aptune.compact(model)
    structure = describe(compacted)
    shape = StructureShape.of(structure)
    assert shape.units == tuple(int(m.sum()) for m in masks.heads)
    assert shape.neurons == tuple(int(m.sum()) for m in masks.neurons)
    assert shape.hidden == int(masks.hidden.sum())
    assert aptune.param_report(compacted)["prunable"] == count_prunable(shape)
    assert count_prunable(shape) == sum(p.numel() for p in counted_parameters(structure))
    # each compacted attention remembers which original heads it kept (for its columns of the position bias)
    for site, mask in zip(structure.attention, masks.heads, strict=True):
        if site.num_heads and not bool(mask.all()):
            kept = torch.nonzero(mask).flatten()
            att = site.block.SelfAttention if "self" in site.name else site.block.EncDecAttention
            assert torch.equal(att.aptune_heads, kept) and att.n_heads == len(kept)
    assert compacted.model_dim == 32  # the decoder output scale stays the original one
    assert compacted.encoder.embed_tokens.weight is compacted.shared.weight
    assert compacted.decoder.embed_tokens.weight is compacted.shared.weight
    assert (compacted.lm_head.weight is compacted.shared.weight) == (not gated)

    aptune.save_pruned(compacted, tmp_path / "m")
    assert not aptune.read_structure(tmp_path / "m").plain_loadable  # per-layer head sets
    loaded = aptune.load_pruned(tmp_path / "m")
    for other in (compacted, loaded):
        with torch.no_grad():
            torch.testing.assert_close(other(**batch).logits, masked, atol=1e-5, rtol=0)
            assert torch.equal(other.generate(**prompt(batch), **GREEDY), masked_tokens)
    assert loaded.model_dim == 32 and loaded.config.d_model == 32
    assert (loaded.lm_head.weight is loaded.shared.weight) == (not gated)
    assert aptune.param_report(loaded)["prunable_before"] == aptune.param_report(compacted)["prunable_before"]


@pytest.mark.parametrize("class_name", ["T5Model", "T5EncoderModel"])
def test_bare_models_compact_alike(class_name, tmp_path):
    import transformers

    model = tiny_t5(True, cls=getattr(transformers, class_name))
    structure = describe(model)
    sites = 2 if class_name == "T5EncoderModel" else 6
    assert len(structure.attention) == sites and not structure.head_modules
    batch = prompt(seq2seq_batch(seed=10))
    if class_name == "T5Model":
        batch["decoder_input_ids"] = batch["input_ids"][:, :5]
    masks = random_masks(model, seed=11, dead_heads=(0,), dead_ffn=(1,))
    aptune.apply_masks(model, masks)
    with torch.no_grad():  # the kept channels (the pruned ones are 0 in the masked model)
        masked = model(**batch).last_hidden_state[..., masks.hidden.bool()]
    aptune.save_pruned(aptune.compact(model), tmp_path / "m")
    for other in (model, aptune.load_pruned(tmp_path / "m")):
        with torch.no_grad():
            torch.testing.assert_close(other(**batch).last_hidden_state, masked, atol=1e-5, rtol=0)


def test_compacting_twice_keeps_the_original_head_indices(tmp_path):
    """A second compaction composes the kept heads: layer 1 keeps original heads 1 and 3, then only 3."""
    model = tiny_t5(False)
    batch = seq2seq_batch(seed=4)
    masks = aptune.StructuralMasks.for_model(model)
    masks.set_heads(1, [0.0, 1.0, 0.0, 1.0])
    aptune.compact(model, masks)
    masks = aptune.StructuralMasks.for_model(model)
    masks.set_heads(1, [0.0, 1.0])
    masks.set_heads(4, [1.0, 1.0, 0.0, 0.0])
    aptune.apply_masks(model, masks)
    with torch.no_grad():
        masked = model(**batch).logits
    aptune.compact(model)
    assert model.encoder.block[1].layer[0].SelfAttention.aptune_heads.tolist() == [3]
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, masked, atol=1e-5, rtol=0)
    aptune.save_pruned(model, tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(
            aptune.load_pruned(tmp_path / "m")(**batch).logits, masked, atol=1e-5, rtol=0
        )


@pytest.mark.parametrize("gated", [False, True])
def test_plain_from_pretrained_only_without_head_pruning(gated, tmp_path):
    """Uniform FFNs and all heads: a stock T5 config expresses it, and hidden pruning too unless v1.0's decoder
    output scale (d_model ** -0.5) would change. Pruned heads always need aptune.load_pruned."""
    model = tiny_t5(gated)
    batch = seq2seq_batch(seed=5)
    masks = aptune.StructuralMasks.for_model(model)
    for i in range(4):
        masks.set_neurons(i, (torch.arange(64) % 2 == i % 2).float())
    masks.set_hidden((torch.arange(32) % 4 != 1).float())
    aptune.apply_masks(model, masks)
    with torch.no_grad():
        masked = model(**batch).logits
    aptune.save_pruned(aptune.compact(model), tmp_path / "m")
    plain = aptune.read_structure(tmp_path / "m").plain_loadable
    assert plain == gated  # v1.0: the config keeps d_model 32 for the scale
    if plain:
        stock = T5ForConditionalGeneration.from_pretrained(tmp_path / "m").eval()
        assert (stock.config.d_model, stock.config.d_ff) == (24, 32)
        with torch.no_grad():
            torch.testing.assert_close(stock(**batch).logits, masked, atol=1e-5, rtol=0)
    loaded = aptune.load_pruned(tmp_path / "m")
    assert loaded.model_dim == (24 if gated else 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, masked, atol=1e-5, rtol=0)

    model = tiny_t5(gated)
    masks = aptune.StructuralMasks.for_model(model)
    for i in range(6):
        masks.set_heads(i, [1.0, 1.0, 0.0, 1.0])  # uniform counts: still not plain (the bias is shared)
    aptune.save_pruned(aptune.compact(model, masks), tmp_path / "h")
    assert not aptune.read_structure(tmp_path / "h").plain_loadable


# -- adapters ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gated", [False, True])
def test_default_adapters_are_the_papers_and_follow_pruning(gated):
    """q and v of all three attention kinds and wi (v1.0) or wi_0 (v1.1); with trained (non-zero) factors the
    masked and compacted models agree, and growing a rank changes nothing."""
    model = tiny_t5(gated)
    config = APTConfig(target_density=0.5, salience_start=2, pruning_end=20, num_checkpoints=2, warmup_end=4)
    controller = APTController(model, config, total_steps=40, steps_per_epoch=10)
    assert controller.config.adapter_targets == (("q", "v", "gate") if gated else ("q", "v", "up"))
    adapted = [n for n, m in model.named_modules() if isinstance(m, APTLinear)]
    suffixes = [n.rsplit(".", 2)[-2:] for n in adapted]
    assert len(adapted) == 6 * 2 + 4
    for kind in ("SelfAttention", "EncDecAttention"):
        for proj in ("q", "v"):
            assert suffixes.count([kind, proj]) == (4 if kind == "SelfAttention" else 2)
    assert suffixes.count(["DenseReluDense", "wi_0" if gated else "wi"]) == 4
    controller.collector.remove()
    remove_masks(model)

    g = torch.Generator().manual_seed(0)
    for a in controller.adapters:
        with torch.no_grad():
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g) * 0.1)
    batch = seq2seq_batch(seed=6)
    masks = random_masks(model, seed=7, dead_heads=(3,), dead_ffn=(0,))
    aptune.apply_masks(model, masks)
    with torch.no_grad():
        masked = model(**batch).logits
    aptune.compact(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, masked, atol=1e-5, rtol=0)
    live = [m for m in model.modules() if isinstance(m, APTLinear)]
    assert len(live) == 6 * 2 + 4 - 2 - 1  # the removed cross-attention's q and v, the removed FFN's input
    for a in live:
        a.grow(a.rank + 4, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, masked, atol=1e-5, rtol=0)


def test_explicit_adapter_targets_win_over_the_family_default():
    model = tiny_t5(True)
    adapters = add_adapters(model, ("q", "up"))
    assert len(adapters) == 6 + 4 and model.encoder.block[0].layer[1].DenseReluDense.wi_1 in adapters
    config = APTConfig(adapter_targets=("v",)).resolve(40, 10, adapter_targets=("q", "v", "gate"))
    assert config.adapter_targets == ("v",)
    assert APTConfig().resolve(40, 10).adapter_targets == ("q", "v", "up")


# -- salience -----------------------------------------------------------------------------------------------------


def test_salience_leaves_out_source_and_target_padding():
    """Brute force: encoder tensors over real source tokens, decoder tensors over labelled target positions,
    divided by the number of both."""
    model = tiny_t5(True)
    for p in model.parameters():
        p.requires_grad_(True)
    structure = describe(model)
    batch = seq2seq_batch(seed=8)
    source, target = batch["attention_mask"].bool(), batch["labels"] != -100
    n = int(source.sum() + target.sum())
    captured = []

    def keep(module, args):
        args[0].retain_grad()
        captured.append(args[0])

    handles = [s.o.register_forward_pre_hook(keep) for s in structure.attention]
    collector = SalienceCollector(model, structure)
    collector.start()
    model(**batch).loss.backward()
    scores = collector.scores()
    for h in handles:
        h.remove()
    for site, x, got in zip(structure.attention, captured, scores.heads, strict=True):
        real = source if site.name.startswith("encoder") else target
        h, g = x.detach()[real], x.grad[real]
        want = (h.abs().sum(0) * g.abs().sum(0) / n).view(4, 8).sum(1)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-9)


# -- APT end to end ---------------------------------------------------------------------------------------------


def copy_batches(n: int, seed: int, batch: int = 16, length: int = 8) -> list[dict[str, torch.Tensor]]:
    """The copy task: the target is the source (tokens 2..21)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(2, 22, (batch, length), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def mean_loss(model, batches) -> float:
    with torch.no_grad():
        return sum(float(model(**b).loss) for b in batches) / len(batches)


SCHEDULE = APTConfig(
    target_density=0.5,
    ffn_multiple=8,
    num_checkpoints=4,
    salience_start=10,
    pruning_end=60,
    warmup_end=20,
    decay_window=10,
)


@pytest.mark.parametrize("distill", [False, True])
def test_apt_prunes_a_t5_to_half_density_and_learns_to_copy(distill):
    model = tiny_t5(True)
    train, valid = copy_batches(20, seed=0), copy_batches(4, seed=1)
    before = mean_loss(model, valid)
    config = APTConfig(**{**SCHEDULE.to_dict(), "distill": distill})
    controller = APTController(model, config, total_steps=100, steps_per_epoch=20)
    base = controller.base_params
    optimizer = torch.optim.AdamW(controller.trainable_parameters(), lr=1e-2)
    model.train()
    distilled = 0
    for _ in range(5):
        for batch in train:
            controller.before_forward()
            distilled += controller.distilling
            controller.compute_loss(batch).backward()
            controller.after_backward()
            optimizer.step()
            optimizer.zero_grad()
            if controller.after_step():
                optimizer = torch.optim.AdamW(controller.trainable_parameters(), lr=1e-2)
    model.eval()
    assert (distilled > 0) == distill
    targets = dict(zip(controller.schedule.checkpoints, controller.schedule.targets, strict=True))
    for record in controller.history:
        assert record["density"] <= targets[record["step"]] + 1e-9
    model = controller.finish()
    shape = StructureShape.of(describe(model))
    assert count_prunable(shape) <= 0.5 * base
    assert count_prunable(shape) > 0.45 * base  # the budget is used, not undershot
    assert shape.hidden < 32 or any(u < 4 for u in shape.units)  # something structural went
    assert mean_loss(model, valid) < 0.7 * before
    with torch.no_grad():
        model.generate(**prompt(valid[0]), **GREEDY)  # the pruned model still generates


def test_distillation_loss_is_zero_when_the_student_is_the_teacher():
    """The teacher builds its decoder inputs from the labels; encoder and decoder layers are compared within
    their own stack."""
    model = tiny_t5(False)
    config = APTConfig(**{**SCHEDULE.to_dict(), "distill": True})
    controller = APTController(model, config, total_steps=100, steps_per_epoch=20)
    distiller = controller.distiller
    distiller.snapshot()
    batch = seq2seq_batch(seed=9)
    teacher = distiller.teacher_outputs(batch)
    with torch.no_grad():
        student = model(**batch, output_hidden_states=True)
    alive = controller._alive_layers()
    assert len(alive) == 4
    assert distiller.loss(student, teacher, alive, batch["attention_mask"], batch["labels"] != -100) == 0
    noisy = type(student)(
        logits=student.logits,
        encoder_hidden_states=student.encoder_hidden_states,
        decoder_hidden_states=tuple(h + 1 for h in student.decoder_hidden_states),
    )
    assert distiller.loss(noisy, teacher, alive, batch["attention_mask"], batch["labels"] != -100) > 0


# -- errors and facts -------------------------------------------------------------------------------------------


def test_unsupported_t5_heads_and_relatives_are_one_clear_line():
    model = tiny_t5(False, cls=T5ForSequenceClassification)
    with pytest.raises(UnsupportedModelError, match="T5ForSequenceClassification head") as err:
        get_spec(model)
    assert "\n" not in str(err.value) and "T5ForConditionalGeneration" in str(err.value)
    fake = type("UMT5ForConditionalGeneration", (nn.Module,), {})()
    fake.config = types.SimpleNamespace(model_type="umt5")
    with pytest.raises(UnsupportedModelError, match="UMT5 is not supported"):
        get_spec(fake)


def test_cli_info_json_shows_t5_facts(tmp_path, capsys):
    from aptune.cli import main

    model = tiny_t5(False)
    masks = aptune.StructuralMasks.for_model(model)
    masks.set_heads(3, [0.0, 1.0, 1.0, 0.0])
    aptune.save_pruned(aptune.compact(model, masks), tmp_path / "m")
    assert main(["info", str(tmp_path / "m"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "t5" and info["heads"] == [4, 4, 4, 2, 4, 4]
    facts = info["family_facts"]
    assert "shared" in facts["position bias"] and "d_model 32" in facts["decoder output scale"]
    assert facts["tied embeddings"].startswith("lm_head")
