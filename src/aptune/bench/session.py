"""One benchmark run: train every method in its own process, measure inference, write results as it goes.

Layout of the output folder::

    results.json  results.md  validation_vs_time.png  apt_density_rank.png
    METHOD/report.json  METHOD/model/  METHOD/inference.json  METHOD/{train,inference}.std{out,err}.log

Each method's inference child also times the dense starting model (``model_path``), interleaved with the
trained one, so its speed-up over dense is a same-process, same-moment comparison.

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
from .metrics import compare, summarize_report
from .report import markdown, write_json, write_plots
from .runner import child_env, inference_command, parse_eval_line, run_child, train_command

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"


def resolve_model(model: str) -> str:
    """The model the children train: the packaged MiniLM folder for "" (installed once, here)."""
    if model:
        return str(Path(model).expanduser()) if Path(model).expanduser().exists() else model
    from ..assets import minilm_path

    return str(minilm_path())


def resolve_device(config: BenchConfig) -> str:
    """The inference device: ``auto`` is CUDA when present and ``cpu`` is off; CUDA must exist if asked for."""
    import torch

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
        entry.update(summarize_report(report), status="ok")
    except (OSError, ValueError, KeyError) as e:
        entry["error"] = f"unreadable {report_path}: {e}"
        return entry
    entry.setdefault("train_command", report.get("command"))
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
        "model_path": model_path,
        "inference_device": device,
        "versions": versions(),
        "machine": machine(),
        "tta": None,
        "methods": {name: {"status": "pending"} for name in config.methods},
        "plots": [],
    }

    def save() -> None:
        info, results["methods"] = compare(results["methods"], config.tta_fraction)
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
