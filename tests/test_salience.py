"""Block salience equals a brute-force computation on a tiny model."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_batch, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

import aptune
import aptune.salience
from aptune.salience import (
    BlockScores,
    SalienceCollector,
    ema,
    kurtosis,
    outlier_scores,
    outlier_term,
    with_outliers,
)


def brute_force_scores(model, batch, labels):
    """Capture the hooked tensors with retain_grad and score channel by channel in plain Python loops:
    (sum over real tokens of |h|) x (sum over real tokens of |g|) / (number of real tokens)."""
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
    real = batch["attention_mask"].bool()
    n = int(real.sum())

    def channel_scores(x):
        h, g = x.detach()[real], x.grad[real]  # (real tokens, channels)
        return torch.tensor(
            [float(h[:, c].abs().sum()) * float(g[:, c].abs().sum()) / n for c in range(h.shape[1])]
        )

    d = structure.hidden.size
    hidden = torch.zeros(d)
    heads = []
    for s, x in zip(structure.attention, captured["o"], strict=True):
        per = channel_scores(x)
        heads.append(
            torch.tensor(
                [float(per[i * s.head_dim : (i + 1) * s.head_dim].sum()) for i in range(s.num_heads)]
            )
        )
    neurons = [channel_scores(x) for x in captured["down"]]
    for x in captured["q"] + captured["up"]:
        hidden += channel_scores(x)
    means = {kind: [x.detach()[real].mean(0) for x in captured[kind]] for kind in ("o", "down")}
    return BlockScores(heads, neurons, hidden), means


def brute_force_outliers(model, means):
    """The outlier term with explicit loops: kurtosis over each head's columns, each neuron's column and
    each hidden channel's row of O = W * mean input."""
    structure = aptune.describe(model)
    hidden = torch.zeros(structure.hidden.size)
    heads, neurons = [], []
    for s, xbar in zip(structure.attention, means["o"], strict=True):
        o = s.o.weight.detach() * xbar[None, :]
        heads.append(
            torch.stack(
                [
                    outlier_term(o[:, i * s.head_dim : (i + 1) * s.head_dim].flatten(), dim=0)
                    for i in range(s.num_heads)
                ]
            )
        )
        hidden += torch.stack([outlier_term(o[j], dim=0) for j in range(o.shape[0])])
    for s, xbar in zip(structure.ffn, means["down"], strict=True):
        o = s.down.weight.detach() * xbar[None, :]
        neurons.append(torch.stack([outlier_term(o[:, k], dim=0) for k in range(o.shape[1])]))
        hidden += torch.stack([outlier_term(o[j], dim=0) for j in range(o.shape[0])])
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


# Both of the collector's device paths, run here on the CPU: the host's (abs + sum, a padding-free mask skipped)
# and an accelerator's (a 1-norm reduction; the mask always applied, since reading it would cost a sync).
PATHS = pytest.mark.parametrize("host_side", [True, False], ids=["host-path", "accelerator-path"])


def use_path(monkeypatch, host_side: bool) -> None:
    monkeypatch.setattr(aptune.salience, "_host_side", lambda x: host_side)


@PATHS
def test_collector_matches_brute_force(monkeypatch, host_side):
    use_path(monkeypatch, host_side)
    model = tiny_model("BertForSequenceClassification", seed=4)
    model.train()
    batch = tiny_batch(2)  # one padded row
    labels = torch.tensor([0, 2, 1])
    collector = SalienceCollector(model, aptune.describe(model))
    collector.start()
    loss = torch.nn.functional.cross_entropy(model(**batch).logits, labels)
    loss.backward()
    heads_in, neurons_in = collector.mean_inputs()
    got = collector.scores()
    collector.remove()
    model.zero_grad()
    expected, means = brute_force_scores(model, batch, labels)
    for a, b in zip(got.tensors(), expected.tensors(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert all(bool((t > 0).all()) for t in got.tensors())
    for a, b in zip(heads_in + neurons_in, means["o"] + means["down"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    outliers = outlier_scores(aptune.describe(model), heads_in, neurons_in)
    for a, b in zip(outliers.tensors(), brute_force_outliers(model, means).tensors(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@PATHS
def test_scores_do_not_depend_on_padding(monkeypatch, host_side):
    """Padding the same examples to the longest row or to a fixed length gives the same scores (finding 6)."""
    use_path(monkeypatch, host_side)
    model = tiny_model("BertForSequenceClassification", seed=4)
    model.train()
    labels = torch.tensor([0, 2, 1])
    short = tiny_batch(2)  # 9 tokens, one row padded from 6
    padded = {k: torch.nn.functional.pad(v, (0, 40)) for k, v in short.items()}  # 49 tokens, pad id 0
    results = []
    for batch in (short, padded):
        collector = SalienceCollector(model, aptune.describe(model))
        collector.start()
        torch.nn.functional.cross_entropy(model(**batch).logits, labels).backward()
        inputs = collector.mean_inputs()
        results.append((collector.scores(), inputs))
        collector.remove()
        model.zero_grad()
    (a, (ah, an)), (b, (bh, bn)) = results
    for x, y in zip(a.tensors() + ah + an, b.tensors() + bh + bn, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-7)


def test_scores_do_not_grow_with_the_batch():
    """The same rows twice in one batch give the same per-token scores as once (finding 1: S~ no longer
    grows with the batch, so it keeps its scale against the outlier term)."""
    model = tiny_model("BertForSequenceClassification", seed=4)
    model.train()
    batch, labels = tiny_batch(2), torch.tensor([0, 2, 1])
    double = {k: torch.cat([v, v]) for k, v in batch.items()}
    results = []
    for b, y in ((batch, labels), (double, torch.cat([labels, labels]))):
        collector = SalienceCollector(model, aptune.describe(model))
        collector.start()
        torch.nn.functional.cross_entropy(model(**b).logits, y).backward()
        results.append(collector.scores())
        collector.remove()
        model.zero_grad()
    for x, y in zip(results[0].tensors(), results[1].tensors(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-7)


def test_outlier_term_is_commensurate_and_fades_with_the_mask():
    salience = BlockScores(
        [torch.tensor([100.0, 300.0])], [torch.tensor([1.0, 2.0, 3.0])], torch.tensor([5.0, 5.0])
    )
    outliers = BlockScores(
        [torch.tensor([1.0, 3.0])], [torch.tensor([0.5, 0.0, 1.0])], torch.tensor([2.0, 0.0])
    )
    combined = with_outliers(salience, outliers, weight=0.5)
    # per type, the bonus averages weight x the mean salience of that type
    torch.testing.assert_close(combined.heads[0] - salience.heads[0], torch.tensor([50.0, 150.0]))
    torch.testing.assert_close(
        combined.neurons[0] - salience.neurons[0], torch.tensor([1.0 / 3, 0.0, 2.0 / 3]) * 3
    )
    torch.testing.assert_close(combined.hidden - salience.hidden, torch.tensor([5.0, 0.0]))
    # scaling the salience (a bigger batch, a larger loss) scales the bonus with it: the choice is unchanged
    scaled = BlockScores(
        [t * 1000 for t in salience.heads], [t * 1000 for t in salience.neurons], salience.hidden * 1000
    )
    combined_scaled = with_outliers(scaled, outliers, weight=0.5)
    for x, y in zip(combined_scaled.tensors(), combined.tensors(), strict=True):
        torch.testing.assert_close(x, y * 1000)
    # a masked block has no bonus; a half-decayed one has half
    masks = BlockScores([torch.tensor([0.0, 1.0])], [torch.tensor([1.0, 1.0, 0.5])], torch.tensor([1.0, 1.0]))
    faded = with_outliers(salience, outliers, weight=0.5, masks=masks)
    assert faded.heads[0][0] == salience.heads[0][0]
    torch.testing.assert_close(faded.neurons[0][2] - salience.neurons[0][2], torch.tensor(1.0))


def test_masked_heads_lose_salience():
    model = tiny_model("BertForSequenceClassification", seed=4)
    masks = aptune.StructuralMasks.for_model(model)
    masks.set_heads(0, [1, 0, 1, 1])
    aptune.apply_masks(model, masks)
    collector = SalienceCollector(model, aptune.describe(model))
    collector.start()
    torch.nn.functional.cross_entropy(model(**tiny_batch(2)).logits, torch.tensor([0, 2, 1])).backward()
    scores = collector.scores()
    assert scores.heads[0][1] == 0 and bool((scores.heads[0][[0, 2, 3]] > 0).all())


class _OpCounter(TorchDispatchMode):
    """Counts the ATen operations that run inside it and would launch a kernel on a GPU (not views)."""

    VIEWS = {
        "detach",
        "view",
        "_unsafe_view",
        "alias",
        "unsqueeze",
        "squeeze",
        "slice",
        "select",
        "split",
        "split_with_sizes",
        "expand",
        "t",
        "transpose",
        "permute",
        "as_strided",
        "unbind",
    }

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ not in self.VIEWS
        return func(*args, **(kwargs or {}))


def scoring_ops(layers: int, padded: bool = True) -> tuple[int, int]:
    """(operations the collector adds to one forward and backward, operations of ``scores()``) for a tiny
    BERT of ``layers`` layers, every site hooked (all parameters train), on one batch with or without padding."""
    model = tiny_model("BertForSequenceClassification", seed=4, num_hidden_layers=layers)
    model.train()
    batch, labels = tiny_batch(2), torch.tensor([0, 2, 1])
    if not padded:
        batch["attention_mask"].fill_(1)
    collector = SalienceCollector(model, aptune.describe(model), track_inputs=False)
    counts = []
    for active in (False, True):
        collector.start() if active else collector.stop()
        with _OpCounter() as counter:
            torch.nn.functional.cross_entropy(model(**batch).logits, labels).backward()
        counts.append(counter.count)
        model.zero_grad()
    with _OpCounter() as counter:
        collector.scores()
    collector.remove()
    return counts[1] - counts[0], counter.count


def test_scoring_launches_few_kernels_per_site_and_a_fixed_number_per_step(monkeypatch):
    """On an accelerator, a small model's step is bound by kernel launches (issue 11, item 7): each hooked site
    costs one 1-norm in the forward and one in the backward, plus a mask multiply in the forward only when the
    batch has padding, and turning a step's sums into scores takes as many operations for 4 layers as for 2."""
    use_path(monkeypatch, False)
    sites_added = 2 * 4  # per layer: the heads' and the neurons' inputs, the q and up inputs (hidden)
    for padded, per_site in ((True, 3), (False, 2)):
        hooks2, scores2 = scoring_ops(2, padded)
        hooks4, scores4 = scoring_ops(4, padded)
        assert hooks4 - hooks2 <= per_site * sites_added, (padded, hooks2, hooks4)
        assert scores4 == scores2, (padded, scores2, scores4)


@PATHS
def test_micro_batches_with_and_without_padding_add_up(monkeypatch, host_side):
    """Micro-batches with and without padding accumulate to the scores of one batch of all their rows. A
    padding-free batch skips the mask and counts its tokens on the host, a padded one on the device; the counts
    add up in either order."""
    use_path(monkeypatch, host_side)
    model = tiny_model("BertForSequenceClassification", seed=4)
    model.train()
    full_a, padded, full_b = tiny_batch(3), tiny_batch(2), tiny_batch(5)
    full_a["attention_mask"].fill_(1)
    full_b["attention_mask"].fill_(1)
    parts = [
        (full_a, torch.tensor([1, 1, 0])),
        (padded, torch.tensor([0, 2, 1])),
        (full_b, torch.tensor([2, 0, 0])),
    ]
    collector = SalienceCollector(model, aptune.describe(model))

    def run(pieces):
        collector.start()
        for batch, labels in pieces:  # summed losses: the gradients of the parts add up to the whole's
            loss = torch.nn.functional.cross_entropy(model(**batch).logits, labels, reduction="sum")
            loss.backward()
        inputs = collector.mean_inputs()
        scores = collector.scores()
        model.zero_grad()
        return scores.tensors() + inputs[0] + inputs[1]

    got = run(parts)
    whole = {k: torch.cat([b[k] for b, _ in parts]) for k in padded}
    want = run([(whole, torch.cat([y for _, y in parts]))])
    collector.remove()
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
