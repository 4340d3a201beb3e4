"""Pure functions over ``report.json`` contents: per-method summaries, time to accuracy, comparisons.

Time to accuracy (TTA) of a method is the cumulative training time (``train_time_s``, evaluation excluded)
at its first evaluation whose validation metric reaches ``fraction`` x the best validation of full
fine-tuning, counting only evaluations taken at the method's final density (history density <= final density
+ :data:`FINAL_DENSITY_TOLERANCE`). Time spent before that (e.g. the LoRA phase before pruning) still counts,
since the clock is cumulative. TTA is None when the threshold is never reached or full fine-tuning did not run.

A causal-LM bench has no TTA (its metric is a perplexity, evaluated once or twice per run): it compares
held-out perplexity and training peak memory with the reference variant (dense LoRA by default), see
:func:`compare_lm`, and takes prefill and decoding speed-ups over dense from each train child's report.
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
    """The numbers the benchmark keeps from one ``report.json`` (plus the curves it plots); for a
    causal-LM report also those of :func:`summarize_lm_report`."""
    metrics = report.get("metrics", {})
    history = list(report.get("history") or [])
    trainable = [h["trainable_params"] for h in history if h.get("trainable_params") is not None]
    after = report.get("params_after") or {}
    summary = {
        "density": report["density"],
        "best_validation": metrics.get("best_validation"),
        "best_step": metrics.get("best_step"),
        "test_at_best": metrics.get("test_at_best"),
        "train_time_s": report.get("train_time_s"),
        "eval_time_s": report.get("eval_time_s"),
        "steps": report.get("steps"),
        "train_peak_memory_mb": report.get("peak_memory_mb"),
        "train_peak_memory_kind": report.get("peak_memory_kind"),
        # the training steps alone, after loading and setup (APT's calibration and one-shot pruning)
        "steps_peak_memory_mb": (report.get("peak_memory_phases_mb") or {}).get("training_steps"),
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
    if report.get("task") == "causal-lm":
        summary.update(summarize_lm_report(report))
    if report.get("task") == "qa":  # test_at_best is the F1; exact match too
        summary["test_exact_match"] = metrics.get("test_exact_match")
    summary["validation_metric"] = metrics.get("validation_metric")
    return summary


def train_time_per_epoch(report: Mapping[str, Any]) -> float | None:
    """The training time of one epoch, extrapolated when the run trained a fraction of one: the one-time
    setup (``setup_time_s``: building the method, which may calibrate and prune once) counted once, plus
    the step time scaled to ``steps_per_epoch`` steps."""
    time, steps, per_epoch = report.get("train_time_s"), report.get("steps"), report.get("steps_per_epoch")
    if time is None or not steps or not per_epoch:
        return None
    setup = float(report.get("setup_time_s") or 0.0)
    return setup + (float(time) - setup) / (steps / per_epoch)


def _speed(comparison: Mapping[str, Any] | None, tokens_per_s: Mapping[str, Any] | None) -> dict[str, Any]:
    """One speed comparison of a causal-LM report (prefill or decode) in the bench's form."""
    if not comparison:
        return {}
    final = comparison.get("final") or {}
    return {
        "batch_size": final.get("batch_size"),
        "length": final.get("length"),
        "tokens_per_s": dict(tokens_per_s or {}),
        "speedup": comparison.get("speedup"),
        "spread": comparison.get("speedup_spread"),
        "runs": comparison.get("runs"),
    }


def summarize_lm_report(report: Mapping[str, Any]) -> dict[str, Any]:
    """The causal-LM numbers of one ``report.json``: held-out perplexity (sliding windows) and its window and
    stride, multiple-choice results per file, training time per epoch, and the prefill and decoding
    comparisons against dense that the train child timed (``inference``)."""
    metrics = report.get("metrics", {})
    detail = metrics.get("test_perplexity_detail") or {}
    inference = report.get("inference") or {}
    speed: dict[str, Any] = {}
    if inference:
        speed = {
            "source": "train child",
            "prefill": _speed(inference, inference.get("prefill_tokens_per_s")),
            "decode": _speed(inference.get("decode"), inference.get("decode_tokens_per_s")),
        }
        speed["decode"]["new_tokens"] = (inference.get("decode") or {}).get("new_tokens")
        speed["decode"]["prompt_length"] = speed["decode"].pop("length", None)
    return {
        "validation_metric": metrics.get("validation_metric"),
        "test_perplexity": metrics.get("test_perplexity"),
        "perplexity_window": detail.get("window"),
        "perplexity_stride": detail.get("stride"),
        "perplexity_tokens": detail.get("tokens"),
        "test_perplexity_blocks": metrics.get("test_perplexity_blocks"),
        "multiple_choice": {
            name: {k: v for k, v in r.items() if k in ("acc", "acc_norm", "n", "ties", "ties_norm", "nan")}
            for name, r in (metrics.get("multiple_choice") or {}).items()
        },
        "steps_per_epoch": report.get("steps_per_epoch"),
        "epochs_trained": (
            report["steps"] / report["steps_per_epoch"]
            if report.get("steps") and report.get("steps_per_epoch")
            else None
        ),
        "setup_time_s": report.get("setup_time_s"),
        "train_time_per_epoch_s": train_time_per_epoch(report),
        "train_tokens_per_s": report.get("train_tokens_per_s"),
        "inference": speed,
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


LM_RATIOS = (  # (entry key, the key of its ratio to the reference)
    ("test_perplexity", "perplexity_vs_ref"),
    ("best_validation", "best_validation_vs_ref"),
    ("train_peak_memory_mb", "peak_memory_vs_ref"),
    ("steps_peak_memory_mb", "steps_memory_vs_ref"),
    ("train_time_per_epoch_s", "train_time_per_epoch_vs_ref"),
)


def compare_lm(
    methods: Mapping[str, Mapping[str, Any]], reference: str
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Ratios of every successful causal-LM method to ``reference`` (e.g. dense LoRA).

    Returns (reference info, new per-method dicts with the ratio keys of :data:`LM_RATIOS`, None where a
    number is missing or the reference did not run). TTA does not apply (``tta_s`` is None). The inputs are
    left unchanged.
    """
    ref = methods.get(reference)
    ref_ok = ref is not None and ref.get("status") == "ok"
    out: dict[str, dict[str, Any]] = {}
    for name, entry in methods.items():
        entry = dict(entry)
        if entry.get("status") == "ok":
            for key, ratio_key in LM_RATIOS:
                entry[ratio_key] = ratio(entry.get(key), ref.get(key)) if ref_ok else None
            entry["tta_s"] = None
        out[name] = entry
    return {"reference": reference, "reference_ok": ref_ok}, out


def _throughput(entry: Mapping[str, Any]) -> float | None:
    inference = entry.get("inference") or {}
    return inference.get("throughput")
