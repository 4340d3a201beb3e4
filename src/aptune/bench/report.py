"""What the benchmark writes: ``results.json``, ``results.md`` (a Markdown table) and PNG plots.

The table and plot functions read only the results dictionary, so they can be rerun on a saved
``results.json``. Plots need matplotlib (``pip install 'aptune[bench]'``); without it they are skipped.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

COLUMNS = (
    "method",
    "density",
    "best val",
    "test",
    "TTA (s)",
    "TTA vs FT",
    "train peak mem (MiB)",
    "inference (seq/s)",
    "speed-up vs FT",
    "speed-up vs dense",
    "inference mem (MiB)",
    "trainable params (max)",
)

VALIDATION_PLOT = "validation_vs_time.png"
APT_PLOT = "apt_density_rank.png"

DASH = "–"


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write atomically: a crash never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _num(value: float | None, fmt: str, suffix: str = "") -> str:
    return DASH if value is None else f"{value:{fmt}}{suffix}"


def table_row(name: str, entry: Mapping[str, Any]) -> list[str]:
    """One Markdown table row (as cells) for a method's results entry."""
    status = entry.get("status")
    if status != "ok":
        return [name, status or "pending", *[DASH] * (len(COLUMNS) - 2)]
    inference = entry.get("inference") or {}
    return [
        name,
        _num(entry.get("density"), ".3f"),
        _num(entry.get("best_validation"), ".4f"),
        _num(entry.get("test_at_best"), ".4f"),
        _num(entry.get("tta_s"), ".1f"),
        _num(entry.get("tta_vs_full"), ".2f", "x"),
        _num(entry.get("train_peak_memory_mb"), ".0f"),
        _num(inference.get("throughput"), ".1f") if "error" not in inference else "failed",
        _num(entry.get("speedup_vs_full"), ".2f", "x"),
        vs_dense_cell(inference.get("vs_dense")),
        _num(inference.get("peak_memory_mb"), ".1f"),
        _num(entry.get("trainable_params_max"), ","),
    ]


def vs_dense_cell(vs_dense: Mapping[str, Any] | None) -> str:
    """``2.45x (IQR 2.40-2.50)``: the median per-pair speed-up over dense and its interquartile range."""
    if not vs_dense or vs_dense.get("speedup") is None:
        return DASH
    spread = vs_dense.get("spread") or {}
    if spread.get("q1") is None or spread.get("q3") is None:
        return f"{vs_dense['speedup']:.2f}x"
    return f"{vs_dense['speedup']:.2f}x (IQR {spread['q1']:.2f}-{spread['q3']:.2f})"


def table_rows(results: Mapping[str, Any]) -> list[list[str]]:
    return [table_row(name, entry) for name, entry in results["methods"].items()]


def markdown(results: Mapping[str, Any]) -> str:
    """``results.md``: the settings, the table, how TTA and memory were measured, and any failures."""
    config = results["config"]
    tta = results.get("tta") or {}
    methods = results["methods"]
    data = config.get("data") or ", ".join(
        f"{k} {config[k]}" for k in ("train", "validation", "test") if config.get(k)
    )
    schedule = f"{config['max_steps']} steps" if config.get("max_steps") else f"{config['epochs']:g} epochs"
    lines = [
        "# aptune bench",
        "",
        f"Model `{results.get('model_path') or config.get('model') or 'all-MiniLM-L6-v2'}`, data `{data}`, "
        f"seed {config['seed']}, {schedule}, batch {config['batch_size']}, max length {config['max_length']}, "
        f"{config['evals_per_epoch']} evaluations per epoch, target density {config['target_density']}.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
        *("| " + " | ".join(row) + " |" for row in table_rows(results)),
        "",
    ]
    if tta.get("threshold") is not None:
        lines.append(
            f"TTA threshold: validation >= {tta['fraction']:g} x full fine-tuning's best "
            f"({tta['reference_best_validation']:.4f}) = {tta['threshold']:.4f}; TTA is the cumulative "
            "training time (evaluation excluded) at the first evaluation reaching it at the method's final "
            f"density (within {tta['final_density_tolerance']})."
        )
    else:
        lines.append(
            f"TTA threshold: {tta.get('fraction', 0.97):g} x full fine-tuning's best validation; "
            "no successful `full` run here, so no TTA."
        )
    inference = next(
        (e["inference"] for e in methods.values() if "peak_memory_kind" in (e.get("inference") or {})), None
    )
    if inference is not None:
        kind = {
            "cuda_max_allocated": "CUDA max allocated during the timed runs (weights included)",
            "rss_peak_minus_after_load": "peak RSS during inference minus RSS after loading (weights excluded)",
        }.get(inference["peak_memory_kind"], inference["peak_memory_kind"])
        lines.append(
            f"Inference: batch {inference['batch_size']} x length {inference['length']}, {inference['dtype']} "
            f"on {inference['device']}, median of {inference.get('runs', '?')} runs after warm-up, in a "
            f"separate process; memory is {kind}."
        )
        if any("vs_dense" in (e.get("inference") or {}) for e in methods.values()):
            lines.append(
                "Speed-up vs dense: the same child also times the dense starting model, alternating with the "
                "method's model run by run after warm-up of both; the median of the per-pair throughput "
                "ratios, with their interquartile range (min and max in results.json)."
            )
    train_kinds = sorted(
        {e["train_peak_memory_kind"] for e in methods.values() if e.get("train_peak_memory_kind")}
    )
    if train_kinds:
        lines.append(
            f"Training peak memory: {', '.join(train_kinds)}. Trainable params: the maximum over evaluations."
        )
    if config.get("mmap_threshold") is not None:
        lines.append(
            f"Children ran with MALLOC_MMAP_THRESHOLD_={config['mmap_threshold']}: CPU peak RSS follows live "
            "tensors, and CPU times are slower than in a default run (compare them only within this run)."
        )
    failures = [(n, e) for n, e in methods.items() if e.get("status") == "failed"]
    failures += [
        (n, {"error": e["inference"]["error"]})
        for n, e in methods.items()
        if e.get("status") == "ok" and "error" in (e.get("inference") or {})
    ]
    if failures:
        lines += ["", "Failures:", ""]
        for name, entry in failures:
            last = (entry.get("error") or "").strip().splitlines() or ["unknown error"]
            lines.append(f"- `{name}`: {last[-1]}")
    lines += ["", f"Command: `{results.get('command', '')}`", ""]
    return "\n".join(lines)


def write_plots(results: Mapping[str, Any], folder: Path) -> list[str]:
    """Write the PNG plots that have data; returns their file names. Skips with a warning without matplotlib."""
    try:
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError:
        print(
            "aptune bench: warning: matplotlib is not installed, skipping plots (pip install 'aptune[bench]')",
            file=sys.stderr,
        )
        return []
    written = []
    if plot_validation_vs_time(results, folder / VALIDATION_PLOT):
        written.append(VALIDATION_PLOT)
    if plot_apt_density_rank(results, folder / APT_PLOT):
        written.append(APT_PLOT)
    return written


def _ok(results: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    return [(n, e) for n, e in results["methods"].items() if e.get("status") == "ok"]


def plot_validation_vs_time(results: Mapping[str, Any], path: Path) -> bool:
    """Validation against cumulative training time, one line per method; the TTA threshold dashed."""
    from matplotlib.figure import Figure

    curves = [(n, e["history"]) for n, e in _ok(results) if e.get("history")]
    if not curves:
        return False
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for name, history in curves:
        ax.plot(
            [h["train_time_s"] for h in history],
            [h["validation"] for h in history],
            marker="o",
            ms=3,
            label=name,
        )
    threshold = (results.get("tta") or {}).get("threshold")
    if threshold is not None:
        ax.axhline(threshold, color="grey", linestyle="--", linewidth=1, label="TTA threshold")
    ax.set_xlabel("cumulative training time (s, evaluation excluded)")
    ax.set_ylabel("validation metric")
    ax.set_title("Validation vs training time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)
    return True


def plot_apt_density_rank(results: Mapping[str, Any], path: Path) -> bool:
    """Density and total adapter rank against step for every method with an APT pruning history."""
    from matplotlib.figure import Figure

    curves = [(n, e["apt_history"]) for n, e in _ok(results) if e.get("apt_history")]
    if not curves:
        return False
    fig = Figure(figsize=(7, 6), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    for name, history in curves:
        steps = [h["step"] for h in history]
        top.plot(steps, [h["density"] for h in history], marker="o", ms=3, label=name)
        bottom.plot(steps, [h["total_rank"] for h in history], marker="o", ms=3, label=name)
    target = results["config"].get("target_density")
    if target is not None:
        top.axhline(target, color="grey", linestyle="--", linewidth=1, label="target density")
    top.set_ylabel("density (prunable params)")
    top.set_title("APT: density and adapter rank at each pruning checkpoint")
    bottom.set_ylabel("total adapter rank (sum of ranks)")
    bottom.set_xlabel("training step")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)
    return True
