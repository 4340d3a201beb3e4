"""``aptune bench``: several training methods on one model and one task, side by side.

Each method trains in its own process (``aptune train``), its final model is timed in another, and the
results go to ``results.json``, ``results.md`` and PNG plots in the output folder. See :mod:`.cli` for the
flags, :mod:`.metrics` for how time to accuracy is defined, :mod:`.inference` for inference memory.
With ``task="causal-lm"`` (the ``cpu-lm`` preset) the train children also time prefill and decoding
against the dense model and score held-out perplexity and multiple choice; no inference child runs.

    from aptune.bench import BenchConfig, run_bench
    results = run_bench(BenchConfig(methods=("full", "apt"), data="rt-polarity", output_dir="runs/b"))
"""

from __future__ import annotations

from typing import Any

from .config import PRESETS, BenchConfig, build_config
from .variants import DEFAULT_METHODS, EXTRA_VARIANTS, variants


def run_bench(config: BenchConfig, command: str | None = None) -> dict[str, Any]:
    """Run the benchmark and write its results (see :func:`aptune.bench.session.run_bench`)."""
    from .session import run_bench as _run

    return _run(config, command)


__all__ = [
    "DEFAULT_METHODS",
    "EXTRA_VARIANTS",
    "PRESETS",
    "BenchConfig",
    "build_config",
    "run_bench",
    "variants",
]
