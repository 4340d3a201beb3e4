"""Extractive QA: gold spans, windows over long contexts, answer extraction, SQuAD scores, and `aptune train
--task qa` end to end on a tiny BERT (APT prunes it; the saved model scores what the run reported). Masked and
compacted QA models agree in test_masks_compact.py."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from test_train_cli import FILLER, NEGATIVE, POSITIVE, make_tiny_folder
from transformers import BertTokenizerFast

from aptune.cli import main
from aptune.data.errors import DataError
from aptune.data.qa import (
    QAEvalWindows,
    best_answers,
    encode_qa_eval,
    encode_qa_train,
    load_qa_splits,
    locate_answer,
    squad_scores,
)
from aptune.tasks import infer_task


def qa_rows(n: int, seed: int = 0, context_words: int = 12) -> list[dict]:
    """Question: a positive word; the answer: the negative word right after it in the context."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        key, answer = rng.choice(POSITIVE), rng.choice(NEGATIVE)
        words = rng.choices(FILLER, k=context_words)
        at = rng.randrange(len(words))
        words[at:at] = [key, answer]
        context = " ".join(words)
        start = len(" ".join(words[: at + 1])) + 1
        assert context[start : start + len(answer)] == answer
        rows.append(
            {
                "id": f"q{i}",
                "question": key,
                "context": context,
                "answers": {"text": [answer], "answer_start": [start]},
            }
        )
    return rows


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def tokenizer(tmp_path) -> BertTokenizerFast:
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *FILLER]))
    return BertTokenizerFast(vocab=str(vocab))


def splits_from(tmp_path, rows):
    return load_qa_splits(train=write_rows(tmp_path / "train.jsonl", rows)).splits["train"]


# -- gold spans ------------------------------------------------------------------------------------------


def test_a_gold_span_a_character_off_is_repaired_and_one_far_off_is_refused(tmp_path):
    context = "the cat sat, Albert of Mainz said"
    assert locate_answer(context, "Albert", 13) == 13
    # SQuAD's quirk: a leading space and a start one character early
    assert locate_answer(context, " Albert of Mainz", 11) == 13
    assert locate_answer(context, "Albert", 14) == 13
    assert locate_answer(context, "Albert", 2) is None

    rows = [{"question": "who", "context": context, "answers": {"text": [" Albert"], "answer_start": [11]}}]
    data = load_qa_splits(train=write_rows(tmp_path / "ok.jsonl", rows))
    assert data.repaired == 1
    assert data.splits["train"][0]["answers"] == {"text": ["Albert"], "answer_start": [13]}

    rows[0]["answers"]["answer_start"] = [0]
    with pytest.raises(DataError) as e:
        load_qa_splits(train=write_rows(tmp_path / "bad.jsonl", rows))
    message = str(e.value)
    assert "\n" not in message and "row 1" in message and "answer_start 0" in message


def test_classification_data_and_missing_columns_are_named(tmp_path):
    with pytest.raises(DataError, match="looks like classification data"):
        load_qa_splits(train=write_rows(tmp_path / "c.jsonl", [{"text": "good", "label": 1}]))
    with pytest.raises(DataError, match="no 'answers' column"):
        load_qa_splits(train=write_rows(tmp_path / "q.jsonl", [{"question": "a", "context": "b"}]))


def test_squad_columns_choose_the_qa_task(tmp_path):
    path = write_rows(tmp_path / "train.jsonl", qa_rows(2))
    assert infer_task(None, str(path), str(tmp_path)) == "qa"


# -- windows ---------------------------------------------------------------------------------------------


def test_long_contexts_split_into_windows_sharing_stride_tokens(tmp_path, tokenizer):
    rows = qa_rows(20, seed=3, context_words=40)
    dataset = splits_from(tmp_path, rows)
    max_length, stride = 16, 4  # question: 1 token + 3 special tokens, so 12 context tokens a window
    train = encode_qa_train(tokenizer, dataset, max_length, stride)
    windows = encode_qa_eval(tokenizer, dataset, max_length, stride)
    assert len(train) == len(windows.features) > len(rows)
    assert all(len(f["input_ids"]) <= max_length for f in windows.features)
    # consecutive windows of one question share exactly `stride` context tokens
    for w in range(1, len(windows.features)):
        if windows.example[w] != windows.example[w - 1]:
            continue
        prev = [o for o in windows.offsets[w - 1] if o is not None]
        cur = [o for o in windows.offsets[w] if o is not None]
        assert prev[-stride:] == cur[:stride]
    # a labelled window's span is the answer; other windows point at [CLS]
    labelled = 0
    for feature, row in zip(train, windows.example, strict=True):
        s, e = feature["start_positions"], feature["end_positions"]
        if s == 0:
            assert e == 0
            continue
        labelled += 1
        assert tokenizer.decode(feature["input_ids"][s : e + 1]) == rows[row]["answers"]["text"][0]
    assert labelled >= len(rows)  # every answer lies whole in at least one window

    # logits that point at each labelled span give back every gold answer, over all windows of a row
    starts, ends = [], []
    for feature in train:
        a = np.full(len(feature["input_ids"]), -5.0)
        b = a.copy()
        a[feature["start_positions"]] = b[feature["end_positions"]] = 5.0
        starts.append(a)
        ends.append(b)
    answers = best_answers(windows, starts, ends)
    assert answers == [r["answers"]["text"][0] for r in rows]
    assert squad_scores(answers, windows.references)["exact_match"] == 100.0


def test_best_span_respects_order_length_and_no_answer():
    windows = QAEvalWindows(
        features=[{}, {}],
        example=[0, 0],
        offsets=[[None, (0, 3), (4, 7), (8, 11)], [None, (4, 7), (8, 11), (12, 15)]],
        ids=["a"],
        contexts=["one two six ten"],
        references=[["six"]],
    )
    starts = [np.array([0.0, 0.0, 1.0, 3.0]), np.array([0.0, 0.0, 2.0, 0.0])]
    ends = [np.array([0.0, 4.0, 0.0, 1.0]), np.array([0.0, 0.0, 3.0, 1.0])]
    # window 0: the best start (3, "ten") has no end after it except itself: 3 + 1 = 4; window 1: "six" 2 + 3
    assert best_answers(windows, starts, ends) == ["six"]
    assert best_answers(windows, starts, ends, max_answer_tokens=1) == ["six"]
    # a "no answer" score (first token) above every span's wins only when unanswerable questions exist
    starts[0][0] = ends[0][0] = 9.0
    starts[1][0] = ends[1][0] = 9.0
    assert best_answers(windows, starts, ends) == ["six"]
    assert best_answers(windows, starts, ends, allow_no_answer=True) == [""]


def test_squad_scores_follow_the_official_definitions():
    # normalisation: case, punctuation and articles do not count; F1 over tokens: 2 shared of 3 and 2 -> 0.8
    scores = squad_scores(["The Cat!", "the black cat sat"], [["cat"], ["black cat", "dog"]])
    assert scores["exact_match"] == pytest.approx(50.0)
    assert scores["f1"] == pytest.approx((100.0 + 80.0) / 2)
    # SQuAD v2: an unanswerable question scores 100 for an empty prediction, else 0
    v2 = squad_scores(["", "x", "cat"], [[], [], ["cat"]])
    assert v2["exact_match"] == pytest.approx(200.0 / 3) and v2["unanswerable"] == 2


# -- end to end ------------------------------------------------------------------------------------------


@pytest.fixture
def qa_folder(tmp_path):
    make_tiny_folder(tmp_path, "BertForQuestionAnswering")
    for split, (n, seed) in {"train": (96, 0), "validation": (24, 1), "test": (24, 2)}.items():
        write_rows(tmp_path / f"{split}.jsonl", qa_rows(n, seed))
    return tmp_path


def test_apt_prunes_a_qa_model_and_the_saved_model_scores_the_same(qa_folder, capsys):
    from aptune.compact import load_pruned

    out = qa_folder / "run"
    argv = ["train", "--model", str(qa_folder / "model"), "--data", str(qa_folder), "--output", str(out)]
    argv += [
        "--method",
        "apt",
        "--density",
        "0.5",
        "--epochs",
        "4",
        "--batch-size",
        "16",
        "--max-length",
        "24",
    ]
    argv += [
        "--doc-stride",
        "8",
        "--learning-rate",
        "3e-3",
        "--no-progress",
        "--no-measure-speed",
        "--seed",
        "1",
    ]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "qa" and report["metrics"]["validation_metric"] == "f1"
    assert 0.4 <= report["density"] <= 0.5  # within the budget (whole heads of a 32-wide model are coarse)
    losses = report["train_losses"]
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
    info = report["metrics"]["qa_data"]
    assert info["windows"]["train"] >= 96 and info["doc_stride"] == 8

    # the saved (compacted) model, scored by `aptune eval`, gives the test F1 and exact match the run reported
    assert type(load_pruned(out / "model")).__name__ == "BertForQuestionAnswering"
    capsys.readouterr()
    argv = ["eval", str(out / "model"), "--data", str(qa_folder / "test.jsonl"), "--max-length", "24"]
    assert main([*argv, "--stride", "8", "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)["results"][str(qa_folder / "test.jsonl")]
    assert scores["f1"] == pytest.approx(report["metrics"]["test_f1"], abs=1e-6)
    assert scores["exact_match"] == pytest.approx(report["metrics"]["test_exact_match"], abs=1e-6)


def test_bad_qa_input_is_one_line_before_training(qa_folder, capsys):
    base = ["train", "--model", str(qa_folder / "model"), "--no-progress", "--output", str(qa_folder / "r")]
    rows = qa_rows(4)
    rows[2]["answers"]["answer_start"] = [0]
    bad = write_rows(qa_folder / "bad.jsonl", rows)
    assert main([*base, "--train", str(bad), "--validation", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "row 3" in err[0] and "answer_start 0" in err[0]

    cls = write_rows(qa_folder / "cls.jsonl", [{"text": "good movie", "label": 1}] * 4)
    assert main([*base, "--task", "qa", "--train", str(cls), "--validation", str(cls)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "looks like classification data" in err[0]

    assert main([*base, "--data", str(qa_folder), "--max-length", "12", "--doc-stride", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "doc_stride 8" in err[0]


@pytest.mark.parametrize("method", ["full", "lora", "lora-prune", "loraprune", "llm-pruner"])
def test_every_baseline_trains_and_prunes_a_qa_model(qa_folder, method):
    out = qa_folder / method
    argv = ["train", "--model", str(qa_folder / "model"), "--data", str(qa_folder), "--output", str(out)]
    argv += ["--method", method, "--density", "0.5", "--max-steps", "6", "--batch-size", "16"]
    argv += ["--max-length", "24"]
    argv += ["--doc-stride", "8", "--no-progress", "--no-measure-speed", "--calibration-batches", "2"]
    argv += ["--evals-per-epoch", "1"] + (["--iterative-steps", "2"] if method == "loraprune" else [])
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "qa" and report["metrics"]["test_f1"] >= 0
    expected = 1.0 if method in ("full", "lora") else 0.5
    assert report["density"] <= expected + 1e-9 and report["density"] >= expected - 0.15
