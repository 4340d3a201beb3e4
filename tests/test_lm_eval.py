"""Language-model evaluation: strided perplexity against brute force, multiple choice against lm-eval."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_lm import tiny_bos_tokenizer, tiny_causal_lm, tiny_tokenizer
from torch import nn

from aptune.evaluate import (
    DEFAULT_TEMPLATE,
    encode_choice,
    evaluate_lm,
    lm_eval_multiple_choice,
    load_multiple_choice,
    multiple_choice,
    perplexity,
    sliding_windows,
)

TEXTS = [
    "The quick brown fox jumps over the lazy dog. The cat sat on the mat.",
    "A language model predicts the next token from the ones before it. Birds sing in the morning.",
    "Pruning removes attention heads, neurons and hidden channels. The dog ran in the park.",
    "Hello, how are you today?",
]

# choices of different lengths (in tokens and characters), so that acc and acc_norm differ
MC_ROWS = [
    {"question": "what is two plus two?", "choices": ["four", "the cat sat on the mat", "dog"], "answer": 0},
    {
        "question": "Which animal is lazy?",
        "choices": ["the fox", "the dog", "a bird in the park"],
        "answer": 1,
    },
    {"question": "What do birds do in the morning?", "choices": ["sing", "prune heads", "sit"], "answer": 0},
    {"question": "What removes attention heads?", "choices": ["pruning", "the cat", "mat", "x"], "answer": 0},
    {"question": "Who jumps over the dog?", "choices": ["the quick brown fox", "a cat"], "answer": 0},
    {"question": "How are you today?", "choices": ["fine, thank you", "no", "brown"], "answer": 0},
    {"question": "Where did the dog run?", "choices": ["in the park", "on the mat", "z"], "answer": 0},
    {
        "question": "What predicts the next token?",
        "choices": ["a language model", "a fox", "hi"],
        "answer": 0,
    },
    {"question": "What did the cat sit on?", "choices": ["a", "the mat", "the lazy dog today"], "answer": 1},
    {"question": "Is 0123 a number? ", "choices": ["Yes", "No"], "answer": 0},
    {"question": "Pick a letter.", "choices": ["abc", "ABCDEFG", "q", "xyz!"], "answer": 2},
    {"question": "Which is a colour?", "choices": ["brown", "quick", "jumps over"], "answer": 0},
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_causal_lm(seed=3)


@pytest.fixture(scope="module")
def bos_tok():
    """Adds ``<bos>`` first to every plain encode, as Gemma's tokenizer does."""
    return tiny_bos_tokenizer()


@pytest.fixture(scope="module")
def bos_model(bos_tok):
    return tiny_causal_lm(vocab_size=len(bos_tok), seed=3)


class RecordingLM(nn.Module):
    """Wraps a causal LM and keeps the unpadded token ids of every row it reads."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.rows = inner, []

    def forward(self, input_ids, attention_mask=None, **kwargs):
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            self.rows.append([token for token, keep in zip(ids, mask, strict=True) if keep])
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


class ConstantLM(nn.Module):
    """Wraps a causal LM but returns the same logit for every token: every continuation is equally likely."""

    def __init__(self, inner: nn.Module, value: float = 0.0):
        super().__init__()
        self.inner, self.value = inner, value

    def forward(self, input_ids, attention_mask=None, **kwargs):
        logits = self.inner(input_ids=input_ids, attention_mask=attention_mask).logits
        return SimpleNamespace(logits=torch.full_like(logits, self.value))


# ------------------------------------------------------------------------------------------------ windows


@pytest.mark.parametrize(
    "length, max_length, stride",
    [(1, 4, 4), (2, 4, 4), (5, 4, 4), (17, 4, 4), (17, 4, 1), (17, 5, 3), (9, 8, 8), (8, 8, 2), (30, 1, 1)],
)
def test_windows_score_every_token_but_the_first_once(length, max_length, stride):
    scored = []
    for w in sliding_windows(length, max_length, stride):
        assert 1 <= w.end - w.begin <= max_length  # the model never reads more than max_length tokens
        assert 1 <= w.scored <= min(stride if w.begin else max_length, w.end - w.begin)
        scored += range(w.end - w.scored + 1, w.end + 1)  # target positions of the scored predictions
    assert scored == list(range(1, length))


def test_windows_reject_a_stride_past_the_window():
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(10, 4, 5)


# --------------------------------------------------------------------------------------------- perplexity


def brute_force_nll(model, documents, context_start, bos: int | None = None) -> tuple[float, int]:
    """Summed NLL with target t predicted from ids[context_start(t):t] (one forward per distinct start);
    with ``bos``, a context that does not start the document starts with ``bos`` in place of its first token."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in documents:
            by_start: dict[int, list[int]] = {}
            for t in range(1, len(ids)):
                by_start.setdefault(context_start(t), []).append(t)
            for start, targets in by_start.items():  # a causal model: one forward serves every target
                inputs = ids[start : max(targets)]
                if bos is not None and start > 0:
                    inputs = [bos, *inputs[1:]]
                logits = model(input_ids=torch.tensor([inputs])).logits[0]
                for t in targets:
                    total -= float(logits[t - 1 - start].float().log_softmax(-1)[ids[t]])
                    count += 1
    return total, count


def test_perplexity_equals_one_long_forward_per_document(model, tok):
    result = perplexity(model, tok, TEXTS, max_length=64)
    documents = [tok(text)["input_ids"] for text in TEXTS]
    assert max(map(len, documents)) <= 64  # each document fits in one window
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in documents:
            log_probs = model(input_ids=torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
            total -= float(log_probs.gather(-1, torch.tensor(ids[1:])[:, None]).double().sum())
            count += len(ids) - 1
    assert result.tokens == count
    assert result.documents == len(TEXTS)
    assert result.nll == pytest.approx(total / count, abs=1e-5)
    assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)


def window_start(max_length: int, stride: int):
    """Target t is first predicted by window k = the first with k * stride + max_length >= t."""
    return lambda t: max(0, math.ceil((t - max_length) / stride)) * stride


@pytest.mark.parametrize("max_length, stride", [(8, 8), (8, 3), (5, 1)])
def test_strided_perplexity_matches_a_per_token_reference(model, tok, max_length, stride):
    texts = TEXTS[:2]
    documents = [tok(text)["input_ids"] for text in texts]
    result = perplexity(model, tok, texts, max_length=max_length, stride=stride, batch_size=16)
    total, count = brute_force_nll(model, documents, window_start(max_length, stride))
    assert result.tokens == count == sum(len(ids) - 1 for ids in documents)
    assert (result.window, result.stride, result.bos) == (max_length, stride, False)
    assert result.nll == pytest.approx(total / count, abs=1e-5)


@pytest.mark.parametrize("max_length, stride", [(8, 8), (8, 3), (5, 1), (64, 64)])
def test_every_window_starts_with_bos_and_scores_each_text_token_once(bos_model, bos_tok, max_length, stride):
    bos = bos_tok.bos_token_id
    texts = TEXTS[:3]
    text_ids = [bos_tok(text, add_special_tokens=False)["input_ids"] for text in texts]
    recorder = RecordingLM(bos_model)
    result = perplexity(recorder, bos_tok, texts, max_length=max_length, stride=stride, batch_size=3)
    assert result.bos and result.tokens == sum(map(len, text_ids))  # every text token, the BOS never
    assert len(recorder.rows) == sum(
        len(sliding_windows(len(ids) + 1, max_length, stride)) for ids in text_ids
    )
    for row in recorder.rows:
        assert 1 <= len(row) <= max_length and row[0] == bos and bos not in row[1:]
    documents = [[bos, *ids] for ids in text_ids]
    total, count = brute_force_nll(bos_model, documents, window_start(max_length, stride), bos=bos)
    assert count == result.tokens
    assert result.nll == pytest.approx(total / count, abs=1e-5)


def test_bos_option_forces_or_drops_the_bos(model, tok, bos_model, bos_tok):
    bos = bos_tok.bos_token_id
    auto = perplexity(bos_model, bos_tok, TEXTS, max_length=12, stride=5)
    assert perplexity(bos_model, bos_tok, TEXTS, max_length=12, stride=5, bos=True) == auto
    # pre-tokenized documents that already start with <bos> get no second one
    ids = [bos_tok(text)["input_ids"] for text in TEXTS]
    assert ids[0][0] == bos
    assert perplexity(bos_model, bos_tok, ids, max_length=12, stride=5) == auto
    assert perplexity(bos_model, None, [i[1:] for i in ids], max_length=12, stride=5).bos is False
    # bos=False scores the same text tokens as a tokenizer that adds no BOS
    off = perplexity(bos_model, bos_tok, TEXTS, max_length=12, stride=5, bos=False)
    plain = perplexity(bos_model, tok, TEXTS, max_length=12, stride=5)
    assert not off.bos and not plain.bos and off.tokens == plain.tokens == auto.tokens - len(TEXTS)
    assert off.nll == pytest.approx(plain.nll, abs=1e-6) and off.nll != pytest.approx(auto.nll, abs=1e-3)
    with pytest.raises(ValueError, match="no beginning-of-sequence token"):
        perplexity(model, tok, TEXTS, bos=True)


def test_batching_padding_and_pretokenized_input_do_not_change_the_result(model, tok):
    one = perplexity(model, tok, TEXTS, max_length=12, stride=5, batch_size=1)
    many = perplexity(model, tok, TEXTS, max_length=12, stride=5, batch_size=7)
    ids = perplexity(model, None, [tok(text)["input_ids"] for text in TEXTS], max_length=12, stride=5)
    assert one.tokens == many.tokens == ids.tokens
    assert many.nll == pytest.approx(one.nll, abs=1e-6)
    assert ids.nll == pytest.approx(one.nll, abs=1e-6)
    assert json.loads(json.dumps(one.to_dict())) == one.to_dict()


def test_short_documents_are_skipped_and_train_mode_is_restored(model, tok):
    model.train()
    try:
        result = perplexity(model, tok, ["", "a", TEXTS[3]], max_length=16)
        assert model.training
    finally:
        model.eval()
    assert result.documents == 1
    assert result.tokens == len(tok(TEXTS[3])["input_ids"]) - 1


@pytest.mark.parametrize(
    "texts, kwargs, message",
    [
        ([], {}, "no texts"),
        (TEXTS, {"max_length": 4, "stride": 5}, "stride"),
        (["", "a", [7]], {}, "nothing to score"),
        (TEXTS, {"max_length": 0}, "max_length"),
    ],
)
def test_perplexity_errors(model, tok, texts, kwargs, message):
    with pytest.raises(ValueError, match=message):
        perplexity(model, tok, texts, **kwargs)


# ---------------------------------------------------------------------------------------- multiple choice


def test_scores_are_continuation_log_likelihoods_and_batching_does_not_matter(model, tok):
    result = multiple_choice(model, tok, MC_ROWS[:3], batch_size=1)
    batched = multiple_choice(model, tok, MC_ROWS[:3], batch_size=5)
    row = MC_ROWS[0]
    context = DEFAULT_TEMPLATE.format(question=row["question"])
    with torch.no_grad():
        for choice, score in zip(row["choices"], result.scores[0], strict=True):
            context_ids, continuation_ids = encode_choice(tok, context, " " + choice)
            ids = context_ids + continuation_ids
            log_probs = model(input_ids=torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
            expected = log_probs[-len(continuation_ids) :].gather(-1, torch.tensor(continuation_ids)[:, None])
            assert score == pytest.approx(float(expected.sum()), abs=1e-5)
    for a, b in zip(result.scores, batched.scores, strict=True):
        assert a == pytest.approx(b, abs=1e-5)


def test_a_model_scoring_every_choice_alike_is_never_right(model, tok):
    # every answer is index 0 (where lm-eval's first-index tie-break would land) and all choices have the
    # same number of tokens and characters, so a constant model ties on both scores
    choices = ["fox", "red", "mat"]
    lengths = {len(encode_choice(tok, "Question: q\nAnswer:", " " + c)[1]) for c in choices}
    assert len(lengths) == 1
    rows = [{"question": f"question {i}?", "choices": choices, "answer": 0} for i in range(5)]
    result = multiple_choice(ConstantLM(model), tok, rows)
    assert (result.acc, result.acc_norm) == (0.0, 0.0)
    assert result.ties == result.ties_norm == result.n == 5
    assert result.nan == 0


def test_nan_scores_count_as_wrong(model, tok):
    result = multiple_choice(ConstantLM(model, math.nan), tok, MC_ROWS[:4])
    assert result.nan == result.n == 4
    assert (result.acc, result.acc_norm, result.ties) == (0.0, 0.0, 0)


def test_multiple_choice_restores_train_mode(model, tok):
    model.train()
    try:
        multiple_choice(model, tok, MC_ROWS[:2])
        assert model.training
    finally:
        model.eval()


@pytest.mark.parametrize(
    "rows, message",
    [
        (
            [{"question": "q", "choices": ["a", "b"]}, {"question": "q", "choices": ["a", "b"], "answer": 1}],
            "answer",
        ),
        ([{"choices": ["a", "b"], "answer": 0}], "question"),
        ([{"question": "q", "choices": ["a", "b"], "answer": 2}], "not an index"),
        ([{"question": "q", "choices": ["a"], "answer": 0}], "at least 2"),
    ],
)
def test_load_multiple_choice_errors(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=message) as info:
        load_multiple_choice(path)
    assert "\n" not in str(info.value) and "bad.jsonl" in str(info.value)


def test_load_multiple_choice_empty_missing_and_limit(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        load_multiple_choice(tmp_path / "empty.jsonl")
    with pytest.raises(FileNotFoundError):
        load_multiple_choice(tmp_path / "missing.jsonl")
    rows = load_multiple_choice(write_jsonl(tmp_path / "mc.jsonl", MC_ROWS), limit=5)
    assert rows == MC_ROWS[:5]


def test_evaluate_lm_gives_a_json_report(model, tok, tmp_path):
    text_file = write_jsonl(tmp_path / "texts.jsonl", [{"id": i, "text": t} for i, t in enumerate(TEXTS)])
    mc_file = write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)
    report = evaluate_lm(
        model, tok, text_file=text_file, mc_files=[mc_file], max_length=16, stride=8, batch_size=4, limit=6
    )
    assert json.loads(json.dumps(report)) == report
    assert report["perplexity"]["documents"] == len(TEXTS)
    assert report["perplexity"]["perplexity"] == pytest.approx(
        perplexity(model, tok, TEXTS, max_length=16, stride=8).perplexity
    )
    assert report["multiple_choice"]["mc"]["n"] == 6
    assert report["multiple_choice"]["mc"]["acc"] == multiple_choice(model, tok, MC_ROWS[:6]).acc
    with pytest.raises(ValueError, match="needs"):
        evaluate_lm(model, tok)


# ------------------------------------------------------------------------------------------------ lm-eval


def test_missing_lm_eval_names_the_extra(model, tok, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ImportError, match=r"aptune\[lm-eval\]"):
        lm_eval_multiple_choice(model, tok, write_jsonl(tmp_path / "mc.jsonl", MC_ROWS))


def assert_equal_to_lm_eval(model, tok, path: Path):
    """aptune's multiple choice on ``path`` against lm-eval's: the same acc and acc_norm, the same token split
    and log-likelihood of every (context, continuation) pair. Returns aptune's result."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    ours = multiple_choice(model, tok, load_multiple_choice(path), batch_size=5)
    theirs = lm_eval_multiple_choice(model, tok, path, batch_size=4)
    assert theirs == {"acc": ours.acc, "acc_norm": ours.acc_norm, "n": len(MC_ROWS)}

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4)
    pairs = [(DEFAULT_TEMPLATE.format(**row), " " + c) for row in MC_ROWS for c in row["choices"]]
    for context, continuation in pairs:
        assert encode_choice(tok, context, continuation) == lm._encode_pair(context, continuation)
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    lls = [ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]
    assert [s for row in ours.scores for s in row] == pytest.approx(lls, abs=1e-4)
    return ours


def test_acc_and_acc_norm_equal_lm_eval(model, tok, tmp_path):
    pytest.importorskip("lm_eval")
    ours = assert_equal_to_lm_eval(model, tok, write_jsonl(tmp_path / "mc.jsonl", MC_ROWS))
    assert ours.ties == ours.ties_norm == ours.nan == 0  # no tie-break differences to hide behind
    assert ours.acc != ours.acc_norm  # the data tell the two metrics apart


def test_multiple_choice_with_a_bos_tokenizer_equals_lm_eval(bos_model, bos_tok, tmp_path):
    pytest.importorskip("lm_eval")
    bos = bos_tok.bos_token_id
    for row in MC_ROWS:  # lm-eval's HFLM keeps the tokenizer's <bos> before every context, once
        context_ids, continuation_ids = encode_choice(
            bos_tok, DEFAULT_TEMPLATE.format(**row), " " + row["choices"][0]
        )
        assert context_ids[0] == bos and bos not in context_ids[1:] + continuation_ids
    assert_equal_to_lm_eval(bos_model, bos_tok, write_jsonl(tmp_path / "mc.jsonl", MC_ROWS))


def test_lm_eval_limit_and_template(model, tok, tmp_path):
    pytest.importorskip("lm_eval")
    path = write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)
    template = "Q: {question} {{really}}\nA: "  # trailing space moves to the continuation; literal braces
    ours = multiple_choice(model, tok, MC_ROWS[:7], template=template)
    theirs = lm_eval_multiple_choice(model, tok, path, limit=7, template=template)
    assert theirs == {"acc": ours.acc, "acc_norm": ours.acc_norm, "n": 7}
