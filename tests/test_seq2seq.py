"""The seq2seq task: source/target data, ROUGE, and `aptune train --task seq2seq` on tiny random T5 models (v1.0
ReLU and v1.1 gated-GELU) learning a copy task, with APT pruning to density 0.5."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from test_t5 import VOCAB, tiny_t5

from aptune.cli import main
from aptune.data.errors import DataError
from aptune.data.seq2seq import detect_seq2seq_columns, load_seq2seq_splits, rouge
from aptune.tasks import infer_task

WORDS = [f"w{i}" for i in range(VOCAB - 5)]  # the tokenizer fills the tiny models' vocabulary


def t5_tokenizer():
    """A word-level fast tokenizer shaped like T5's: pad 0, eos 1 (appended to every encode), unk 2."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "</s>", "<unk>", "copy:", "reverse:", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def copy_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.choices(WORDS[:8], k=rng.randint(2, 4))
        rows.append({"source": "copy: " + " ".join(words), "target": " ".join(words)})
    return rows


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def t5_folder(tmp_path):
    def make(gated: bool):
        folder = tmp_path / ("v1.1" if gated else "v1.0")
        tok = t5_tokenizer()
        assert len(tok) == VOCAB
        tiny_t5(gated).save_pretrained(folder / "model")
        tok.save_pretrained(folder / "model")
        for split, (n, seed) in {"train": (256, 0), "validation": (24, 1), "test": (24, 2)}.items():
            write_rows(folder / f"{split}.jsonl", copy_rows(n, seed))
        return folder

    return make


def test_columns_are_found_by_name_or_named():
    assert detect_seq2seq_columns(["id", "document", "summary"]) == ("document", "summary")
    assert detect_seq2seq_columns(["article", "highlights"]) == ("article", "highlights")
    with pytest.raises(DataError, match="classification data"):
        detect_seq2seq_columns(["text", "label"])
    with pytest.raises(DataError, match="--text-fields"):
        detect_seq2seq_columns(["a", "b"])


def test_named_columns_load_as_source_and_target(tmp_path):
    path = write_rows(tmp_path / "train.jsonl", [{"a": "x y", "b": "y", "n": 1}])
    data = load_seq2seq_splits(train=path, text_fields=("a", "b"))
    assert data.splits["train"].column_names == ["source", "target"] and data.columns == ("a", "b")
    rows = write_rows(tmp_path / "s.jsonl", copy_rows(2, 0))
    assert infer_task(None, str(rows), str(tmp_path)) == "seq2seq"


def test_rouge_scores_match_hand_counts():
    # reference "the cat sat", prediction "the cat": unigram P 1, R 2/3 -> F 0.8; bigram P 1, R 1/2 -> F 2/3
    scores = rouge(["the cat"], ["the cat sat"])
    assert scores["rouge1"] == pytest.approx(80.0)
    assert scores["rouge2"] == pytest.approx(200.0 / 3)
    assert scores["rougeL"] == pytest.approx(80.0)
    assert rouge(["a b", "x"], ["a b", "y"])["rouge1"] == pytest.approx(50.0)


@pytest.mark.parametrize("gated", [False, True], ids=["t5-v1.0", "t5-v1.1"])
def test_apt_prunes_a_t5_to_half_and_learns_to_copy(t5_folder, gated, capsys):
    folder = t5_folder(gated)
    out = folder / "run"
    argv = ["train", "--model", str(folder / "model"), "--data", str(folder), "--output", str(out)]
    argv += ["--method", "apt", "--density", "0.5", "--epochs", "6", "--batch-size", "16"]
    argv += ["--max-length", "8"]
    argv += ["--max-target-length", "6", "--learning-rate", "1e-2", "--no-progress", "--no-measure-speed"]
    argv += ["--evals-per-epoch", "1", "--seed", "0"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "seq2seq" and report["metrics"]["validation_metric"] == "rougeL"
    assert 0.4 <= report["density"] <= 0.5
    losses = report["train_losses"]
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    test = report["metrics"]["test_rouge"]
    assert set(test) == {"rouge1", "rouge2", "rougeL"}

    # the saved, compacted model, scored by `aptune eval`, generates what the run scored
    capsys.readouterr()
    argv = ["eval", str(out / "model"), "--data", str(folder / "test.jsonl"), "--max-length", "8"]
    assert main([*argv, "--max-new-tokens", "6", "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)["results"][str(folder / "test.jsonl")]
    assert scores["rougeL"] == pytest.approx(test["rougeL"], abs=1e-9) and scores["rows"] == 24


def test_a_decoder_only_model_is_refused_for_seq2seq(tmp_path, capsys):
    from tiny_lm import tiny_causal_lm, tiny_tokenizer

    tok = tiny_tokenizer()
    tiny_causal_lm(len(tok)).save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    data = write_rows(tmp_path / "train.jsonl", copy_rows(4, 0))
    argv = ["train", "--model", str(tmp_path / "lm"), "--train", str(data), "--validation", str(data)]
    capsys.readouterr()
    assert main([*argv, "--task", "seq2seq", "--no-progress", "--output", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs an encoder-decoder model" in err[0] and "decoder-only" in err[0]


@pytest.mark.parametrize("method", ["full", "lora", "lora-prune", "loraprune", "llm-pruner"])
def test_every_baseline_runs_on_a_t5(t5_folder, method):
    folder = t5_folder(True)
    out = folder / method
    argv = ["train", "--model", str(folder / "model"), "--data", str(folder), "--output", str(out)]
    argv += ["--method", method, "--density", "0.5", "--max-steps", "6", "--batch-size", "32"]
    argv += ["--max-length", "8", "--max-target-length", "6", "--no-progress", "--no-measure-speed"]
    argv += ["--calibration-batches", "2", "--evals-per-epoch", "1"]
    argv += ["--iterative-steps", "2"] if method == "loraprune" else []
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "seq2seq" and "rougeL" in report["metrics"]["test_rouge"]
    expected = 1.0 if method in ("full", "lora") else 0.5
    assert expected - 0.15 <= report["density"] <= expected + 1e-9
