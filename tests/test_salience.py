"""Block salience equals a brute-force computation on a tiny model."""

from __future__ import annotations

import torch
from conftest import tiny_batch, tiny_model

import aptune
from aptune.salience import BlockScores, SalienceCollector, ema, kurtosis, outlier_term


def brute_force_scores(model, batch, labels, use_kurtosis: bool):
    """Capture the hooked tensors with retain_grad and score channel by channel in plain Python loops."""
    structure = aptune.describe(model)
    captured: dict[str, list] = {"o": [], "down": [], "q": [], "up": []}

    def keep(kind):
        def hook(module, args):
            x = args[0]
            x.retain_grad()
            captured[kind].append(x)

        return hook

    handles = []
    for s in structure.attention:
        handles += [s.o.register_forward_pre_hook(keep("o")), s.q.register_forward_pre_hook(keep("q"))]
    for s in structure.ffn:
        handles += [
            s.down.register_forward_pre_hook(keep("down")),
            s.up.register_forward_pre_hook(keep("up")),
        ]
    loss = torch.nn.functional.cross_entropy(model(**batch).logits, labels)
    loss.backward()
    for h in handles:
        h.remove()

    def channel_scores(x):
        h, g = x.detach().reshape(-1, x.shape[-1]), x.grad.reshape(-1, x.shape[-1])
        return torch.tensor(
            [float(h[:, c].abs().sum()) * float(g[:, c].abs().sum()) for c in range(h.shape[1])]
        )

    d = structure.hidden.size
    hidden = torch.zeros(d)
    heads = []
    for s, x in zip(structure.attention, captured["o"], strict=True):
        per = channel_scores(x)
        score = torch.tensor(
            [float(per[i * s.head_dim : (i + 1) * s.head_dim].sum()) for i in range(s.num_heads)]
        )
        if use_kurtosis:
            xbar = x.detach().reshape(-1, x.shape[-1]).mean(0)
            o = s.o.weight.detach() * xbar[None, :]
            for i in range(s.num_heads):
                entries = o[:, i * s.head_dim : (i + 1) * s.head_dim].flatten()
                score[i] += outlier_term(entries, dim=0)
            for j in range(d):
                hidden[j] += outlier_term(o[j], dim=0)
        heads.append(score)
    neurons = []
    for s, x in zip(structure.ffn, captured["down"], strict=True):
        score = channel_scores(x)
        if use_kurtosis:
            xbar = x.detach().reshape(-1, x.shape[-1]).mean(0)
            o = s.down.weight.detach() * xbar[None, :]
            for k in range(s.num_neurons):
                score[k] += outlier_term(o[:, k], dim=0)
            for j in range(d):
                hidden[j] += outlier_term(o[j], dim=0)
        neurons.append(score)
    for x in captured["q"] + captured["up"]:
        hidden += channel_scores(x)
    return BlockScores(heads, neurons, hidden)


def test_kurtosis_of_known_samples():
    normalish = torch.tensor(
        [-1.0, 1.0, -1.0, 1.0]
    )  # two-point distribution: excess kurtosis -2 (biased std)
    assert kurtosis(normalish, 0) < 0
    spiky = torch.zeros(100)
    spiky[0] = 10.0
    assert kurtosis(spiky, 0) > 50
    assert outlier_term(torch.ones(5), 0) == 0  # zero variance -> 0, not NaN


def test_ema_weights():
    assert torch.allclose(ema(torch.tensor([1.0]), torch.tensor([0.0])), torch.tensor([0.85]))
    assert torch.equal(ema(None, torch.tensor([2.0])), torch.tensor([2.0]))


def test_collector_matches_brute_force():
    for use_kurtosis in (False, True):
        model = tiny_model("BertForSequenceClassification", seed=4)
        model.train()
        batch = tiny_batch(2)
        labels = torch.tensor([0, 2, 1])
        collector = SalienceCollector(model, aptune.describe(model), use_kurtosis=use_kurtosis)
        collector.start()
        loss = torch.nn.functional.cross_entropy(model(**batch).logits, labels)
        loss.backward()
        got = collector.scores()
        collector.remove()
        model.zero_grad()
        expected = brute_force_scores(model, batch, labels, use_kurtosis)
        for a, b in zip(got.tensors(), expected.tensors(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        assert all(bool((t > 0).all()) for t in got.tensors())


def test_masked_heads_lose_salience():
    model = tiny_model("BertForSequenceClassification", seed=4)
    masks = aptune.StructuralMasks.for_model(model)
    masks.set_heads(0, [1, 0, 1, 1])
    aptune.apply_masks(model, masks)
    collector = SalienceCollector(model, aptune.describe(model), use_kurtosis=False)
    collector.start()
    torch.nn.functional.cross_entropy(model(**tiny_batch(2)).logits, torch.tensor([0, 2, 1])).backward()
    scores = collector.scores()
    assert scores.heads[0][1] == 0 and bool((scores.heads[0][[0, 2, 3]] > 0).all())
