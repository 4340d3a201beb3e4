"""`aptune train` end to end on a tiny model and tiny files, and its one-line errors for bad input."""

from __future__ import annotations

import json
import math
import random
import warnings

import pytest
import torch
from conftest import tiny_model
from transformers import BertTokenizerFast

import aptune
from aptune.cli import main

POSITIVE = ["good", "great", "fine", "happy", "superb", "lovely", "nice", "bright"]
NEGATIVE = ["bad", "awful", "poor", "sad", "dull", "ugly", "grim", "weak"]
FILLER = ["the", "a", "movie", "plot", "was", "and", "very", "it"]


def write_task(folder, n_train=192, n_eval=64, seed=0):
    rng = random.Random(seed)

    def rows(n):
        out = []
        for _ in range(n):
            label = rng.randint(0, 1)
            words = rng.choices(POSITIVE if label else NEGATIVE, k=2) + rng.choices(FILLER, k=4)
            rng.shuffle(words)
            out.append({"text": " ".join(words), "label": label})
        return out

    paths = {}
    for split, n in (("train", n_train), ("validation", n_eval), ("test", n_eval)):
        paths[split] = folder / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in rows(n)))
    return paths


def make_tiny_folder(tmp_path, class_name: str = "BertForSequenceClassification"):
    """A tiny random classifier (BERT unless ``class_name`` says otherwise) with a word-level tokenizer,
    saved under ``tmp_path / "model"``."""
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *FILLER]))
    tokenizer = BertTokenizerFast(vocab=str(vocab))
    model = tiny_model(
        class_name,
        num_labels=2,
        vocab_size=len(tokenizer),
        intermediate_size=64,
        initializer_range=0.05,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    return tmp_path


@pytest.fixture
def tiny_folder(tmp_path):
    return make_tiny_folder(tmp_path)


def test_train_writes_a_loadable_pruned_model_and_report(tiny_folder, capsys):
    data = write_task(tiny_folder)
    out = tiny_folder / "run"
    code = main(
        [
            "train",
            "--model",
            str(tiny_folder / "model"),
            "--train",
            str(data["train"]),
            "--validation",
            str(data["validation"]),
            "--test",
            str(data["test"]),
            "--density",
            "0.5",
            "--ffn-multiple",
            "8",
            "--epochs",
            "6",
            "--batch-size",
            "8",
            "--learning-rate",
            "3e-3",
            "--num-checkpoints",
            "4",
            "--output",
            str(out),
            "--no-progress",
            "--max-length",
            "16",
            # this tiny model only learns the task after ~70 steps; the distillation teacher must come after that
            *("--salience-start", "40", "--warmup-end", "84", "--pruning-end", "110", "--distill-end", "130"),
        ]
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["density"] <= 0.5
    assert report["metrics"]["best_validation"] >= 0.85
    assert report["metrics"]["best_step"] >= report["apt_config"]["distill_end"]  # structure final from there
    assert report["params_after"]["prunable"] < report["params_before"]["prunable"]
    assert report["steps"] == 6 * 24
    assert report["inference"]["final"]["throughput"] > 0
    for key in ("command", "environment", "train_time_s", "peak_memory_mb", "history", "apt_history"):
        assert key in report
    assert "best validation accuracy" in capsys.readouterr().out

    model = aptune.load_pruned(out / "model")
    assert aptune.param_report(model)["density"] == pytest.approx(report["density"])
    tokenizer = BertTokenizerFast.from_pretrained(out / "model")
    rows = [json.loads(line) for line in data["test"].read_text().splitlines()]
    enc = tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        predictions = model(**enc).logits.argmax(-1)
    test_acc = float((predictions == torch.tensor([r["label"] for r in rows])).float().mean())
    assert test_acc == pytest.approx(report["metrics"]["test_at_best"])


def test_full_finetuning_runs_through_the_same_harness(tiny_folder):
    data = write_task(tiny_folder)
    out = tiny_folder / "full"
    assert (
        main(
            [
                "train",
                "--method",
                "full",
                "--model",
                str(tiny_folder / "model"),
                "--train",
                str(data["train"]),
                "--validation",
                str(data["validation"]),
                "--epochs",
                "2",
                "--batch-size",
                "16",
                "--learning-rate",
                "1e-3",
                "--output",
                str(out),
                "--no-progress",
                "--no-measure-speed",
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["density"] == 1.0 and report["apt_config"] is None


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d, f: ["--density", "0"], "target_density must be in (0, 1]"),
        (lambda d, f: ["--density", "1.2"], "target_density must be in (0, 1]"),
        (lambda d, f: ["--model", str(f / "nowhere")], "model path does not exist"),
        (
            lambda d, f: [
                "--train",
                str(_broken(f, "missing.jsonl", '{"text": "good", "label": 1}\n{"text": "bad"}\n')),
            ],
            "missing field",
        ),
        (
            lambda d, f: ["--validation", str(_broken(f, "v.jsonl", '{"text": "good", "label": 7}\n'))],
            "unknown label",
        ),
        (lambda d, f: ["--tokenizer", str(f)], "no tokenizer"),
    ],
)
def test_bad_input_is_one_line_before_training(tiny_folder, capsys, mutate, message):
    data = write_task(tiny_folder, n_train=16, n_eval=8)
    args = {
        "--model": str(tiny_folder / "model"),
        "--train": str(data["train"]),
        "--validation": str(data["validation"]),
        "--output": str(tiny_folder / "bad"),
    }
    extra = mutate(data, tiny_folder)
    for flag, value in zip(extra[::2], extra[1::2], strict=True):
        args[flag] = value
    argv = ["train", "--no-progress", *[x for kv in args.items() for x in kv]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0
    assert not (tiny_folder / "bad" / "report.json").exists()


def _broken(folder, name, text):
    path = folder / name
    path.write_text(text)
    return path


def test_config_file_and_bf16_autocast(tiny_folder):
    data = write_task(tiny_folder, n_train=64, n_eval=16)
    config = tiny_folder / "run.yaml"
    config.write_text(
        f"model: {tiny_folder / 'model'}\ntrain: {data['train']}\nvalidation: {data['validation']}\n"
        "target_density: 0.7\nffn_multiple: 8\nepochs: 1\nbatch_size: 8\nmixed_precision: bf16\n"
        "measure_speed: false\nprogress: false\nadapter_targets: [q, v]\n"
    )
    out = tiny_folder / "yaml-run"
    # the flag wins over the file
    assert (
        main(["train", "--config", str(config), "--epochs", "2", "--output", str(out), "--no-distill"]) == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["train_config"]["mixed_precision"] == "bf16"
    assert report["train_config"]["epochs"] == 2.0 and report["steps"] == 16
    assert report["apt_config"]["adapter_targets"] == ["q", "v"]
    assert report["apt_config"]["target_density"] == 0.7 and report["density"] <= 0.7
    assert aptune.load_pruned(out / "model") is not None


def test_unknown_config_key_is_refused(tiny_folder, capsys):
    config = tiny_folder / "bad.json"
    config.write_text(json.dumps({"target_densty": 0.4}))
    assert main(["train", "--config", str(config)]) == 2
    assert "unknown config keys: target_densty" in capsys.readouterr().err


def test_peft_lora_runs_through_the_same_harness(tiny_folder):
    data = write_task(tiny_folder, n_train=64, n_eval=16)
    out = tiny_folder / "lora"
    argv = ["train", "--method", "lora", "--lora-rank", "4", "--model", str(tiny_folder / "model")]
    argv += ["--train", str(data["train"]), "--validation", str(data["validation"]), "--epochs", "1"]
    argv += ["--batch-size", "8", "--output", str(out), "--no-progress", "--no-measure-speed"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["density"] == 1.0 and report["steps"] == 8
    # LoRA on q and v of 3 layers (rank 4, 32 -> 32) plus the classifier, which PEFT trains fully
    first = report["history"][0]
    assert first["trainable_params"] == 3 * 2 * 4 * (32 + 32) + (32 * 2 + 2)
    model = aptune.load_pruned(out / "model")
    assert not any("lora" in name for name, _ in model.named_parameters())  # merged at the end


def test_train_help_describes_every_config_flag_from_the_config_source(capsys):
    """``aptune train --help`` reads each flag's description from its config field's comment (the comment on the
    field's line, else the comment lines right above it), so the help and the code say the same."""
    from dataclasses import fields

    from aptune.cli import field_help
    from aptune.methods.config import BaselineConfig

    for config in (aptune.TrainConfig, aptune.APTConfig, BaselineConfig):
        described = field_help(config)
        assert [f.name for f in fields(config) if not described.get(f.name)] == [], config.__name__
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--gradient-checkpointing, --no-gradient-checkpointing recompute activations in backward" in text
    # a comment above the field, two lines long
    assert "--one-shot-salience ONE_SHOT_SALIENCE one-shot: how blocks are scored" in text
    assert "LLM-Pruner's criterion; costs a gradient of every weight) (default: activation)" in text
    assert "default: min(200, 5% of training) (default: None)" in text  # a percent sign survives argparse


def test_peft_lora_attaches_without_library_deprecation_warnings():
    """PEFT's read of transformers' deprecated checkpointing flag does not reach the user as a FutureWarning."""
    from aptune.methods.plain import attach_peft_lora

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model = attach_peft_lora(tiny_model("BertForSequenceClassification"), 4, ["q", "v"])
    assert any("lora_A" in name for name, _ in model.named_parameters())


@pytest.mark.parametrize("method", ["apt", "lora"])
def test_bfloat16_weights_train_with_fp32_heads_and_save_in_bfloat16(tiny_folder, method):
    """``--dtype bfloat16`` loads the frozen weights in bf16 (half their memory) and computes in bf16; the layers
    the task adds (the classifier) load fp32 like the adapters, and the saved model is all bf16 again."""
    import torch
    from safetensors.torch import load_file

    from aptune.tasks.classification import ClassificationTask
    from aptune.train import TrainConfig, load_model

    data = write_task(tiny_folder, n_train=64, n_eval=16)
    config = TrainConfig(model=str(tiny_folder / "model"), train=str(data["train"]), dtype="bfloat16")
    assert config.mixed_precision == "bf16"  # bf16 weights compute under bf16 autocast

    class Labels:
        info = {"labels": [0, 1]}

    model = load_model(ClassificationTask(), config.model, Labels(), config)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes["classifier.weight"] == torch.float32  # new, trained: fp32 master weights
    assert dtypes["bert.encoder.layer.0.attention.self.query.weight"] == torch.bfloat16

    out = tiny_folder / f"bf16-{method}"
    argv = ["train", "--method", method, "--model", config.model, "--train", str(data["train"])]
    argv += ["--validation", str(data["validation"]), "--epochs", "2", "--batch-size", "8"]
    argv += ["--density", "0.6", "--ffn-multiple", "8", "--dtype", "bfloat16"]
    argv += ["--output", str(out), "--no-progress"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert all(math.isfinite(loss) for loss in report["train_losses"])
    assert report["metrics"]["best_validation"] >= 0
    assert report["inference"]["dense"]["dtype"] == report["inference"]["final"]["dtype"] == "bfloat16"
    saved = load_file(str(out / "model" / "model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    assert aptune.load_pruned(out / "model") is not None
