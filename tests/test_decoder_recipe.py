"""The decoder recipe (spec §5.7): calibrate with forward and backward, prune once before tuning, grow ranks;
uniform shapes that stock transformers loads; salience under gradient checkpointing."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM

import aptune
from aptune.adapter import add_adapters, merge_adapters
from aptune.arch import describe
from aptune.budget import StructureShape, count_prunable
from aptune.config import APTConfig, ConfigError
from aptune.controller import APTController
from aptune.salience import BlockScores, SalienceCollector
from aptune.selection import select_blocks, select_uniform
from aptune.train import set_activation_checkpointing

VOCAB = 97


def lm_batches(n: int, seed: int = 0, batch: int = 4, length: int = 12):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(2, VOCAB, (batch, length), generator=g)
        mask = torch.ones_like(ids)
        mask[0, -3:] = 0  # some padding
        labels = ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def decoder(seed: int = 0, **kw):
    return tiny_model("LlamaForCausalLM", seed=seed, intermediate_size=64, **kw).train()


def one_shot_config(**kw) -> APTConfig:
    base = dict(
        target_density=0.6,
        ffn_multiple=8,
        salience_start=2,
        pruning_end=14,
        num_checkpoints=3,
        one_shot_batches=3,
    )
    return APTConfig(**{**base, **kw})


def calibrated_scores(controller: APTController, batches) -> BlockScores:
    """Run the one-shot calibration and return the scores its selection read."""
    seen = {}
    original = controller._select

    def spy(shape, scores, target):
        seen["scores"] = scores
        return original(shape, scores, target)

    controller._select = spy
    controller.calibrate(batches)
    return seen["scores"]


def test_decoder_defaults_follow_the_papers_llama_recipe():
    c = APTConfig(target_density=0.7).resolve(100, 10, decoder=True)
    assert (c.recipe, c.adapter_targets, c.initial_density) == ("one-shot", ("q", "v"), 0.7)
    assert not c.use_kurtosis and not c.prune_hidden and not c.distill and c.shape == "uniform"
    e = APTConfig().resolve(100, 10, decoder=False)
    assert (e.recipe, e.adapter_targets, e.initial_density, e.use_kurtosis) == (
        "gradual",
        ("q", "v", "up"),
        None,
        False,
    )
    with pytest.raises(ConfigError, match="initial_density"):
        APTConfig(target_density=0.7, initial_density=0.5)


@pytest.mark.parametrize("shape", ["per-layer", "uniform"])
def test_one_shot_prunes_to_the_target_before_the_first_step(shape):
    model = decoder()
    base = count_prunable(StructureShape.of(describe(model)))
    controller = APTController(model, one_shot_config(shape=shape), total_steps=20, steps_per_epoch=5)
    with pytest.raises(RuntimeError, match="calibrate"):
        controller.before_forward()
    summary = controller.calibrate(lm_batches(3))
    assert summary["scoring_passes"] == summary["rows"] == 12  # 3 batches of 4 rows, one row per pass
    shape_now = StructureShape.of(describe(controller.model))
    assert count_prunable(shape_now) <= int(0.6 * base)  # the budget is met to the parameter, physically
    assert count_prunable(shape_now) < base
    assert shape_now.hidden == 32  # decoders keep the hidden size by default
    if shape == "uniform":
        assert len(set(shape_now.units)) == 1 and len(set(shape_now.neurons)) == 1
        assert shape_now.neurons[0] % 8 == 0
    assert all(p.grad is None for p in controller.trainable_parameters())  # adapters not stepped
    assert controller.state_dict()["calibrated"]  # a resumed run does not prune a second time
    # only the adapters train: the LM head and the embeddings stay frozen
    trained = [n for n, p in controller.model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    # no block salience is gathered while tuning at the target; ranks still grow
    optimizer = torch.optim.AdamW(controller.trainable_parameters(), lr=1e-3)
    ranks = [a.rank for a in controller.adapters]
    for step, batch in enumerate(lm_batches(16, seed=3)):
        controller.before_forward()
        assert not controller.collector.active
        controller.model(**batch).loss.backward()
        controller.after_backward()
        optimizer.step()
        optimizer.zero_grad()
        if controller.after_step():
            optimizer = torch.optim.AdamW(controller.trainable_parameters(), lr=1e-3)
        if step > 14:
            break
    assert count_prunable(StructureShape.of(describe(controller.model))) == count_prunable(shape_now)
    assert sum(a.rank for a in controller.adapters) > sum(ranks)


def test_one_shot_above_the_target_continues_gradually():
    model = decoder()
    base = count_prunable(StructureShape.of(describe(model)))
    config = one_shot_config(target_density=0.5, initial_density=0.8, decay_window=2)
    controller = APTController(model, config, total_steps=20, steps_per_epoch=5)
    controller.calibrate(lm_batches(3))
    after_calibration = count_prunable(StructureShape.of(describe(controller.model)))
    assert int(0.5 * base) < after_calibration <= int(0.8 * base)
    optimizer = torch.optim.AdamW(controller.trainable_parameters(), lr=1e-3)
    for batch in lm_batches(16, seed=4):
        controller.before_forward()
        controller.model(**batch).loss.backward()
        controller.after_backward()
        optimizer.step()
        optimizer.zero_grad()
        if controller.after_step():
            optimizer = torch.optim.AdamW(controller.trainable_parameters(), lr=1e-3)
    model = controller.finish()
    assert count_prunable(StructureShape.of(describe(model))) <= int(0.5 * base)


def test_calibration_runs_backward_and_sums_per_batch_salience():
    """The one-shot scores are the sum over scoring passes (one row each) of each pass's S~ (forward and
    backward)."""
    model = decoder()
    batches = lm_batches(3)
    reference = decoder()
    add_adapters(reference, ("q", "v"), rank=8)  # B = 0: the same function and gradients as the model's
    collector = SalienceCollector(reference, describe(reference), track_inputs=False)
    per_batch = []
    for b in batches:
        for row in range(len(b["input_ids"])):  # one row per scoring pass (one_shot_micro_batch = 1)
            collector.start()
            reference(**{k: v[row : row + 1] for k, v in b.items()}).loss.backward()
            per_batch.append(collector.scores())
    expected = BlockScores(
        [sum(s.heads[i] for s in per_batch) for i in range(3)],
        [sum(s.neurons[i] for s in per_batch) for i in range(3)],
        sum(s.hidden for s in per_batch),
    )
    controller = APTController(model, one_shot_config(use_kurtosis=False, target_density=0.99), 20, 5)
    seen = calibrated_scores(controller, batches)
    for got, want in zip(seen.heads, expected.heads, strict=True):
        torch.testing.assert_close(got.float(), want, rtol=1e-5, atol=1e-8)
    for got, want in zip(seen.neurons, expected.neurons, strict=True):
        torch.testing.assert_close(got.float(), want, rtol=1e-5, atol=1e-8)
    assert all(float(h.sum()) > 0 for h in expected.heads)  # the gradient hooks fired


def test_taylor_one_shot_scores_heads_and_neurons_like_llm_pruners_importance():
    """``one_shot_salience="taylor"``: the heads and neurons are scored by ``|w x dL/dw|`` summed over their
    weights, from the gradients the scoring passes accumulate (here one pass per batch: exactly LLM-Pruner's
    importance on the same batches); hidden channels keep the activation salience; no gradient is left
    behind and the frozen weights stay frozen. The Taylor ranking differs from the activation ranking."""
    from aptune.methods.llm_pruner.importance import taylor_scores

    batches = lm_batches(3)
    reference = decoder().eval()
    heads, neurons = taylor_scores(reference, batches)

    def scored(salience: str) -> BlockScores:
        model = decoder().eval()
        config = one_shot_config(target_density=0.99, one_shot_salience=salience, one_shot_micro_batch=4)
        seen = calibrated_scores(APTController(model, config, 20, 5), batches)
        assert all(p.grad is None for p in model.parameters())
        assert {n for n, p in model.named_parameters() if p.requires_grad} == {
            n for n, p in model.named_parameters() if "lora_" in n
        }
        return seen

    taylor, activation = scored("taylor"), scored("activation")
    for got, want in zip(taylor.heads + taylor.neurons, heads + neurons, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-10)
    torch.testing.assert_close(taylor.hidden, activation.hidden)
    ranks = [torch.argsort(t) for t in taylor.neurons]
    assert any(not torch.equal(r, torch.argsort(a)) for r, a in zip(ranks, activation.neurons, strict=True))
    with pytest.raises(ConfigError, match="one_shot_salience must be one of"):
        APTConfig(one_shot_salience="fisher")


def test_select_uniform_picks_the_best_aligned_uniform_shape():
    model = decoder()
    shape = StructureShape.of(describe(model))
    g = torch.Generator().manual_seed(0)
    heads = [torch.rand(2, generator=g) for _ in range(3)]
    neurons = [torch.rand(64, generator=g) for _ in range(3)]
    target = int(0.55 * count_prunable(shape))
    sel = select_uniform(shape, heads, neurons, target, ffn_multiple=8)
    assert sel.params == count_prunable(sel.shape) <= target
    units, widths = {int(k.sum()) for k in sel.heads}, {int(k.sum()) for k in sel.neurons}
    assert len(units) == 1 and len(widths) == 1 and widths.pop() % 8 == 0
    # within a layer the kept blocks are the best-scoring ones
    for keep, s in zip(sel.neurons, neurons, strict=True):
        assert float(s[keep].min()) >= float(s[~keep].max())
    # brute force over every uniform shape: none keeps more score within the budget
    best = 0.0
    for u in (1, 2):
        for f in range(8, 65, 8):
            from aptune.selection import uniform_shape

            if count_prunable(uniform_shape(shape, u, f)) <= target:
                gain = sum(float(h.topk(u).values.sum()) for h in heads) + sum(
                    float(n.topk(f).values.sum()) for n in neurons
                )
                best = max(best, gain)
    kept = sum(float(h[k].sum()) for h, k in zip(heads, sel.heads, strict=True)) + sum(
        float(n[k].sum()) for n, k in zip(neurons, sel.neurons, strict=True)
    )
    assert kept == pytest.approx(best)
    # the per-layer selection keeps at least as much score under the same budget (it is less constrained)
    free = select_blocks(shape, heads, neurons, torch.ones(32), target, ffn_multiple=8, prune_hidden=False)
    assert free.params <= target
    with pytest.raises(ValueError, match="no uniform shape"):
        select_uniform(shape, heads, neurons, 10, ffn_multiple=8)


def test_uniform_density_out_of_reach_is_a_clear_error():
    model = decoder()
    controller = APTController(model, one_shot_config(shape="uniform", target_density=0.01), 20, 5)
    with pytest.raises(ValueError, match="no uniform shape fits"):
        controller.calibrate(lm_batches(1))


@pytest.mark.parametrize("shape", ["per-layer", "uniform"])
def test_pruned_decoder_generates_like_the_masked_one_and_uniform_loads_plainly(shape, tmp_path):
    model = decoder(seed=2)
    controller = APTController(model, one_shot_config(shape=shape, target_density=0.5), 20, 5)
    # score, select and set the masks, but keep the model masked (not compacted) for the comparison
    controller.prune_physically = lambda: None
    controller.calibrate(lm_batches(2))
    masked = controller.model.eval()
    merge_adapters(masked)
    prompt = torch.randint(2, VOCAB, (2, 5), generator=torch.Generator().manual_seed(9))
    kw = dict(max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    with torch.no_grad():
        want_tokens = masked.generate(prompt, **kw)
        want_logits = masked(prompt).logits
    compacted = controller.finish()  # compacts what the binary masks removed
    assert count_prunable(StructureShape.of(describe(compacted))) < count_prunable(
        StructureShape.of(describe(decoder()))
    )
    with torch.no_grad():
        torch.testing.assert_close(compacted(prompt).logits, want_logits, atol=1e-5, rtol=1e-5)
        assert torch.equal(compacted.generate(prompt, **kw), want_tokens)
    aptune.save_pruned(compacted, tmp_path / "m")
    if shape == "uniform":
        assert aptune.read_structure(tmp_path / "m").plain_loadable
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    else:
        plain = aptune.load_pruned(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(plain(prompt).logits, want_logits, atol=1e-5, rtol=1e-5)
        assert torch.equal(plain.generate(prompt, **kw), want_tokens)


def test_salience_counts_each_block_once_under_gradient_checkpointing():
    batches = lm_batches(2)
    results = []
    for checkpointing in (False, True):
        model = decoder(seed=5)
        add_adapters(model, ("q", "v"), rank=4)
        if checkpointing:
            set_activation_checkpointing(model, True)
        model.train()
        collector = SalienceCollector(model, describe(model), track_inputs=True)
        collector.start()
        for b in batches:  # two micro-batches of one optimizer step
            model(**b).loss.backward()
        inputs = collector.mean_inputs()
        results.append((collector.scores(), inputs))
    (plain, plain_in), (ckpt, ckpt_in) = results
    for a, b in zip(plain.tensors(), ckpt.tensors(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    for a, b in zip(plain_in[0], ckpt_in[0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
