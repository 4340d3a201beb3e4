"""Child processes: one ``aptune train`` per method and one inference measurement per trained model.

Each runs as ``sys.executable -m ...`` so memory figures of one method never include another's. The
inference child also times the dense starting model, interleaved with the trained one (``--reference``).
A causal-LM bench has no inference child: its train child times prefill and decoding against dense itself.
stdout is read line by line (for the live progress line) and kept in ``NAME.stdout.log``; stderr goes to
``NAME.stderr.log``, whose last lines become the error message when the child fails.
"""

from __future__ import annotations

import os
import re
import site
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import latest_checkpoint
from .config import BenchConfig
from .variants import variants

# `step 40: validation accuracy 0.8123, density 0.412` (the metric's name is absent in older versions)
EVAL_LINE = re.compile(r"step (\d+): validation (?:[A-Za-z_-]+ )?([-+0-9.eE]+), density ([-+0-9.eE]+)")
ERROR_LINES = 12


@dataclass
class ChildResult:
    command: list[str]
    returncode: int
    wall_time_s: float
    stdout_log: str
    stderr_log: str
    error: str | None  # the last lines of stderr when the child failed

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def parse_eval_line(line: str) -> tuple[int, float, float] | None:
    """(step, validation, density) from a ``step N: validation [METRIC] X, density Y`` line of ``aptune train``."""
    m = EVAL_LINE.search(line)
    return (int(m.group(1)), float(m.group(2)), float(m.group(3))) if m else None


def train_command(config: BenchConfig, name: str, output_dir: Path, model_path: str) -> list[str]:
    """The ``aptune train`` command of one variant; its own flags and then its extra flags come last so they win.

    A classification child skips its own speed measurement (the inference child times the model); a
    causal-LM child keeps it (prefill and decoding against dense) and also gets the evaluation settings.
    """
    cmd = [sys.executable, "-m", "aptune.cli", "train", "--output-dir", str(output_dir)]
    cmd += ["--task", config.task]
    if model_path:
        cmd += ["--model", model_path]
    data = config.data_path()
    for key, value in (("data", data), *((k, getattr(config, k)) for k in ("train", "validation", "test"))):
        if value is not None:
            cmd += [f"--{key}", str(value)]
    cmd += ["--epochs", repr(float(config.epochs))]
    if config.max_steps is not None:
        cmd += ["--max-steps", str(config.max_steps)]
    cmd += ["--batch-size", str(config.batch_size), "--max-length", str(config.max_length)]
    cmd += ["--evals-per-epoch", str(config.evals_per_epoch), "--seed", str(config.seed)]
    cmd += ["--target-density", repr(float(config.target_density))]
    cmd += ["--mixed-precision", config.mixed_precision]
    if config.cpu:
        cmd.append("--cpu")
    if config.task == "causal-lm":
        if config.eval_stride is not None:
            cmd += ["--eval-stride", str(config.eval_stride)]
        if config.eval_mc:
            cmd += ["--eval-mc", *config.eval_mc_paths()]
        if config.eval_limit is not None:
            cmd += ["--eval-limit", str(config.eval_limit)]
        cmd.append("--measure-speed")
    else:
        cmd.append("--no-measure-speed")
    cmd.append("--no-progress")
    if config.save_every is not None:
        cmd += ["--save-every", str(config.save_every)]
    if config.resume and latest_checkpoint(output_dir) is not None:
        cmd += ["--resume", "latest"]  # a half-finished method continues where it stopped
    # the variant's flags after the shared ones (a variant may set its own --target-density), then its extras
    return cmd + list(variants()[name]) + list(config.flags_for(name))


def inference_command(
    config: BenchConfig, model_dir: Path, out_file: Path, device: str, reference: str | None = None
) -> list[str]:
    """The inference child's command; with ``reference`` (the dense starting model) it also times that
    model, interleaved with the trained one, in the same process."""
    cmd = [
        sys.executable,
        "-m",
        "aptune.bench.inference",
        str(model_dir),
        *("--batch-size", str(config.inference_batch_size), "--length", str(config.inference_length)),
        *("--dtype", config.inference_dtype, "--device", device),
        *("--warmup", str(config.inference_warmup), "--runs", str(config.inference_runs)),
        *("--seed", str(config.seed), "--out", str(out_file)),
    ]
    return cmd + ["--reference", reference] if reference else cmd


def child_env(mmap_threshold: int | None = None) -> dict[str, str]:
    """The parent's environment, unbuffered, and able to import this very aptune (e.g. from a checkout).

    ``mmap_threshold`` sets glibc's ``MALLOC_MMAP_THRESHOLD_`` (see ``BenchConfig.mmap_threshold``).
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    import aptune

    root = str(Path(aptune.__file__).resolve().parent.parent)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    installed = {str(Path(p).resolve()) for p in site.getsitepackages() if p}
    if root not in paths and root not in installed:
        env["PYTHONPATH"] = os.pathsep.join([root, *paths])
    return env


def run_child(
    command: list[str],
    log_dir: Path,
    name: str,
    on_line: Callable[[str], None] | None = None,
    env: dict[str, str] | None = None,
) -> ChildResult:
    """Run ``command``, feeding each stdout line to ``on_line``; logs go to ``log_dir/NAME.std*.log``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    out_log, err_log = log_dir / f"{name}.stdout.log", log_dir / f"{name}.stderr.log"
    started = time.perf_counter()
    with (
        open(out_log, "w") as out,
        open(err_log, "w") as err,
        subprocess.Popen(  # leaving the block closes the pipe
            command, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1, env=env or child_env()
        ) as proc,
    ):
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                out.write(line)
                if on_line is not None:
                    on_line(line.rstrip("\n"))
            returncode = proc.wait()
        except BaseException:  # Ctrl-C or an error in on_line: do not leave the child running
            proc.kill()
            proc.wait()
            raise
    wall = time.perf_counter() - started
    error = None if returncode == 0 else (tail(err_log) or f"exited with status {returncode}")
    return ChildResult(command, returncode, wall, str(out_log), str(err_log), error)


def tail(path: Path, lines: int = ERROR_LINES) -> str:
    """The last non-empty lines of a text file (progress-bar carriage returns collapsed)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    kept = [line.rsplit("\r", 1)[-1].rstrip() for line in text.splitlines()]
    return "\n".join([line for line in kept if line.strip()][-lines:])
