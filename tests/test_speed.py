"""Interleaved speed comparisons: a change in machine load during the run must not bias the speed-up.

The load tests run two identical tiny BERTs (true speed-up 1.0) on a fake clock that advances only when a
model runs, by the model's cost times the machine load at that moment, so they are exact and fast.
"""

from __future__ import annotations

import json
import logging
import random

import pytest
import torch
from conftest import tiny_model
from transformers import BertModel

import aptune
from aptune.bench import inference, runner
from aptune.bench.config import BenchConfig
from aptune.bench.report import COLUMNS, markdown, table_row, vs_dense_cell
from aptune.evaluate import ComparisonResult, compare_throughput, format_speedup, measure_throughput
from aptune.train import compare_speed

BATCH, LENGTH, WARMUP, RUNS = 2, 8, 3, 10
SPREAD_KEYS = {"min", "q1", "q3", "max", "iqr"}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from more threads, and on a busy machine spinning threads crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class FakeLoad:
    """A clock that stands still except while a model runs; a forward pass advances it by the model's cost
    times ``load(now)``, the machine load when the pass starts."""

    def __init__(self, load):
        self.now = 0.0
        self.load = load
        self.handles = []

    def __call__(self) -> float:
        return self.now

    def attach(self, model: torch.nn.Module, cost: float = 1.0) -> torch.nn.Module:
        def advance(module, args, output):
            self.now += cost * self.load(self.now)

        self.handles.append(model.register_forward_hook(advance))
        return model

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()


def twins() -> tuple[torch.nn.Module, torch.nn.Module]:
    """Two identical tiny BERT classifiers: the true speed-up of one over the other is 1."""
    return tiny_model("BertForSequenceClassification"), tiny_model("BertForSequenceClassification")


# The load changes half-way through each measurement (13 passes of each model: 3 warm-up + 10 timed, cost 1),
# or rises steadily (a job starting up next to ours).
LOADS = {
    "step": lambda t: 1.0 if t < (WARMUP + RUNS) else 3.0,
    "ramp": lambda t: 1.0 + t / 40,
}


def interleaved_speedup(load) -> ComparisonResult:
    clock = FakeLoad(load)
    dense, pruned = (clock.attach(m) for m in twins())
    return compare_throughput(dense, pruned, BATCH, LENGTH, warmup=WARMUP, runs=RUNS, timer=clock)


def sequential_speedup(load) -> float:
    """The old way: the dense model timed first, the pruned one after it."""
    clock = FakeLoad(load)
    dense, pruned = (clock.attach(m) for m in twins())
    d = measure_throughput(dense, BATCH, LENGTH, warmup=WARMUP, runs=RUNS, timer=clock)
    p = measure_throughput(pruned, BATCH, LENGTH, warmup=WARMUP, runs=RUNS, timer=clock)
    return p.throughput / d.throughput


@pytest.mark.parametrize("load", list(LOADS))
def test_a_load_change_during_the_run_does_not_bias_the_interleaved_speedup(load):
    result = interleaved_speedup(LOADS[load])
    assert result.speedup == pytest.approx(1.0, rel=0.1)
    assert result.spread.q1 == pytest.approx(1.0, rel=0.1) and result.spread.q3 == pytest.approx(1.0, rel=0.1)
    sequential = sequential_speedup(LOADS[load])
    assert abs(sequential - 1.0) > 0.1, f"the sequential speed-up should be biased, got {sequential:.3f}"
    assert sequential < 0.8  # the pruned model, timed second, took the extra load


def test_the_interleaved_ratio_is_the_truth_without_load_and_shows_a_real_difference():
    clock = FakeLoad(lambda t: 1.0)
    dense, pruned = twins()
    clock.attach(dense, cost=2.5)
    clock.attach(pruned, cost=1.0)
    result = compare_throughput(dense, pruned, BATCH, LENGTH, warmup=1, runs=5, timer=clock)
    assert result.ratios == pytest.approx([2.5] * 5) and result.speedup == pytest.approx(2.5)
    assert result.reference.median_s == pytest.approx(2.5) and result.candidate.median_s == pytest.approx(1.0)
    assert result.candidate.throughput == pytest.approx(BATCH / 1.0)
    assert result.spread.iqr == pytest.approx(0.0)


def test_spikes_on_single_calls_of_either_model_leave_the_median_ratio_alone():
    rng = random.Random(0)
    clock = FakeLoad(lambda t: 5.0 if rng.random() < 0.15 else 1.0)
    dense, pruned = (clock.attach(m) for m in twins())
    result = compare_throughput(dense, pruned, BATCH, LENGTH, warmup=2, runs=15, timer=clock)
    assert result.spread.max > 2 or result.spread.min < 0.5  # some pairs did see a spike
    assert result.speedup == pytest.approx(1.0, rel=0.1)


def test_the_models_alternate_after_warming_up_both():
    calls = []
    dense, pruned = twins()
    dense.register_forward_hook(lambda *_: calls.append("dense"))
    pruned.register_forward_hook(lambda *_: calls.append("pruned"))
    compare_throughput(dense, pruned, BATCH, LENGTH, warmup=2, runs=3)
    assert calls == ["dense", "pruned"] * 5


def test_both_models_run_as_loaded_and_a_trained_models_frozen_flags_come_back():
    """A trained model is frozen (no parameter requires grad) and a dense reference fresh from disk is not. The
    flag changes PyTorch's kernels even without autograd (a strided 3-D input to a linear layer is folded into
    one matrix product only when the weight requires grad: a causal LM's head on the last position ran 4x
    slower frozen), so both run in the loaded state, and the trained model's flags are restored after."""
    seen = []
    dense, pruned = twins()
    for p in pruned.parameters():
        p.requires_grad_(False)
    # one mixed flag, to check that each comes back
    pruned.bert.embeddings.word_embeddings.weight.requires_grad_(True)
    before = [p.requires_grad for p in pruned.parameters()]

    def call(model, ids, mask):
        seen.append(all(p.requires_grad for p in model.parameters()))
        return model(input_ids=ids, attention_mask=mask)

    compare_throughput(dense, pruned, BATCH, LENGTH, warmup=1, runs=2, call=call)
    assert seen == [True] * 6
    assert [p.requires_grad for p in pruned.parameters()] == before
    assert all(p.requires_grad for p in dense.parameters())


def test_the_comparison_records_every_ratio_and_its_spread():
    dense, pruned = twins()
    result = compare_throughput(dense, pruned, BATCH, LENGTH, warmup=1, runs=4)
    out = json.loads(json.dumps(result.to_dict()))
    assert {"reference", "candidate", "ratios", "speedup", "spread", "order", "runs", "warmup"} <= set(out)
    assert out["order"] == "interleaved" and len(out["ratios"]) == 4 and set(out["spread"]) == SPREAD_KEYS
    s = out["spread"]
    assert 0 < s["min"] <= s["q1"] <= out["speedup"] <= s["q3"] <= s["max"]
    for side in ("reference", "candidate"):
        assert out[side]["throughput"] > 0 and out[side]["batch_size"] == BATCH
        assert out[side]["peak_memory_mb"] is None  # CPU
    text = format_speedup(result.speedup, result.spread, result.runs)
    assert "median of 4 interleaved pairs" in text and "IQR" in text


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"runs": 0}, "runs must be >= 1, got 0"),
        ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
        ({"length": -1}, "length must be >= 1, got -1"),
        ({"warmup": -1}, "warmup must be >= 0, got -1"),
    ],
)
def test_bad_arguments_are_a_clear_value_error(kwargs, message):
    dense, pruned = twins()
    settings = {"batch_size": BATCH, "length": LENGTH, "warmup": 0, "runs": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        compare_throughput(dense, pruned, **settings)
    with pytest.raises(ValueError, match=message):
        measure_throughput(dense, **settings)


# -- train's report, the bench child and its table ---------------------------------------------------------


@pytest.fixture
def dense_folder(tmp_path):
    """A tiny dense encoder saved without a classifier head, as a starting model usually is."""
    torch.manual_seed(0)
    model = BertModel(tiny_model("BertForSequenceClassification", num_labels=2).config)
    model.save_pretrained(tmp_path / "dense")
    return tmp_path / "dense"


@pytest.fixture
def pruned_folder(tmp_path):
    model = tiny_model("BertForSequenceClassification", num_labels=2)
    masks = aptune.StructuralMasks.for_model(model)
    for i in range(len(masks.heads)):
        masks.set_heads(i, [1.0, 0.0, 1.0, 0.0])
        masks.set_neurons(i, (torch.arange(40) % 2 == 0).float())
    aptune.save_pruned(aptune.compact(model, masks), tmp_path / "pruned")
    return tmp_path / "pruned"


class Records(logging.Handler):
    """Keeps the messages transformers logs (its own handler writes to a stream pytest swapped out)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> Records:
        logging.getLogger("transformers").addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("transformers").removeHandler(self)


def test_compare_speed_reports_the_interleaved_speedup_and_loads_dense_quietly(dense_folder, capfd):
    from transformers.utils import logging as hf_logging

    from aptune.train import load_classifier

    with Records() as plain:
        load_classifier(str(dense_folder), [0, 1])
    assert any("MISSING" in m for m in plain.messages)  # what a plain load reports for this folder
    capfd.readouterr()
    verbosity = hf_logging.get_verbosity()
    model = tiny_model("BertForSequenceClassification", num_labels=2)
    with Records() as quiet:
        report = compare_speed(str(dense_folder), model, 2, torch.device("cpu"), 4, 16, warmup=1, runs=3)
    assert quiet.messages == [] and "Loading weights" not in capfd.readouterr().err
    assert hf_logging.get_verbosity() == verbosity and hf_logging.is_progress_bar_enabled()
    assert {"dense", "final", "speedup", "speedup_spread", "ratios", "order", "runs"} <= set(report)
    assert report["order"] == "interleaved" and set(report["speedup_spread"]) == SPREAD_KEYS
    assert report["final"]["throughput"] > 0 and report["dense"]["throughput"] > 0
    assert report["speedup"] == sorted(report["ratios"])[1]  # the median of 3


def test_demo_summary_shows_the_interleaved_ratio_and_spread(capsys):
    from aptune.cli import print_summary

    params = {"prunable": 100, "total": 120}
    spread = {"min": 2.31, "q1": 2.4, "q3": 2.5, "max": 2.6, "iqr": 0.1}
    speed = {"batch_size": 32, "length": 64}
    report = {
        "method": "apt",
        "metrics": {"best_validation": 0.8, "best_step": 10},
        "density": 0.4,
        "params_before": params,
        "params_after": params,
        "train_time_s": 1.0,
        "eval_time_s": 0.1,
        "peak_memory_mb": 100.0,
        "peak_memory_kind": "process_peak_rss",
        "steps": 10,
        "inference": {
            "dense": {**speed, "throughput": 20.0},
            "final": {**speed, "throughput": 49.0},
            "speedup": 2.45,
            "speedup_spread": spread,
            "ratios": [2.45] * 10,
            "runs": 10,
        },
    }
    print_summary(report, "runs/demo")
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("inference"))
    assert "49.0/s vs dense 20.0/s: 2.45x (median of 10 interleaved pairs, IQR 2.40-2.50x" in line


def test_the_bench_child_times_the_dense_reference_interleaved(pruned_folder, dense_folder, tmp_path, capfd):
    out = tmp_path / "inference.json"
    argv = [str(pruned_folder), "--batch-size", "2", "--length", "8", "--warmup", "1", "--runs", "3"]
    with Records() as records:
        assert inference.main([*argv, "--out", str(out), "--reference", str(dense_folder)]) == 0
    assert records.messages == [] and "Loading weights" not in capfd.readouterr().err
    result = json.loads(out.read_text())
    assert result["throughput"] > 0 and result["peak_memory_mb"] is not None  # the model alone, as before
    vs = result["vs_dense"]
    assert vs["reference_path"] == str(dense_folder) and vs["order"] == "interleaved"
    assert len(vs["ratios"]) == 3 and set(vs["spread"]) == SPREAD_KEYS and vs["speedup"] > 0
    assert vs["candidate"]["throughput"] > 0 and vs["reference"]["throughput"] > 0
    assert inference.main([*argv, "--out", str(out)]) == 0  # alone, without a reference
    assert "vs_dense" not in json.loads(out.read_text())


def test_the_bench_child_refuses_bad_sizes(pruned_folder, tmp_path, capsys):
    with pytest.raises(ValueError, match="runs must be >= 1, got 0"):
        inference.measure_saved_model(pruned_folder, 2, 8, runs=0)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        inference.measure_saved_model(pruned_folder, 0, 8)
    with pytest.raises(SystemExit) as exit_info:
        inference.main([str(pruned_folder), "--runs", "0", "--out", str(tmp_path / "x.json")])
    assert exit_info.value.code == 2 and "--runs must be >= 1, got 0" in capsys.readouterr().err


def test_the_runner_passes_the_starting_model_as_reference(tmp_path):
    config = BenchConfig(data="rt-polarity", output_dir=str(tmp_path))
    paths = (tmp_path / "model", tmp_path / "inference.json")
    command = runner.inference_command(config, *paths, "cpu", "/models/dense")
    assert command[command.index("--reference") + 1] == "/models/dense"
    assert "--reference" not in runner.inference_command(config, *paths, "cpu")


def test_the_table_has_the_speedup_over_dense_with_its_spread():
    vs = {"speedup": 2.456, "spread": {"min": 2.0, "q1": 2.3, "q3": 2.6, "max": 2.9, "iqr": 0.3}}
    assert vs_dense_cell(vs) == "2.46x (IQR 2.30-2.60)" and vs_dense_cell(None) == "–"
    entry = {"status": "ok", "density": 0.4, "inference": {"throughput": 10.0, "vs_dense": vs}}
    row = table_row("apt", entry)
    assert len(row) == len(COLUMNS) and row[COLUMNS.index("speed-up vs dense")] == "2.46x (IQR 2.30-2.60)"
    results = {
        "config": BenchConfig(data="rt-polarity").to_dict(),
        "tta": {},
        "methods": {
            "apt": {
                **entry,
                "inference": {
                    **entry["inference"],
                    "batch_size": 2,
                    "length": 8,
                    "dtype": "float32",
                    "device": "cpu",
                    "runs": 3,
                    "peak_memory_kind": "rss_peak_minus_after_load",
                },
            }
        },
    }
    text = markdown(results)
    assert "| speed-up vs dense |" in text and "2.46x (IQR 2.30-2.60)" in text
    assert "alternating with the method's model run by run" in text
