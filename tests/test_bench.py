"""`aptune bench`: time to accuracy and the results table as pure functions, bad input, and one tiny end-to-end
run (full, a failing LoRA, APT with and without distillation) shared by the tests that check its outputs."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import shlex
import shutil
import subprocess
import sys

import pytest
import torch
from test_train_cli import make_tiny_folder, write_task

from aptune.bench import metrics, runner
from aptune.bench.cli import add_bench_arguments, add_bench_parser, config_from_args, main
from aptune.bench.config import PRESETS, build_config
from aptune.bench.report import APT_PLOT, VALIDATION_PLOT, markdown, table_rows
from aptune.bench.runner import child_env, parse_eval_line
from aptune.bench.variants import default_methods, variants
from aptune.config import ConfigError

TRAIN = importlib.import_module("aptune.train")  # the module: `aptune.train` is also the train() function
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _entry(history, density, best, status="ok", throughput=None, **extra):
    return {
        "status": status,
        "density": density,
        "best_validation": best,
        "history": history,
        "inference": {"throughput": throughput} if throughput is not None else {},
        **extra,
    }


def _h(step, t, val, density=1.0):
    return {"step": step, "train_time_s": t, "validation": val, "density": density, "trainable_params": 10}


# -- time to accuracy -----------------------------------------------------------------------------------


def test_tta_threshold_is_a_fraction_of_full_finetunings_best():
    assert metrics.tta_threshold(0.9, 0.97) == pytest.approx(0.873)
    assert metrics.tta_threshold(None, 0.97) is None


def test_tta_is_the_first_qualifying_evaluation_not_the_best():
    history = [_h(10, 1.0, 0.80), _h(20, 2.0, 0.88), _h(30, 3.0, 0.95), _h(40, 4.0, 0.90)]
    hit = metrics.first_reaching(history, 1.0, 0.873)
    assert hit["step"] == 20
    assert metrics.time_to_accuracy(history, 1.0, 0.873) == 2.0


def test_tta_ignores_evaluations_above_the_final_density():
    # the LoRA phase before pruning reaches the threshold at density 1; only the pruned evaluations count,
    # on the cumulative clock that includes the earlier phase
    history = [
        _h(10, 1.0, 0.90, density=1.0),
        _h(20, 2.0, 0.85, density=0.6),
        _h(30, 3.0, 0.89, density=0.4015),  # within the 0.002 tolerance of the final 0.4
        _h(40, 4.0, 0.91, density=0.4),
    ]
    assert metrics.time_to_accuracy(history, 0.4, 0.873) == 3.0
    assert metrics.time_to_accuracy(history, 0.4, 0.873, tolerance=0.001) == 4.0


def test_tta_is_none_when_never_reached_or_without_a_threshold():
    history = [_h(10, 1.0, 0.5), _h(20, 2.0, 0.6)]
    assert metrics.time_to_accuracy(history, 1.0, 0.873) is None
    assert metrics.time_to_accuracy(history, 1.0, None) is None
    assert metrics.time_to_accuracy([], 1.0, 0.5) is None


def test_compare_gives_tta_and_speed_relative_to_full():
    methods = {
        "full": _entry([_h(10, 2.0, 0.80), _h(20, 4.0, 0.90)], 1.0, 0.90, throughput=100.0),
        "apt": _entry(
            [_h(10, 3.0, 0.95, density=1.0), _h(20, 6.0, 0.88, density=0.4)], 0.4, 0.95, throughput=250.0
        ),
        "lora": _entry([_h(10, 1.0, 0.5)], 1.0, 0.5, throughput=110.0),
        "broken": {"status": "failed", "error": "boom"},
    }
    info, out = metrics.compare(methods, 0.97)
    assert info["threshold"] == pytest.approx(0.873) and info["reference_best_validation"] == 0.90
    assert out["full"]["tta_s"] == 4.0 and out["full"]["tta_vs_full"] == 1.0
    assert out["apt"]["tta_s"] == 6.0 and out["apt"]["tta_step"] == 20
    assert out["apt"]["tta_vs_full"] == pytest.approx(1.5)
    assert out["apt"]["speedup_vs_full"] == pytest.approx(2.5)
    assert out["lora"]["tta_s"] is None and out["lora"]["tta_vs_full"] is None
    assert "tta_s" not in out["broken"]
    assert "tta_s" not in methods["apt"]  # inputs untouched


@pytest.mark.parametrize("full", [None, {"status": "failed", "error": "x"}])
def test_no_tta_without_a_successful_full_run(full):
    methods = {"apt": _entry([_h(10, 3.0, 0.95, density=0.4)], 0.4, 0.95, throughput=250.0)}
    if full is not None:
        methods["full"] = full
    info, out = metrics.compare(methods, 0.97)
    assert info["threshold"] is None
    assert out["apt"]["tta_s"] is None and out["apt"]["tta_vs_full"] is None
    assert out["apt"]["speedup_vs_full"] is None


def test_summarize_report_keeps_the_numbers_and_curves():
    report = {
        "density": 0.4,
        "metrics": {"best_validation": 0.9, "best_step": 30, "test_at_best": 0.88},
        "train_time_s": 12.0,
        "peak_memory_mb": 500.0,
        "peak_memory_kind": "process_peak_rss",
        "history": [_h(10, 1.0, 0.8) | {"trainable_params": 7}, _h(20, 2.0, 0.9) | {"trainable_params": 9}],
        "apt_history": [{"step": 5, "density": 0.7, "adapter_params": 100, "ranks": [8, 16, 4]}],
        "params_after": {"total": 1000, "prunable": 400},
    }
    s = metrics.summarize_report(report)
    assert s["trainable_params_max"] == 9 and s["test_at_best"] == 0.88 and s["params_total_after"] == 1000
    assert s["apt_history"] == [{"step": 5, "density": 0.7, "total_rank": 28, "adapter_params": 100}]


# -- the table ------------------------------------------------------------------------------------------


def _results():
    methods = {
        "full": _entry(
            [_h(10, 2.0, 0.80), _h(20, 4.0, 0.90)],
            1.0,
            0.9012,
            throughput=100.0,
            test_at_best=0.8811,
            train_peak_memory_mb=657.4,
            train_peak_memory_kind="cuda_max_allocated",
            trainable_params_max=22713218,
        ),
        "apt": _entry(
            [_h(20, 6.0, 0.88, density=0.4)],
            0.3991,
            0.8765,
            throughput=250.0,
            test_at_best=0.8543,
            train_peak_memory_mb=434.2,
            trainable_params_max=1234567,
        ),
        "lora": {"status": "failed", "error": "Traceback...\naptune train: error: lora_rank must be >= 1"},
    }
    for entry in methods.values():
        if "inference" in entry:
            entry["inference"].update(
                peak_memory_mb=55.5, peak_memory_kind="cuda_max_allocated", batch_size=8, length=16
            )
            entry["inference"].update(dtype="bfloat16", device="cuda")
    info, methods = metrics.compare(methods, 0.97)
    config = {"data": "rt-polarity", "seed": 0, "epochs": 6.0, "max_steps": None, "batch_size": 32}
    config |= {"max_length": 64, "evals_per_epoch": 2, "target_density": 0.4}
    return {"config": config, "tta": info, "methods": methods, "command": "aptune bench", "model_path": "m"}


def test_markdown_table_has_every_method_with_its_numbers():
    results = _results()
    text = markdown(results)
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert set(rows) >= {"method", "full", "apt", "lora"}
    for cell in ("1.000", "0.9012", "0.8811", "4.0", "1.00x", "657", "100.0", "22,713,218", "55.5"):
        assert cell in rows["full"]
    for cell in ("0.399", "0.8765", "0.8543", "6.0", "1.50x", "434", "250.0", "2.50x", "1,234,567"):
        assert cell in rows["apt"]
    assert "failed" in rows["lora"]
    assert "0.97 x full fine-tuning's best (0.9012) = 0.8742" in text
    assert "lora_rank must be >= 1" in text  # the failure's last line
    assert len(table_rows(results)[0]) == len(rows["method"].strip("|").split("|"))


# -- configuration and the registry ---------------------------------------------------------------------


def test_every_training_method_is_a_variant(monkeypatch):
    registry = variants()
    for name in TRAIN.METHODS:
        assert registry[name] == ("--method", name)
    assert registry["apt-nodistill"] == ("--method", "apt", "--no-distill")
    monkeypatch.setattr(TRAIN, "METHODS", (*TRAIN.METHODS, "brand-new"))
    assert variants()["brand-new"] == ("--method", "brand-new")
    assert set(default_methods()) <= set(variants())


def test_preset_values_are_overridden_by_file_then_flags():
    config = build_config(
        "cpu-small", {"epochs": 2.0, "seed": 3}, {"seed": 7, "methods": ["full", "apt-nodistill"]}
    )
    assert config.data == PRESETS["cpu-small"]["data"] and config.model == ""
    assert config.epochs == 2.0 and config.seed == 7 and config.preset == "cpu-small"
    assert config.inference_batch_size == PRESETS["cpu-small"]["inference_batch_size"]
    assert config.flags_for("full") == ("--learning-rate", "5e-5")
    assert config.flags_for("apt-nodistill") == (
        "--learning-rate",
        "1e-3",
    )  # apt's flags apply to its variants
    merged = build_config("gpu", None, {"method_args": {"full": ("--learning-rate", "1e-4")}})
    assert merged.flags_for("full") == ("--learning-rate", "5e-5", "--learning-rate", "1e-4")  # the last wins
    assert merged.inference_dtype == "bfloat16"


def test_eval_lines_of_the_training_child_are_parsed():
    assert parse_eval_line("step 40: validation 0.8123, density 0.412") == (40, 0.8123, 0.412)
    assert parse_eval_line("best validation accuracy   0.8") is None


# -- bad input: one line, status 2, nothing started ------------------------------------------------------


@pytest.fixture
def no_children(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a child process was started")

    monkeypatch.setattr("aptune.bench.session.run_child", refuse)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--methods", "full", "bogus"], "unknown method 'bogus'; choose from"),
        (["--preset", "huge"], "unknown preset 'huge'; choose from cpu-small, gpu"),
        (["--model", "./no/such/model"], "model folder does not exist: ./no/such/model"),
        (["--method-args", "nope=--seed 1"], "method_args for unknown method 'nope'"),
        (["--method-args", "full"], "must look like NAME=FLAGS"),
        (["--inference-dtype", "int3"], "inference_dtype must be one of"),
        (["--mmap-threshold", "-1"], "mmap_threshold must be between 0 and 33554432 bytes"),
    ],
)
def test_bad_input_is_one_line_and_status_2(tmp_path, capsys, no_children, extra, message):
    data = write_task(tmp_path, n_train=8, n_eval=4)
    out = tmp_path / "bench"
    argv = ["--train", str(data["train"]), "--validation", str(data["validation"]), "--output", str(out)]
    assert main([*argv, "--no-progress", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0 and err.startswith("aptune bench: error:")
    assert not out.exists()


def _bad(tmp_path, capsys, extra):
    data = write_task(tmp_path, n_train=8, n_eval=4)
    argv = ["--train", str(data["train"]), "--validation", str(data["validation"])]
    assert main([*argv, "--output", str(tmp_path / "bench"), "--no-progress", *extra]) == 2
    assert not (tmp_path / "bench").exists()
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    return err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_inference_without_cuda_is_refused(tmp_path, capsys, no_children):
    assert "CUDA is not available" in _bad(tmp_path, capsys, ["--inference-device", "cuda"])


def test_config_file_keys_are_checked_and_applied(tmp_path, capsys, no_children):
    config = tmp_path / "bench.json"
    config.write_text(json.dumps({"methods": ["full"], "inference_batch_szie": 4}))
    assert "unknown config file keys: inference_batch_szie" in _bad(
        tmp_path, capsys, ["--config", str(config)]
    )
    config.write_text(json.dumps({"preset": "gpu", "method_args": {"full": "--seed 1"}, "seed": 5}))
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    built = config_from_args(parser.parse_args(["--config", str(config), "--seed", "9"]))
    assert built.preset == "gpu" and built.seed == 9 and built.epochs == PRESETS["gpu"]["epochs"]
    assert built.flags_for("full") == ("--learning-rate", "5e-5", "--seed", "1")


def test_subcommand_handler_raises_config_error_for_the_main_cli(no_children):
    parser = argparse.ArgumentParser(prog="aptune")
    sub = parser.add_subparsers(dest="command", required=True)
    add_bench_parser(sub)
    args = parser.parse_args(["bench", "--data", "rt-polarity", "--methods", "full,nothing"])
    with pytest.raises(ConfigError, match="unknown method 'nothing'"):
        args.func(args)
    args = parser.parse_args(["bench", "--list-methods"])
    with contextlib.redirect_stdout(io.StringIO()) as listing:
        assert args.func(args) == 0
    assert all(name in listing.getvalue() for name in variants())


def test_mmap_threshold_reaches_every_child_and_the_results(tmp_path, monkeypatch):
    """``--mmap-threshold`` is set in the environment of the children (and only there) and recorded."""
    seen = []

    def record(command, log_dir, name, on_line=None, env=None):
        seen.append((name, (env or {}).get("MALLOC_MMAP_THRESHOLD_")))
        return runner.ChildResult(command, 1, 0.0, "", "", "stopped by the test")

    monkeypatch.setattr("aptune.bench.session.run_child", record)
    make_tiny_folder(tmp_path)
    data = write_task(tmp_path, n_train=8, n_eval=4)
    out = tmp_path / "bench"
    argv = ["--model", str(tmp_path / "model"), "--train", str(data["train"])]
    argv += ["--validation", str(data["validation"])]
    with contextlib.redirect_stdout(io.StringIO()):
        main(
            [*argv, "--output", str(out), "--methods", "full", "lora", "--mmap-threshold", "131072", "--cpu"]
        )
    assert seen == [("train", "131072"), ("train", "131072")]
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["mmap_threshold"] == 131072
    assert "MALLOC_MMAP_THRESHOLD_=131072" in (out / "results.md").read_text()
    assert "MALLOC_MMAP_THRESHOLD_" not in child_env()  # unset unless asked for


def test_a_child_process_sees_the_mmap_threshold(tmp_path):
    command = [sys.executable, "-c", "import os; print(os.environ['MALLOC_MMAP_THRESHOLD_'])"]
    child = runner.run_child(command, tmp_path, "probe", env=child_env(65536))
    assert child.ok and (tmp_path / "probe.stdout.log").read_text().strip() == "65536"


# -- end to end on a tiny model --------------------------------------------------------------------------

METHODS = ["full", "lora", "apt", "apt-nodistill"]


def _tiny_task(folder):
    make_tiny_folder(folder)
    return write_task(folder)


def _bench_argv(folder, data, out):
    return [
        *("--model", str(folder / "model"), "--train", str(data["train"])),
        *("--validation", str(data["validation"]), "--test", str(data["test"]), "--output", str(out)),
        *("--methods", *METHODS, "--max-steps", "24", "--batch-size", "8", "--evals-per-epoch", "6"),
        *("--max-length", "16", "--cpu", "--density", "0.5", "--no-progress"),
        "--train-args=--ffn-multiple 8 --num-checkpoints 4",
        *("--method-args", "full=--learning-rate 1e-3", "--method-args", "apt=--learning-rate 3e-3"),
        *("--method-args", "lora=--lora-rank 0"),  # an invalid value: this child fails
        *("--inference-batch-size", "4", "--inference-length", "16", "--inference-runs", "3"),
    ]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    data = _tiny_task(folder)
    out = folder / "out"
    argv = _bench_argv(folder, data, out)
    # one thread per child: tiny models gain nothing from more, and spinning threads crawl on a busy machine
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()) as stdout:
        mp.setenv("OMP_NUM_THREADS", "1")
        code = main(argv)
    results = json.loads((out / "results.json").read_text())
    return {"code": code, "out": out, "results": results, "stdout": stdout.getvalue(), "argv": argv}


def test_bench_runs_every_method_and_records_numbers(bench_run):
    results = bench_run["results"]
    assert list(results["methods"]) == METHODS and results["finished"]
    assert results["seed"] == 0 and results["config"]["methods"] == METHODS
    assert shlex.split(results["command"])[1:] == ["-m", "aptune.bench", *bench_run["argv"]]
    for key in ("torch", "transformers", "aptune", "python"):
        assert results["versions"][key]
    assert results["machine"]["cpu_count"] >= 1
    methods = results["methods"]
    assert methods["full"]["density"] == 1.0
    for name in ("apt", "apt-nodistill"):
        # at or under the budget; removal at every checkpoint can leave a little slack that later, smaller
        # targets cannot refill (blocks once removed do not come back)
        assert 0.45 <= methods[name]["density"] <= 0.5 + 1e-9
        assert methods[name]["apt_history"] and methods[name]["apt_history"][-1]["total_rank"] > 0
    assert "--no-distill" in methods["apt-nodistill"]["train_command"].split()
    assert "--learning-rate 3e-3" in methods["apt-nodistill"]["train_command"]
    for name in ("full", "apt", "apt-nodistill"):
        m = methods[name]
        assert m["status"] == "ok", m.get("error")
        assert 0 <= m["best_validation"] <= 1 and 0 <= m["test_at_best"] <= 1
        assert m["train_time_s"] > 0 and m["train_peak_memory_mb"] > 0 and m["trainable_params_max"] > 0
        assert m["history"] and m["steps"] == 24
        assert m["inference"]["throughput"] > 0 and m["inference"]["batch_size"] == 4
        assert m["inference"]["peak_memory_mb"] is not None and m["inference"]["peak_memory_kind"]
        assert m["speedup_vs_full"] > 0
        assert (bench_run["out"] / name / "report.json").is_file()
    assert methods["full"]["tta_s"] is not None and methods["full"]["tta_vs_full"] == 1.0
    assert results["tta"]["threshold"] == pytest.approx(0.97 * methods["full"]["best_validation"])


def test_a_failing_method_is_recorded_and_the_others_complete(bench_run):
    lora = bench_run["results"]["methods"]["lora"]
    assert lora["status"] == "failed" and lora["returncode"] != 0
    assert "lora_rank must be >= 1" in lora["error"]
    assert bench_run["results"]["methods"]["apt"]["status"] == "ok"  # ran after the failure
    assert bench_run["code"] == 1


def test_bench_writes_the_table_and_plots(bench_run):
    out = bench_run["out"]
    text = (out / "results.md").read_text()
    for name in METHODS:
        assert f"| {name} |" in text
    assert "TTA threshold" in text
    assert text in bench_run["stdout"]
    for plot in (VALIDATION_PLOT, APT_PLOT):
        content = (out / plot).read_bytes()
        assert content.startswith(PNG_SIGNATURE) and len(content) > 1000
    assert sorted(bench_run["results"]["plots"]) == sorted([VALIDATION_PLOT, APT_PLOT])


def test_resume_skips_methods_with_a_report(bench_run, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(bench_run["out"], out)
    report = out / "apt" / "report.json"
    before = report.stat().st_mtime_ns
    argv = [*bench_run["argv"], "--output", str(out), "--resume"]
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()):
        mp.setenv("OMP_NUM_THREADS", "1")
        assert main(argv) == 1
    results = json.loads((out / "results.json").read_text())
    assert report.stat().st_mtime_ns == before
    for name in ("full", "apt", "apt-nodistill"):
        assert results["methods"][name]["resumed"] and results["methods"][name]["inference"]["resumed"]
        old = bench_run["results"]["methods"][name]
        assert results["methods"][name]["best_validation"] == old["best_validation"]
    assert results["methods"]["lora"]["status"] == "failed" and not results["methods"]["lora"]["resumed"]


def test_python_dash_m_aptune_bench_works():
    command = [sys.executable, "-m", "aptune.bench", "--list-methods"]
    done = subprocess.run(command, capture_output=True, text=True, env=child_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    assert "apt-nodistill" in done.stdout and "--no-distill" in done.stdout
