"""Pure functions over ``report.json`` contents: per-method summaries, time to accuracy, comparisons.

Time to accuracy (TTA) of a method is the cumulative training time (``train_time_s``, evaluation excluded)
at its first evaluation whose validation metric reaches ``fraction`` x the best validation of full
fine-tuning, counting only evaluations taken at the method's final density (history density <= final density
+ :data:`FINAL_DENSITY_TOLERANCE`). Time spent before that (e.g. the LoRA phase before pruning) still counts,
since the clock is cumulative. TTA is None when the threshold is never reached or full fine-tuning did not run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .variants import REFERENCE

FINAL_DENSITY_TOLERANCE = 0.002


def tta_threshold(reference_best: float | None, fraction: float) -> float | None:
    """The validation value a method must reach: ``fraction`` x the reference's best, or None without one."""
    if reference_best is None:
        return None
    return fraction * reference_best


def first_reaching(
    history: Sequence[Mapping[str, Any]],
    final_density: float,
    threshold: float | None,
    tolerance: float = FINAL_DENSITY_TOLERANCE,
) -> Mapping[str, Any] | None:
    """The first evaluation at the final density whose validation is >= ``threshold`` (None if none)."""
    if threshold is None:
        return None
    for entry in history:
        if entry["density"] <= final_density + tolerance and entry["validation"] >= threshold:
            return entry
    return None


def time_to_accuracy(
    history: Sequence[Mapping[str, Any]],
    final_density: float,
    threshold: float | None,
    tolerance: float = FINAL_DENSITY_TOLERANCE,
) -> float | None:
    """Cumulative training seconds at :func:`first_reaching`, or None."""
    entry = first_reaching(history, final_density, threshold, tolerance)
    return None if entry is None else float(entry["train_time_s"])


def ratio(value: float | None, reference: float | None) -> float | None:
    """value / reference, or None when either is missing or the reference is not positive."""
    if value is None or reference is None or reference <= 0:
        return None
    return value / reference


def summarize_report(report: Mapping[str, Any]) -> dict[str, Any]:
    """The numbers the benchmark keeps from one ``report.json`` (plus the curves it plots)."""
    metrics = report.get("metrics", {})
    history = list(report.get("history") or [])
    trainable = [h["trainable_params"] for h in history if h.get("trainable_params") is not None]
    after = report.get("params_after") or {}
    return {
        "density": report["density"],
        "best_validation": metrics.get("best_validation"),
        "best_step": metrics.get("best_step"),
        "test_at_best": metrics.get("test_at_best"),
        "train_time_s": report.get("train_time_s"),
        "eval_time_s": report.get("eval_time_s"),
        "steps": report.get("steps"),
        "train_peak_memory_mb": report.get("peak_memory_mb"),
        "train_peak_memory_kind": report.get("peak_memory_kind"),
        "trainable_params_max": max(trainable) if trainable else None,
        "params_total_after": after.get("total"),
        "params_prunable_after": after.get("prunable"),
        "history": [
            {k: h.get(k) for k in ("step", "train_time_s", "validation", "density", "trainable_params")}
            for h in history
        ],
        "apt_history": [
            {
                "step": h["step"],
                "density": h["density"],
                "total_rank": sum(h.get("ranks") or []),
                "adapter_params": h.get("adapter_params"),
            }
            for h in report.get("apt_history") or []
        ],
    }


def compare(
    methods: Mapping[str, Mapping[str, Any]], fraction: float, reference: str = REFERENCE
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """TTA and ratios to the reference for every successful method.

    Returns (tta settings, new per-method dicts with ``tta_s``, ``tta_step``, ``tta_vs_full`` and
    ``speedup_vs_full`` set). The inputs are left unchanged.
    """
    ref = methods.get(reference)
    ref_ok = ref is not None and ref.get("status") == "ok"
    ref_best = ref.get("best_validation") if ref_ok else None
    threshold = tta_threshold(ref_best, fraction)
    out: dict[str, dict[str, Any]] = {}
    for name, entry in methods.items():
        entry = dict(entry)
        if entry.get("status") == "ok":
            hit = first_reaching(entry.get("history", []), entry["density"], threshold)
            entry["tta_s"] = None if hit is None else float(hit["train_time_s"])
            entry["tta_step"] = None if hit is None else hit["step"]
        out[name] = entry
    ref_out = out.get(reference, {}) if ref_ok else {}
    ref_speed = _throughput(ref_out)
    for entry in out.values():
        if entry.get("status") == "ok":
            entry["tta_vs_full"] = ratio(entry["tta_s"], ref_out.get("tta_s"))
            entry["speedup_vs_full"] = ratio(_throughput(entry), ref_speed)
    info = {
        "reference": reference,
        "fraction": fraction,
        "reference_best_validation": ref_best,
        "threshold": threshold,
        "final_density_tolerance": FINAL_DENSITY_TOLERANCE,
    }
    return info, out


def _throughput(entry: Mapping[str, Any]) -> float | None:
    inference = entry.get("inference") or {}
    return inference.get("throughput")
