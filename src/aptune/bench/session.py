"""One benchmark run: train every method in its own process, measure inference, write results as it goes.

Layout of the output folder::

    results.json  results.md  validation_vs_time.png  apt_density_rank.png
    METHOD/report.json  METHOD/model/  METHOD/inference.json  METHOD/{train,inference}.std{out,err}.log

Each method's inference child also times the dense starting model (``model_path``), interleaved with the
trained one, so its speed-up over dense is a same-process, same-moment comparison. A causal-LM bench
(``task="causal-lm"``) runs no inference child: each train child already times prefill and decoding of its
compacted model alternately with the dense one, and the bench takes those numbers from ``report.json``.

``results.json`` and ``results.md`` are rewritten after every method, so a crash loses at most the method
that was running. With ``resume`` a method whose ``report.json`` exists is not trained again (and its
``inference.json``, when present, is reused).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from ..config import ConfigError
from .config import BenchConfig
from .metrics import compare, compare_lm, summarize_report
from .report import markdown, write_json, write_plots
from .runner import child_env, inference_command, parse_eval_line, run_child, train_command

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"


def resolve_model(model: str) -> str:
    """The model the children train: an existing folder or a hub name as given; a packaged model for its short
    name ("" or "minilm", "smollm2", "gemma3-270m": installed or converted once, here, so the children do not
    race to convert it). A folder of that name in the working directory wins over an alias."""
    from ..assets import packaged_path

    path = Path(model).expanduser()
    if model and path.exists():
        return str(path)
    packaged = packaged_path(model)
    return model if packaged is None else str(packaged)


def resolve_device(config: BenchConfig) -> str:
    """The inference device: ``auto`` is CUDA when present and ``cpu`` is off; CUDA must exist if asked for.

    A causal-LM bench times models in the train children, on their training device (the inference settings
    do not apply): CUDA when present and ``cpu`` is off.
    """
    import torch

    if config.task == "causal-lm":
        return "cuda" if torch.cuda.is_available() and not config.cpu else "cpu"
    if config.inference_device == "auto":
        return "cuda" if torch.cuda.is_available() and not config.cpu else "cpu"
    if config.inference_device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"inference_device is {config.inference_device} but CUDA is not available")
    return config.inference_device


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for package in ("aptune", "torch", "transformers", "accelerate", "peft", "matplotlib"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    from .. import __version__

    out["aptune"] = __version__  # the imported code, which may be a checkout rather than the installed one
    return out


def machine() -> dict[str, Any]:
    import torch

    facts: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "load_average_at_start": _load_average(),  # CPU timings mean little on a busy machine
    }
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
        facts["gpu_count"] = torch.cuda.device_count()
    return facts


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class _Display:
    """An overall tqdm bar over methods whose postfix is the running method's latest evaluation."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="aptune bench", unit="method", dynamic_ncols=True)

    def start(self, name: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"{name}: starting")

    def live(self, name: str) -> Callable[[str], None]:
        def on_line(line: str) -> None:
            parsed = parse_eval_line(line)
            if parsed is None:
                return
            step, val, density = parsed
            text = f"{name}: step {step}, validation {val:.4f}, density {density:.3f}"
            if self.bar is not None:
                self.bar.set_postfix_str(text)
            else:
                print(text, flush=True)

        return on_line

    def done(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str("", refresh=False)
            self.bar.write(text)
            self.bar.update(1)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_method(
    config: BenchConfig, name: str, model_path: str, device: str, on_line: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Train (unless resumed) and measure one method; returns its results entry (never raises for the child)."""
    folder = Path(config.output_dir) / name
    report_path, inference_path = folder / "report.json", folder / "inference.json"
    entry: dict[str, Any] = {
        "status": "failed",
        "report_path": str(report_path),
        "final_model": str(folder / "model"),
        "resumed": False,
    }
    if config.resume and report_path.is_file():
        entry["resumed"] = True
    else:
        for stale in (report_path, inference_path):
            stale.unlink(missing_ok=True)
        command = train_command(config, name, folder, model_path)
        child = run_child(command, folder, "train", on_line, env=child_env(config.mmap_threshold))
        entry.update(train_command=shlex.join(command), train_wall_time_s=child.wall_time_s)
        entry["train_logs"] = [child.stdout_log, child.stderr_log]
        if not child.ok or not report_path.is_file():
            entry.update(returncode=child.returncode, error=child.error or "no report.json written")
            return entry
    try:
        report = json.loads(report_path.read_text())
        task = report.get("task", "classification")
        if task != config.task:
            entry["error"] = f"{report_path} is a {task} run, not {config.task}"
            return entry
        entry.update(summarize_report(report), status="ok")
    except (OSError, ValueError, KeyError) as e:
        entry["error"] = f"unreadable {report_path}: {e}"
        return entry
    entry.setdefault("train_command", report.get("command"))
    if config.task != "causal-lm":  # classification and QA: a separate inference child times the model
        entry["inference"] = measure_inference(config, folder, inference_path, device, model_path)
    return entry


def measure_inference(
    config: BenchConfig, folder: Path, out_file: Path, device: str, reference: str | None = None
) -> dict[str, Any]:
    """The inference child's result, or {"error": ...}; an existing file is reused when resuming.

    With ``reference`` (the dense starting model) the child also gives ``vs_dense``: the trained model's
    speed-up over it, timed interleaved in the same process. A resumed file without it is measured again.
    """
    if config.resume and out_file.is_file():
        try:
            previous = json.loads(out_file.read_text())
            same = (previous.get("batch_size"), previous.get("length"), previous.get("dtype")) == (
                config.inference_batch_size,
                config.inference_length,
                config.inference_dtype,
            )
            compared_with = (previous.get("vs_dense") or {}).get("reference_path")
            compared = reference is None or compared_with == reference
            if same and compared and previous.get("device", "").startswith(device):
                return {**previous, "resumed": True}
        except (OSError, ValueError):
            pass
    command = inference_command(config, folder / "model", out_file, device, reference)
    child = run_child(command, folder, "inference", env=child_env(config.mmap_threshold))
    if not child.ok or not out_file.is_file():
        return {"error": child.error or "no inference.json written", "command": shlex.join(command)}
    return {**json.loads(out_file.read_text()), "command": shlex.join(command)}


def summary_line(name: str, entry: dict[str, Any]) -> str:
    if entry["status"] != "ok":
        last = (entry.get("error") or "").strip().splitlines() or ["unknown error"]
        return f"{name}: FAILED ({last[-1]})"
    if entry.get("validation_metric") == "perplexity":
        return lm_summary_line(name, entry)
    text = f"{name}: best validation {entry['best_validation']:.4f}"
    if entry.get("test_at_best") is not None:
        text += f", test {entry['test_at_best']:.4f}"
    text += f", density {entry['density']:.3f}, train {entry['train_time_s']:.1f} s"
    inference = entry.get("inference") or {}
    if "throughput" in inference:
        text += f", inference {inference['throughput']:.1f}/s"
        if "vs_dense" in inference:
            text += f" ({inference['vs_dense']['speedup']:.2f}x dense, interleaved)"
    elif "error" in inference:
        text += ", inference FAILED"
    return text + (" (resumed)" if entry.get("resumed") else "")


def lm_summary_line(name: str, entry: dict[str, Any]) -> str:
    """One line per finished causal-LM method: perplexities, multiple choice, density, time, speed-ups."""
    text = f"{name}: best validation perplexity {entry['best_validation']:.3f}"
    if entry.get("test_perplexity") is not None:
        text += f", held-out {entry['test_perplexity']:.3f}"
    for path, mc in (entry.get("multiple_choice") or {}).items():
        text += f", {Path(path).stem} acc {mc['acc']:.3f}/{mc['acc_norm']:.3f}"
    text += f", density {entry['density']:.3f}"
    if entry.get("train_time_per_epoch_s") is not None:
        text += f", train {entry['train_time_per_epoch_s']:.1f} s/epoch"
    speed = entry.get("inference") or {}
    for kind in ("prefill", "decode"):
        if (speed.get(kind) or {}).get("speedup") is not None:
            text += f", {kind} {speed[kind]['speedup']:.2f}x dense"
    return text + (" (resumed)" if entry.get("resumed") else "")


def run_bench(config: BenchConfig, command: str | None = None) -> dict[str, Any]:
    """Run every method of ``config`` and write the results; returns the results dictionary.

    ``command`` is the command line recorded in the results (default: this process's ``sys.argv``).
    """
    device = resolve_device(config)  # checked first: resolving the default model may install it
    model_path = resolve_model(config.model)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "command": command or shlex.join(sys.argv),
        "started_at": _now(),
        "finished": False,
        "seed": config.seed,
        "config": config.to_dict(),
        "task": config.task,
        "reference": config.reference_method,
        "model_path": model_path,
        "data_path": config.data_path(),
        "eval_mc_paths": list(config.eval_mc_paths()),
        "inference_device": device,
        "versions": versions(),
        "machine": machine(),
        "tta": None,
        "methods": {name: {"status": "pending"} for name in config.methods},
        "plots": [],
    }

    def save() -> None:
        if config.task == "causal-lm":
            info, results["methods"] = compare_lm(results["methods"], config.reference_method)
            results["comparison"] = info
        else:
            info, results["methods"] = compare(
                results["methods"], config.tta_fraction, config.reference_method
            )
            results["tta"] = info
        results["wall_time_s"] = time.perf_counter() - started
        write_json(out / RESULTS_JSON, results)
        (out / RESULTS_MD).write_text(markdown(results))

    save()
    display = _Display(len(config.methods), config.progress)
    try:
        for name in config.methods:
            display.start(name)
            results["methods"][name] = run_method(config, name, model_path, device, display.live(name))
            save()
            display.done(summary_line(name, results["methods"][name]))
    finally:
        display.close()
    results["plots"] = write_plots(results, out)
    results["finished"] = True
    results["finished_at"] = _now()
    results["load_average_at_end"] = _load_average()
    save()
    return results


def all_succeeded(results: dict[str, Any]) -> bool:
    return all(
        e.get("status") == "ok" and "error" not in (e.get("inference") or {})
        for e in results["methods"].values()
    )
