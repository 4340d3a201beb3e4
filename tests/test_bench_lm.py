"""`aptune bench --task causal-lm`: shape variants, the cpu-lm preset, causal-LM summaries and ratios, the
causal-LM table, and one tiny end-to-end run (lora, apt, apt-uniform on a tiny LLaMA with an offline
tokenizer) whose results hold every number the LM bench reports."""

from __future__ import annotations

import contextlib
import io
import json
import random
import shutil

import pytest
from tiny_lm import mc_rows, write_jsonl, write_lm_folder

from aptune.bench import metrics
from aptune.bench.cli import main
from aptune.bench.config import PRESETS, build_config
from aptune.bench.report import VALIDATION_PLOT, lm_markdown, markdown
from aptune.bench.runner import parse_eval_line, train_command
from aptune.bench.session import resolve_model
from aptune.bench.variants import base_method, variants
from aptune.config import ConfigError


@pytest.fixture(scope="module")
def lm_task(tmp_path_factory):
    """A tiny causal LM folder (with its tokenizer), a text data folder and a multiple-choice file."""
    root = tmp_path_factory.mktemp("benchlm")
    return write_lm_folder(root, (("train", 24), ("validation", 4), ("test", 4)), chat=False)


@pytest.fixture
def shared(tmp_path, monkeypatch):
    """A shared data folder with brown/ and mc/wikihow_goal.jsonl, found through $APTUNE_SHARED_DATA."""
    folder = tmp_path / "shared" / "data"
    (folder / "brown").mkdir(parents=True)
    (folder / "mc").mkdir()
    for split in ("train", "validation", "test"):
        (folder / "brown" / f"{split}.jsonl").write_text(json.dumps({"id": 0, "text": "a b c."}) + "\n")
    write_jsonl(folder / "mc" / "wikihow_goal.jsonl", mc_rows(random.Random(1), 2))
    monkeypatch.setenv("APTUNE_SHARED_DATA", str(folder))
    return folder


# -- variants, preset, configuration --------------------------------------------------------------------


def test_shape_variants_exist_for_every_method_that_takes_a_shape():
    registry = variants()
    for method in ("apt", "llm-pruner", "loraprune"):
        assert registry[f"{method}-uniform"] == ("--method", method, "--shape", "uniform")
        assert base_method(f"{method}-uniform", registry[f"{method}-uniform"]) == method
    assert "lora-uniform" not in registry and "full-uniform" not in registry


def test_the_gpu_lm_preset_is_issue_15s_measurement(shared, tmp_path):
    """SmolLM2 at 8 x 512 in bf16: dense LoRA against APT pruned once to 0.7 in the uniform shape, on the GPU."""
    config = build_config("gpu-lm")
    assert config.task == "causal-lm" and config.reference_method == "lora" and not config.cpu
    assert config.methods == ("lora", "apt-uniform")
    assert (config.target_density, config.batch_size, config.max_length) == (0.7, 8, 512)
    for name in config.methods:
        command = train_command(config, name, tmp_path / name, "/models/smollm2")
        assert command[command.index("--dtype") + 1] == "bfloat16"
        assert command[command.index("--batch-size") + 1] == "8"
        assert command[command.index("--max-length") + 1] == "512"
        assert "--cpu" not in command and "--measure-speed" in command
    apt = train_command(config, "apt-uniform", tmp_path / "apt", "/models/smollm2")
    assert apt[apt.index("--method") + 1] == "apt" and apt[apt.index("--shape") + 1] == "uniform"
    assert apt[apt.index("--target-density") + 1] == "0.7"


def test_the_cpu_lm_preset_resolves_the_shared_data_and_passes_the_lm_flags(shared, tmp_path):
    config = build_config("cpu-lm", None, {"method_args": {"apt": ("--learning-rate", "2e-4")}})
    assert config.task == "causal-lm" and config.reference_method == "lora"
    assert config.methods == ("lora", "apt-per-layer", "apt-uniform", "llm-pruner-per-layer")
    assert (config.target_density, config.max_length, config.batch_size) == (0.7, 128, 4)
    assert config.max_steps == PRESETS["cpu-lm"]["max_steps"] and config.evals_per_epoch == 1
    assert config.mmap_threshold == 2**20 and config.cpu
    assert config.data_path() == str((shared / "brown").resolve())
    mc = str((shared / "mc" / "wikihow_goal.jsonl").resolve())
    assert config.eval_mc_paths() == (mc,)
    lora = train_command(config, "lora", tmp_path / "lora", "/models/smollm2")
    assert lora[lora.index("--task") + 1] == "causal-lm"
    assert lora[lora.index("--data") + 1] == config.data_path()
    assert lora[lora.index("--eval-mc") + 1] == mc
    assert lora[lora.index("--eval-stride") + 1] == "64" and lora[lora.index("--eval-limit") + 1] == "200"
    assert "--measure-speed" in lora and "--no-measure-speed" not in lora
    assert lora[-4:] == ["--lora-targets", "q", "v", "gate"]
    uniform = train_command(config, "apt-uniform", tmp_path / "u", "/models/smollm2")
    assert uniform[3:5] == ["train", "--output-dir"]
    assert uniform[-6:] == ["--method", "apt", "--shape", "uniform", "--learning-rate", "2e-4"]  # apt's flags
    # apply to its shape variant


def test_classification_children_keep_todays_flags(tmp_path):
    data = tmp_path / "t.jsonl"
    data.write_text('{"text": "a", "label": 0}\n')
    config = build_config(None, None, {"train": str(data), "validation": str(data)})
    command = train_command(config, "apt", tmp_path / "apt", "/m")
    assert config.task == "classification" and config.reference_method == "full"
    assert command[command.index("--task") + 1] == "classification"
    assert "--no-measure-speed" in command and "--eval-mc" not in command


def test_a_half_finished_method_resumes_from_its_newest_checkpoint(tmp_path):
    data = tmp_path / "t.jsonl"
    data.write_text('{"text": "a", "label": 0}\n')
    values = {"train": str(data), "validation": str(data), "save_every": 50}
    command = train_command(build_config(None, None, values), "apt", tmp_path / "apt", "/m")
    assert command[command.index("--save-every") + 1] == "50" and "--resume" not in command
    resumed = build_config(None, None, {**values, "resume": True})
    assert "--resume" not in train_command(resumed, "apt", tmp_path / "apt", "/m")  # nothing to resume yet
    (tmp_path / "apt" / "checkpoints" / "step-000050").mkdir(parents=True)
    (tmp_path / "apt" / "checkpoints" / "step-000050" / "trainer.json").write_text("{}")
    command = train_command(resumed, "apt", tmp_path / "apt", "/m")
    assert command[command.index("--resume") + 1] == "latest"
    with pytest.raises(ConfigError, match="save_every must be >= 1"):
        build_config(None, None, {**values, "save_every": 0})


def test_packaged_model_aliases_resolve_in_the_parent(monkeypatch, tmp_path):
    monkeypatch.setattr("aptune.assets.smollm2_path", lambda: tmp_path / "smol")
    monkeypatch.setattr("aptune.assets.minilm_path", lambda: tmp_path / "mini")
    monkeypatch.setattr("aptune.assets.gemma3_270m_path", lambda: tmp_path / "gemma")
    monkeypatch.chdir(tmp_path)
    assert resolve_model("smollm2") == str(tmp_path / "smol")
    assert resolve_model("minilm") == resolve_model("") == str(tmp_path / "mini")
    assert resolve_model("gemma3-270m") == str(tmp_path / "gemma")
    assert resolve_model("org/some-model") == "org/some-model"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"task": "seq2seq"}, "unknown task 'seq2seq'; choose from classification, causal-lm"),
        ({"eval_mc": ["x.jsonl"]}, "eval_mc only apply to --task causal-lm"),
        ({"task": "causal-lm", "eval_mc": ["nowhere/x.jsonl"]}, "multiple-choice file not found: nowhere"),
        ({"task": "causal-lm", "eval_stride": 100, "max_length": 64}, "eval_stride must be <= max_length"),
        ({"task": "causal-lm", "eval_limit": 0}, "eval_limit must be >= 1"),
        ({"reference": "nothing"}, "unknown reference method 'nothing'"),
    ],
)
def test_bad_lm_settings_are_refused(tmp_path, flags, message):
    data = tmp_path / "t.jsonl"
    data.write_text('{"text": "a b c"}\n')
    with pytest.raises(ConfigError, match=message):
        build_config(None, None, {"train": str(data), "validation": str(data), **flags})


def test_bad_lm_flags_are_one_line_and_status_2(tmp_path, capsys):
    data = tmp_path / "t.jsonl"
    data.write_text('{"text": "a b c"}\n')
    argv = ["--train", str(data), "--validation", str(data), "--output", str(tmp_path / "o")]
    assert main([*argv, "--eval-mc", str(tmp_path / "missing.jsonl"), "--task", "causal-lm"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("aptune bench: error: multiple-choice file not found") and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_eval_lines_with_a_metric_name_are_parsed():
    assert parse_eval_line("step 7: validation perplexity 123.25, density 0.700") == (7, 123.25, 0.7)
    assert parse_eval_line("step 40: validation accuracy 0.8123, density 0.412") == (40, 0.8123, 0.412)


# -- summaries, ratios and the table (pure functions) ---------------------------------------------------


def _lm_report(ppl, memory, time_s, density, speedup, mc_acc):
    comparison = {
        "dense": {"batch_size": 8, "length": 128, "throughput": 10.0},
        "final": {"batch_size": 8, "length": 128, "throughput": 10.0 * speedup},
        "speedup": speedup,
        "speedup_spread": {"min": 0.9 * speedup, "q1": speedup - 0.01, "q3": speedup + 0.01, "max": speedup},
        "runs": 8,
    }
    decode = {**comparison, "final": {**comparison["final"], "length": 16}, "new_tokens": 64}
    return {
        "task": "causal-lm",
        "density": density,
        "metrics": {
            "validation_metric": "perplexity",
            "best_validation": ppl * 1.1,
            "best_step": 100,
            "test_perplexity": ppl,
            "test_perplexity_detail": {"window": 128, "stride": 64, "tokens": 5000},
            "test_perplexity_blocks": ppl * 1.2,
            "multiple_choice": {"/d/mc/wikihow_goal.jsonl": {"acc": mc_acc, "acc_norm": mc_acc, "n": 200}},
        },
        "train_time_s": time_s,
        "steps": 100,
        "steps_per_epoch": 400,
        "peak_memory_mb": memory,
        "peak_memory_kind": "process_peak_rss",
        "history": [{"step": 100, "train_time_s": time_s, "validation": ppl * 1.1, "density": density}],
        "inference": {
            **comparison,
            "prefill_tokens_per_s": {"dense": 1280.0, "final": 1280.0 * speedup},
            "decode": decode,
            "decode_tokens_per_s": {"dense": 640.0, "final": 640.0 * speedup},
        },
    }


def test_lm_summary_keeps_perplexity_mc_epoch_time_and_speed():
    s = metrics.summarize_report(_lm_report(20.0, 900.0, 50.0, 0.7, 1.4, 0.3))
    assert s["test_perplexity"] == 20.0 and (s["perplexity_window"], s["perplexity_stride"]) == (128, 64)
    assert s["multiple_choice"]["/d/mc/wikihow_goal.jsonl"] == {"acc": 0.3, "acc_norm": 0.3, "n": 200}
    assert s["train_time_per_epoch_s"] == pytest.approx(200.0)  # 50 s for a quarter epoch
    report = _lm_report(20.0, 900.0, 50.0, 0.7, 1.4, 0.3) | {"setup_time_s": 10.0}
    assert metrics.summarize_report(report)["train_time_per_epoch_s"] == pytest.approx(10 + 40 * 4)
    assert s["epochs_trained"] == 0.25
    assert s["inference"]["prefill"]["tokens_per_s"] == {"dense": 1280.0, "final": 1280.0 * 1.4}
    assert s["inference"]["prefill"]["speedup"] == 1.4 and s["inference"]["prefill"]["length"] == 128
    decode = s["inference"]["decode"]
    assert decode["new_tokens"] == 64 and decode["prompt_length"] == 16 and decode["batch_size"] == 8
    cls = metrics.summarize_report({k: v for k, v in _lm_report(2, 1, 1, 1, 1, 0).items() if k != "task"})
    assert "test_perplexity" not in cls  # classification summaries are unchanged


def _lm_results():
    methods = {
        "lora": metrics.summarize_report(_lm_report(20.0, 1000.0, 50.0, 1.0, 1.0, 0.30)) | {"status": "ok"},
        "apt": metrics.summarize_report(_lm_report(30.0, 800.0, 40.0, 0.69, 1.5, 0.28)) | {"status": "ok"},
        "llm-pruner": {"status": "failed", "error": "Traceback\nValueError: no uniform shape fits"},
    }
    info, methods = metrics.compare_lm(methods, "lora")
    config = {"data": "/d/brown", "seed": 0, "epochs": 1.0, "max_steps": 100, "batch_size": 4}
    config |= {"max_length": 128, "evals_per_epoch": 1, "target_density": 0.7, "mmap_threshold": 2**20}
    return {
        "task": "causal-lm",
        "reference": "lora",
        "comparison": info,
        "config": config,
        "methods": methods,
        "command": "aptune bench --preset cpu-lm",
        "model_path": "smol",
        "inference_device": "cpu",
    }


def test_lm_ratios_are_to_the_reference():
    results = _lm_results()
    lora, apt = results["methods"]["lora"], results["methods"]["apt"]
    assert lora["perplexity_vs_ref"] == 1.0 and lora["peak_memory_vs_ref"] == 1.0
    assert apt["perplexity_vs_ref"] == pytest.approx(1.5) and apt["peak_memory_vs_ref"] == pytest.approx(0.8)
    assert apt["train_time_per_epoch_vs_ref"] == pytest.approx(0.8) and apt["tta_s"] is None
    assert results["comparison"] == {"reference": "lora", "reference_ok": True}
    _, alone = metrics.compare_lm({"apt": results["methods"]["apt"]}, "lora")
    assert alone["apt"]["perplexity_vs_ref"] is None  # no reference, no ratio


def test_lm_markdown_shows_every_lm_column():
    results = _lm_results()
    text = markdown(results)
    assert text == lm_markdown(results)
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    header = rows["method"]
    for title in (
        "held-out ppl",
        "ppl vs lora",
        "wikihow_goal acc / acc_norm",
        "train s/epoch",
        "mem vs lora",
    ):
        assert title in header
    assert "prefill speed-up" in header and "decode tok/s (dense → final)" in header
    for cell in ("0.690", "30.000", "1.500x", "0.280 / 0.280", "160.0", "800", "0.80x", "1280 → 1920"):
        assert cell in rows["apt"], cell
    assert "1.50x (IQR 1.49-1.51)" in rows["apt"] and "640 → 960" in rows["apt"]
    assert "failed" in rows["llm-pruner"] and "no uniform shape fits" in text
    assert len(header.split("|")) == len(rows["apt"].split("|")) == len(rows["llm-pruner"].split("|"))
    assert "windows of 128 tokens advancing by 64" in text and "Time to accuracy: n/a" in text
    assert "extrapolated" in text and "MALLOC_MMAP_THRESHOLD_=1048576" in text


# -- end to end on a tiny causal LM ----------------------------------------------------------------------

LM_METHODS = ["lora", "apt", "apt-uniform"]


@pytest.fixture(scope="module")
def lm_bench(lm_task):
    out = lm_task / "out"
    argv = [
        *("--task", "causal-lm", "--model", str(lm_task / "model"), "--data", str(lm_task / "text")),
        *("--output", str(out), "--methods", *LM_METHODS, "--max-steps", "4", "--batch-size", "4"),
        *("--max-length", "32", "--evals-per-epoch", "1", "--density", "0.6", "--cpu", "--no-progress"),
        *("--eval-stride", "16", "--eval-mc", str(lm_task / "mc.jsonl"), "--eval-limit", "6"),
        *("--mmap-threshold", str(2**20)),
        *("--method-args", "lora=--lora-targets q v gate"),
        *(
            "--method-args",
            "apt=--ffn-multiple 8 --one-shot-batches 2 --salience-start 1 --pruning-end 4 --num-checkpoints 2",
        ),
    ]
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()) as stdout:
        mp.setenv("OMP_NUM_THREADS", "1")
        code = main(argv)
    results = json.loads((out / "results.json").read_text())
    return {"code": code, "out": out, "results": results, "stdout": stdout.getvalue(), "argv": argv}


def test_lm_bench_records_every_lm_number(lm_bench, lm_task):
    results = lm_bench["results"]
    assert lm_bench["code"] == 0, {n: e.get("error") for n, e in results["methods"].items()}
    assert results["task"] == "causal-lm" and results["reference"] == "lora" and results["finished"]
    assert list(results["methods"]) == LM_METHODS
    methods = results["methods"]
    mc_path = str((lm_task / "mc.jsonl").resolve())
    for name, m in methods.items():
        assert m["status"] == "ok", m.get("error")
        assert "--task causal-lm" in m["train_command"]
        assert m["validation_metric"] == "perplexity" and m["best_validation"] > 1
        assert m["test_perplexity"] > 1 and m["test_perplexity_blocks"] > 1
        assert (m["perplexity_window"], m["perplexity_stride"]) == (32, 16)
        mc = m["multiple_choice"][mc_path]
        assert mc["n"] == 6 and 0 <= mc["acc"] <= 1 and 0 <= mc["acc_norm"] <= 1
        assert m["steps"] == 4 and m["steps_per_epoch"] >= 1
        setup = m["setup_time_s"]  # one-shot calibration and pruning count once, not per step
        assert setup is not None and 0 <= setup < m["train_time_s"]
        assert m["train_time_per_epoch_s"] == pytest.approx(
            setup + (m["train_time_s"] - setup) / (4 / m["steps_per_epoch"])
        )
        assert m["train_time_per_epoch_s"] > 0 and m["train_peak_memory_mb"] > 0
        assert m["train_tokens_per_s"] > 0
        prefill, decode = m["inference"]["prefill"], m["inference"]["decode"]
        assert (prefill["batch_size"], prefill["length"]) == (8, 256)
        assert decode["batch_size"] == 8 and decode["new_tokens"] == 64
        for speed in (prefill, decode):
            assert speed["tokens_per_s"]["dense"] > 0 and speed["tokens_per_s"]["final"] > 0
            assert speed["speedup"] > 0 and speed["runs"] >= 1
        assert m["tta_s"] is None
        assert not (lm_bench["out"] / name / "inference.json").exists()  # timed in the train child
        assert not (lm_bench["out"] / name / "inference.stdout.log").exists()
        ref = methods["lora"]
        assert m["perplexity_vs_ref"] == pytest.approx(m["test_perplexity"] / ref["test_perplexity"])
        assert m["peak_memory_vs_ref"] == pytest.approx(
            m["train_peak_memory_mb"] / ref["train_peak_memory_mb"]
        )
    assert methods["lora"]["perplexity_vs_ref"] == 1.0 and methods["lora"]["density"] == 1.0
    assert "--lora-targets q v gate" in methods["lora"]["train_command"]
    assert "--shape uniform" in methods["apt-uniform"]["train_command"]
    for name in ("apt", "apt-uniform"):
        assert methods[name]["density"] <= 0.6 + 1e-9
    assert results["config"]["mmap_threshold"] == 2**20


def test_lm_bench_writes_the_lm_table(lm_bench):
    text = (lm_bench["out"] / "results.md").read_text()
    assert text.startswith("# aptune bench (causal LM)") and text in lm_bench["stdout"]
    for name in LM_METHODS:
        assert f"| {name} |" in text
    assert "mc acc / acc_norm" in text  # the column of mc.jsonl
    assert "ppl vs lora" in text and "Time to accuracy: n/a" in text
    assert VALIDATION_PLOT in lm_bench["results"]["plots"]


def test_lm_bench_resumes_from_the_reports(lm_bench, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(lm_bench["out"], out)
    argv = [*lm_bench["argv"], "--output", str(out), "--resume"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    for name in LM_METHODS:
        entry, old = results["methods"][name], lm_bench["results"]["methods"][name]
        assert entry["resumed"] and entry["test_perplexity"] == old["test_perplexity"]
        assert entry["inference"] == old["inference"]
