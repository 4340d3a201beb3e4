"""What the benchmark writes: ``results.json``, ``results.md`` (a Markdown table) and PNG plots.

The table and plot functions read only the results dictionary, so they can be rerun on a saved
``results.json``. Plots need matplotlib (``pip install 'aptune[bench]'``); without it they are skipped.
A causal-LM bench (``results["task"] == "causal-lm"``) gets its own table (:func:`lm_markdown`).
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


def columns(results: Mapping[str, Any]) -> list[str]:
    """The classification table's header; "FT" names the reference when it is not full fine-tuning."""
    ref = (results.get("tta") or {}).get("reference") or "full"
    return [c.replace("vs FT", f"vs {ref}") if ref != "full" else c for c in COLUMNS]


def _ref_text(results: Mapping[str, Any]) -> str:
    ref = (results.get("tta") or {}).get("reference") or "full"
    return "full fine-tuning" if ref == "full" else f"`{ref}`"


def _data_text(config: Mapping[str, Any]) -> str:
    return config.get("data") or ", ".join(
        f"{k} {config[k]}" for k in ("train", "validation", "test") if config.get(k)
    )


def _metric_text(methods: Mapping[str, Mapping[str, Any]]) -> str:
    """ ", validation and test metric: f1 (test exact match in results.json)" when it is not accuracy."""
    metric = next((e.get("validation_metric") for e in methods.values() if e.get("validation_metric")), None)
    if metric in (None, "accuracy"):
        return ""
    extra = " (test exact match in results.json)" if metric == "f1" else ""
    return f"; validation and test metric: {metric}{extra}"


def _schedule(config: Mapping[str, Any]) -> str:
    return f"{config['max_steps']} steps" if config.get("max_steps") else f"{config['epochs']:g} epochs"


def _failures(methods: Mapping[str, Mapping[str, Any]]) -> list[str]:
    failures = [(n, e) for n, e in methods.items() if e.get("status") == "failed"]
    failures += [
        (n, {"error": e["inference"]["error"]})
        for n, e in methods.items()
        if e.get("status") == "ok" and "error" in (e.get("inference") or {})
    ]
    if not failures:
        return []
    lines = ["", "Failures:", ""]
    for name, entry in failures:
        last = (entry.get("error") or "").strip().splitlines() or ["unknown error"]
        lines.append(f"- `{name}`: {last[-1]}")
    return lines


def markdown(results: Mapping[str, Any]) -> str:
    """``results.md``: the settings, the table, how TTA and memory were measured, and any failures."""
    if results.get("task") == "causal-lm":
        return lm_markdown(results)
    config = results["config"]
    tta = results.get("tta") or {}
    methods = results["methods"]
    data, schedule = _data_text(config), _schedule(config)
    lines = [
        "# aptune bench",
        "",
        f"Model `{results.get('model_path') or config.get('model') or 'all-MiniLM-L6-v2'}`, data `{data}`, "
        f"seed {config['seed']}, {schedule}, batch {config['batch_size']}, max length {config['max_length']}, "
        f"{config['evals_per_epoch']} evaluations per epoch, target density {config['target_density']}"
        f"{_metric_text(methods)}.",
        "",
        "| " + " | ".join(columns(results)) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
        *("| " + " | ".join(row) + " |" for row in table_rows(results)),
        "",
    ]
    if tta.get("threshold") is not None:
        lines.append(
            f"TTA threshold: validation >= {tta['fraction']:g} x {_ref_text(results)}'s best "
            f"({tta['reference_best_validation']:.4f}) = {tta['threshold']:.4f}; TTA is the cumulative "
            "training time (evaluation excluded) at the first evaluation reaching it at the method's final "
            f"density (within {tta['final_density_tolerance']})."
        )
    else:
        lines.append(
            f"TTA threshold: {tta.get('fraction', 0.97):g} x {_ref_text(results)}'s best validation; "
            f"no successful `{tta.get('reference', 'full')}` run here, so no TTA."
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
    lines += _failures(methods)
    lines += ["", f"Command: `{results.get('command', '')}`", ""]
    return "\n".join(lines)


# -- the causal-LM table ----------------------------------------------------------------------------------


def mc_files(results: Mapping[str, Any]) -> list[str]:
    """The multiple-choice files any successful method was scored on, in order of first appearance."""
    files: list[str] = []
    for entry in results["methods"].values():
        if entry.get("status") == "ok":
            for name in entry.get("multiple_choice") or {}:
                if name not in files:
                    files.append(name)
    return files


def mc_label(path: str) -> str:
    return Path(path).stem


def lm_columns(results: Mapping[str, Any]) -> list[str]:
    """The causal-LM table's header: one acc / acc_norm column per multiple-choice file."""
    ref = results.get("reference") or "lora"
    return [
        "method",
        "density",
        "best val ppl",
        "held-out ppl",
        f"ppl vs {ref}",
        *(f"{mc_label(f)} acc / acc_norm" for f in mc_files(results)),
        "train s/epoch",
        "train tok/s",
        "train peak mem (MiB)",
        f"mem vs {ref}",
        "steps peak mem (MiB)",
        f"steps mem vs {ref}",
        "prefill tok/s (dense → final)",
        "prefill speed-up",
        "decode tok/s (dense → final)",
        "decode speed-up",
        "trainable params (max)",
    ]


def _tokens_cell(speed: Mapping[str, Any] | None) -> str:
    tps = (speed or {}).get("tokens_per_s") or {}
    if tps.get("dense") is None or tps.get("final") is None:
        return DASH
    return f"{tps['dense']:.0f} → {tps['final']:.0f}"


def lm_table_row(name: str, entry: Mapping[str, Any], files: list[str], width: int) -> list[str]:
    """One causal-LM table row (as cells); ``files`` are the multiple-choice columns."""
    if entry.get("status") != "ok":
        return [name, entry.get("status") or "pending", *[DASH] * (width - 2)]
    speed = entry.get("inference") or {}
    mc = entry.get("multiple_choice") or {}
    return [
        name,
        _num(entry.get("density"), ".3f"),
        _num(entry.get("best_validation"), ".3f"),
        _num(entry.get("test_perplexity"), ".3f"),
        _num(entry.get("perplexity_vs_ref"), ".3f", "x"),
        *(f"{mc[f]['acc']:.3f} / {mc[f]['acc_norm']:.3f}" if f in mc else DASH for f in files),
        _num(entry.get("train_time_per_epoch_s"), ".1f"),
        _num(entry.get("train_tokens_per_s"), ".0f"),
        _num(entry.get("train_peak_memory_mb"), ".0f"),
        _num(entry.get("peak_memory_vs_ref"), ".2f", "x"),
        _num(entry.get("steps_peak_memory_mb"), ".0f"),
        _num(entry.get("steps_memory_vs_ref"), ".2f", "x"),
        _tokens_cell(speed.get("prefill")),
        vs_dense_cell(speed.get("prefill")),
        _tokens_cell(speed.get("decode")),
        vs_dense_cell(speed.get("decode")),
        _num(entry.get("trainable_params_max"), ","),
    ]


def lm_table_rows(results: Mapping[str, Any]) -> list[list[str]]:
    files, width = mc_files(results), len(lm_columns(results))
    return [lm_table_row(name, entry, files, width) for name, entry in results["methods"].items()]


def _first(methods: Mapping[str, Mapping[str, Any]], key: str) -> Any:
    """The first successful method's value of ``key`` (settings every method shares)."""
    return next(
        (e[key] for e in methods.values() if e.get("status") == "ok" and e.get(key) is not None), None
    )


def lm_markdown(results: Mapping[str, Any]) -> str:
    """The causal-LM ``results.md``: settings, the table and how each column was measured."""
    config = results["config"]
    methods = results["methods"]
    ref = results.get("reference") or "lora"
    columns = lm_columns(results)
    lines = [
        "# aptune bench (causal LM)",
        "",
        f"Model `{results.get('model_path') or config.get('model')}`, data `{_data_text(config)}`, "
        f"seed {config['seed']}, {_schedule(config)}, batch {config['batch_size']}, max length "
        f"{config['max_length']}, {config['evals_per_epoch']} evaluations per epoch, target density "
        f"{config['target_density']}.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
        *("| " + " | ".join(row) + " |" for row in lm_table_rows(results)),
        "",
    ]
    window, stride = _first(methods, "perplexity_window"), _first(methods, "perplexity_stride")
    if window is not None:
        lines.append(
            f"Held-out ppl: token-weighted perplexity of the test split with sliding windows of {window} tokens "
            f"advancing by {stride} (each token scored once, after at least {window - stride} tokens of context "
            "once past a document's first window). Best val ppl: perplexity of the validation split's packed "
            f"blocks at the checkpoint it selected. Ratios are to `{ref}` (lower is better)."
        )
    else:
        lines.append("Best val ppl: perplexity of the validation split's packed blocks; no held-out split.")
    files = mc_files(results)
    if files:
        sizes = {mc_label(f): _first_mc_n(methods, f) for f in files}
        lines.append(
            "Multiple choice: acc picks the choice with the highest log-likelihood given the question, "
            "acc_norm the highest log-likelihood per character (as lm-evaluation-harness); ties count as "
            f"wrong. Rows: {', '.join(f'{k} {v}' for k, v in sizes.items())}."
        )
    per_epoch, steps = _first(methods, "steps_per_epoch"), _first(methods, "steps")
    text = (
        "Train s/epoch: the one-time setup (building the method: APT's calibration and one-shot pruning) "
        "plus the step time scaled to steps_per_epoch steps, evaluation excluded"
    )
    if per_epoch and steps and steps < per_epoch:
        text += f"; the runs took {steps} of an epoch's {per_epoch} steps, so it is extrapolated"
    lines.append(text + ".")
    lines.append(
        "Train tok/s: the real (non-padding) tokens of every training batch per second of training steps "
        "(setup and evaluation excluded)."
    )
    kinds = sorted({e["train_peak_memory_kind"] for e in methods.values() if e.get("train_peak_memory_kind")})
    if kinds:
        lines.append(
            f"Train peak memory: {', '.join(kinds)} of the train child from loading to the last step; steps "
            "peak memory: the same during the training steps alone (after loading and setup: APT's calibration "
            "and one-shot pruning, LLM-Pruner's importance pass)."
        )
    prefill = _first(methods, "inference")
    if prefill and prefill.get("prefill"):
        p, d = prefill["prefill"], prefill.get("decode") or {}
        lines.append(
            f"Speed, timed in each train child against the dense starting model, alternately (dense, final, "
            f"dense, ...) on {results.get('inference_device', 'the training device')}: prefill is one forward "
            f"pass at batch {p.get('batch_size')} x {p.get('length')} tokens, decode {d.get('new_tokens')} "
            f"greedy new tokens at batch {d.get('batch_size')} after a {d.get('prompt_length')}-token prompt. "
            "Tokens/s are each model's median; the speed-up is the median of the per-pair ratios, with their "
            "interquartile range."
        )
    lines.append("Time to accuracy: n/a (the metric is a perplexity, evaluated once or twice per run).")
    if config.get("mmap_threshold") is not None:
        lines.append(
            f"Children ran with MALLOC_MMAP_THRESHOLD_={config['mmap_threshold']}: CPU peak RSS follows live "
            "tensors, and CPU times are slower than in a default run (compare them only within this run)."
        )
    lines += _failures(methods)
    lines += ["", f"Command: `{results.get('command', '')}`", ""]
    return "\n".join(lines)


def _first_mc_n(methods: Mapping[str, Mapping[str, Any]], path: str) -> Any:
    for entry in methods.values():
        mc = (entry.get("multiple_choice") or {}).get(path) if entry.get("status") == "ok" else None
        if mc:
            return mc.get("n")
    return "?"


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
    metric = next((e.get("validation_metric") for _, e in _ok(results) if e.get("validation_metric")), None)
    ax.set_ylabel(f"validation {metric}" if metric else "validation metric")
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
