"""``aptune train`` and ``aptune eval`` on the causal-LM task, with a tiny LLaMA and an offline tokenizer."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from tiny_lm import tiny_tokenizer, write_lm_folder
from transformers import AutoModelForCausalLM

import aptune
from aptune.cli import main
from aptune.memory import DEFAULT_CPU_MMAP_THRESHOLD, mmap_threshold_from_environment, on_glibc
from aptune.train import _token_count, set_activation_checkpointing


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory):
    """A tiny causal LM with its tokenizer, a plain-text data folder, a chat data folder and an MC file."""
    return write_lm_folder(tmp_path_factory.mktemp("lm"))


BASE = [
    "--max-length",
    "32",
    "--batch-size",
    "4",
    "--eval-batch-size",
    "4",
    "--no-progress",
    "--no-measure-speed",
]
APT = [
    "--salience-start",
    "2",
    "--pruning-end",
    "12",
    "--num-checkpoints",
    "2",
    "--ffn-multiple",
    "8",
    "--one-shot-batches",
    "2",
]


def train(root, data: str, *extra: str) -> dict:
    out = root / f"run-{abs(hash((data, extra)))}"
    argv = ["train", "--model", str(root / "model"), "--data", str(root / data), "--output", str(out)]
    assert main(argv + BASE + list(extra)) == 0
    report = json.loads((out / "report.json").read_text())
    report["out"] = out
    return report


@pytest.mark.parametrize("shape", ["per-layer", "uniform"])
def test_apt_prunes_a_causal_lm_once_then_tunes_and_the_result_reloads(lm_folder, shape):
    report = train(
        lm_folder,
        "text",
        "--epochs",
        "2",
        "--density",
        "0.6",
        "--shape",
        shape,
        *APT,
        "--learning-rate",
        "3e-3",
    )
    assert report["task"] == "causal-lm"  # inferred: a lone text column
    assert report["apt_config"]["recipe"] == "one-shot" and report["apt_config"]["adapter_targets"] == [
        "q",
        "v",
    ]
    assert report["method_history"][0]["step"] == 0  # pruned before the first optimizer step
    before, after = report["params_before"], report["params_after"]
    assert after["prunable"] <= int(0.6 * before["prunable"])
    assert report["method_history"][0]["density"] == pytest.approx(after["prunable"] / before["prunable"])
    m = report["metrics"]
    assert m["validation_metric"] == "perplexity" and m["best_validation"] > 1
    assert m["test_perplexity"] > 1 and m["test_perplexity_detail"]["stride"] == 16
    history = [h["validation"] for h in report["history"]]
    assert min(history) < history[0] or len(history) == 1  # tuning lowers the validation perplexity
    model_dir = report["out"] / "model"
    if shape == "uniform":
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()  # stock transformers
    else:
        model = aptune.load_pruned(model_dir)
    tok = tiny_tokenizer()
    ids = torch.tensor([tok("the quick brown fox")["input_ids"]])
    reloaded = aptune.load_pruned(model_dir)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reloaded(ids).logits)


def test_chat_data_trains_on_assistant_tokens_and_baselines_share_the_task(lm_folder):
    apt = train(lm_folder, "chat", "--epochs", "2", "--density", "0.6", *APT, "--max-length", "128")
    assert apt["task"] == "causal-lm" and apt["metrics"]["best_validation"] > 1
    assert "test_perplexity_blocks" in apt["metrics"]
    lora = train(lm_folder, "chat", "--epochs", "1", "--method", "lora", "--max-length", "128")
    assert lora["params_after"]["prunable"] == lora["params_before"]["prunable"]
    pruner = train(
        lm_folder,
        "chat",
        "--epochs",
        "1",
        "--method",
        "llm-pruner",
        "--density",
        "0.6",
        "--ffn-multiple",
        "8",
        "--calibration-batches",
        "2",
        "--shape",
        "uniform",
        "--max-length",
        "128",
    )
    assert pruner["params_after"]["prunable"] <= int(0.6 * pruner["params_before"]["prunable"])
    model = AutoModelForCausalLM.from_pretrained(pruner["out"] / "model")
    assert model.config.num_key_value_heads in (1, 2)


@pytest.mark.parametrize("method", ["apt", "lora"])
def test_the_chunked_loss_trains_as_the_models_own(lm_folder, method):
    """Chat data (the loss on part of each row): the same losses step by step and the same final weights with
    the loss computed without logits (the default) as with the model's own; APT's one-shot calibration, rank
    growth and PEFT's LoRA included. The saved model computes its logits again."""
    extra = ["--method", method, "--max-length", "128"]
    extra += ["--epochs", "2", "--density", "0.6", *APT] if method == "apt" else ["--epochs", "1"]
    chunked = train(lm_folder, "chat", *extra)
    own = train(lm_folder, "chat", *extra, "--no-chunked-lm-loss", "--cpu-mmap-threshold", "0")
    assert chunked["chunked_lm_loss"] is True and own["chunked_lm_loss"] is False
    assert 0 < chunked["train_tokens"] == own["train_tokens"]
    # a CPU run fixes glibc's mmap threshold (unless the environment sets it); 0 leaves glibc's own
    fixed = on_glibc() and not mmap_threshold_from_environment()
    assert chunked["cpu_mmap_threshold"] == (DEFAULT_CPU_MMAP_THRESHOLD if fixed else None)
    assert own["cpu_mmap_threshold"] is None
    phases = chunked["peak_memory_phases_mb"]  # the peak from loading to the last step, split in two phases
    assert chunked["peak_memory_mb"] == max(phases["load_and_setup"], phases["training_steps"])
    assert 0 < phases["training_steps"] <= chunked["peak_memory_mb"]
    assert len(chunked["train_losses"]) == len(own["train_losses"]) > 2
    for a, b in zip(chunked["train_losses"], own["train_losses"], strict=True):
        assert a == pytest.approx(b, rel=1e-4)
    assert chunked["method_history"] == pytest.approx(own["method_history"], rel=1e-4)
    a = AutoModelForCausalLM.from_pretrained(chunked["out"] / "model")
    b = AutoModelForCausalLM.from_pretrained(own["out"] / "model")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.allclose(x, y, atol=1e-5), name


def test_throughput_counts_real_tokens_only():
    """Training tokens/s counts what the model reads: a padded row's real tokens, not its padding."""
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert _token_count({"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": mask}) == 6
    assert _token_count({"input_ids": torch.zeros(3, 5, dtype=torch.long)}) == 15


def test_gradient_accumulation_and_checkpointing_train(lm_folder):
    report = train(
        lm_folder,
        "text",
        "--epochs",
        "2",
        "--density",
        "0.6",
        *APT,
        "--gradient-accumulation-steps",
        "2",
        "--gradient-checkpointing",
        "--batch-size",
        "2",
    )
    assert report["steps_per_epoch"] == report["steps"] // 2
    assert report["params_after"]["prunable"] <= int(0.6 * report["params_before"]["prunable"])
    # packed text: every block is full, so each step trains 2 micro-batches x 2 rows x 32 tokens
    assert report["train_tokens"] == report["steps"] * 2 * 2 * 32
    steps_time = report["train_time_s"] - report["setup_time_s"]
    assert report["train_tokens_per_s"] == pytest.approx(report["train_tokens"] / steps_time)


def test_activation_checkpointing_switches_without_deprecation_warnings(lm_folder):
    """On and off under the installed transformers' own names: no FutureWarning reaches the user."""
    model = AutoModelForCausalLM.from_pretrained(lm_folder / "model")

    def flagged() -> list:
        return [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        set_activation_checkpointing(model, True)
        assert flagged()
        set_activation_checkpointing(model, False)
        assert not flagged()
        set_activation_checkpointing(model, False)  # already off: nothing to do


def test_eval_command_scores_text_and_multiple_choice(lm_folder, capsys):
    model_dir = lm_folder / "model"
    assert (
        main(
            [
                "eval",
                str(model_dir),
                "--data",
                str(lm_folder / "text"),
                str(lm_folder / "mc.jsonl"),
                "--max-length",
                "32",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    results = list(out["results"].values())
    assert results[0]["perplexity"]["perplexity"] > 1 and results[0]["perplexity"]["window"] == 32
    assert results[1]["multiple_choice"]["n"] == 8


@pytest.mark.parametrize(
    "data, extra, message",
    [
        ("cls", ["--task", "causal-lm"], "looks like classification"),
        ("text", ["--task", "classification"], "label"),
        ("noassistant", [], "no assistant turn"),
        ("chat", ["--tokenizer", "NOTEMPLATE"], "no chat template"),
        ("text", ["--shape", "uniform", "--density", "0.02"], "no uniform shape"),
        ("chat", ["--max-length", "8"], "raise --max-length"),
        ("text", ["--gradient-accumulation-steps", "9999"], "gradient_accumulation_steps"),
    ],
)
def test_bad_input_is_one_line_before_training(lm_folder, data, extra, message, capsys, tmp_path):
    (lm_folder / "cls").mkdir(exist_ok=True)
    for split in ("train", "validation"):
        (lm_folder / "cls" / f"{split}.jsonl").write_text(
            '{"text": "good film", "label": 1}\n{"text": "bad", "label": 0}\n'
        )
    (lm_folder / "noassistant").mkdir(exist_ok=True)
    for split in ("train", "validation"):
        (lm_folder / "noassistant" / f"{split}.jsonl").write_text(
            json.dumps({"messages": [{"role": "user", "content": "hi"}]})
        )
    if "NOTEMPLATE" in extra:
        tiny_tokenizer(chat_template=False).save_pretrained(tmp_path / "tok")
        extra = ["--tokenizer", str(tmp_path / "tok")]
    argv = [
        "train",
        "--model",
        str(lm_folder / "model"),
        "--data",
        str(lm_folder / data),
        "--output",
        str(tmp_path / "o"),
    ]
    assert main(argv + BASE + APT + list(extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after any progress bar: one line
    assert err.startswith("aptune train: error:") and message in err, err


@pytest.mark.parametrize(
    "method, extra",
    [
        ("lora-prune", ["--epochs", "1", "--pretune-epochs", "1", "--calibration-batches", "2"]),
        ("loraprune", ["--epochs", "2", "--iterative-steps", "2"]),
    ],
)
def test_the_other_pruning_baselines_run_on_the_causal_lm_task(lm_folder, method, extra):
    report = train(lm_folder, "text", "--method", method, "--density", "0.6", "--ffn-multiple", "8", *extra)
    assert report["task"] == "causal-lm" and report["metrics"]["best_validation"] > 1
    assert report["params_after"]["prunable"] <= int(0.6 * report["params_before"]["prunable"])


def test_an_unsupported_model_family_is_one_line(lm_folder, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=320)).save_pretrained(
        tmp_path / "gpt2"
    )
    tiny_tokenizer().save_pretrained(tmp_path / "gpt2")
    argv = [
        "train",
        "--model",
        str(tmp_path / "gpt2"),
        "--data",
        str(lm_folder / "text"),
        "--output",
        str(tmp_path / "o"),
    ]
    assert main(argv + BASE) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("aptune train: error:") and "does not support" in err, err
