"""``aptune bench``: compare training methods side by side on one model and one task.

    aptune bench --preset cpu-small --output-dir runs/bench
    aptune bench --preset cpu-lm --output-dir runs/bench-lm      # SmolLM2-135M on Brown, causal LM
    aptune bench --model runs/base --data my_task/ --methods full apt apt-nodistill \\
        --method-args full="--learning-rate 5e-5" --method-args apt="--learning-rate 1e-3 --initial-rank 16"

Per-method flags (``--method-args NAME=FLAGS``, repeatable) are ``aptune train`` flags; those given for a
method also apply to its variants (``apt`` to ``apt-distill`` and ``apt-nodistill``). ``--train-args=FLAGS`` applies to every
method. ``--config FILE`` (JSON or YAML) sets the same keys as the flags, with ``method_args`` a mapping of
method name to a flag string; precedence is preset < config file < flags.

The subcommand is added to the main CLI with :func:`add_bench_parser`; ``python -m aptune.bench`` runs it
standalone. Exit status: 0 when every method trained and was measured, 1 when some failed (their errors are
in the results), 2 for bad input (one line, before any child starts).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from ..config import ConfigError
from .config import INFERENCE_DTYPES, PRESETS, TASKS

S = argparse.SUPPRESS

# dest, flags, type, help  (every default is SUPPRESS: only given flags override a preset or config file)
_VALUE_FLAGS: tuple[tuple[str, tuple[str, ...], Any, str], ...] = (
    (
        "task",
        ("--task",),
        str,
        f"{' or '.join(TASKS)}, passed to every `aptune train` child (default: classification)",
    ),
    (
        "reference",
        ("--reference",),
        str,
        "the method ratios are taken against (default: full for classification, lora for causal-lm)",
    ),
    (
        "model",
        ("--model",),
        str,
        "model folder or hub name; minilm or smollm2 for a packaged model (default: minilm)",
    ),
    (
        "data",
        ("--data",),
        str,
        "data set name (rt-polarity), folder of split files, folder name in shared/data (brown), or hub dataset",
    ),
    ("train", ("--train",), str, "training split file"),
    ("validation", ("--validation",), str, "validation split file"),
    ("test", ("--test",), str, "test split file"),
    ("output_dir", ("--output-dir", "--output"), str, "output folder (default: runs/bench)"),
    ("epochs", ("--epochs",), float, "training epochs (default: 3)"),
    ("max_steps", ("--max-steps",), int, "stop after this many optimizer steps"),
    ("batch_size", ("--batch-size",), int, "training batch size (default: 32)"),
    ("max_length", ("--max-length",), int, "maximum tokens per example (default: 64)"),
    ("evals_per_epoch", ("--evals-per-epoch",), int, "validation evaluations per epoch (default: 2)"),
    ("seed", ("--seed",), int, "random seed shared by all methods (default: 0)"),
    (
        "target_density",
        ("--target-density", "--density"),
        float,
        "density pruning methods aim at (default: 0.4)",
    ),
    ("mixed_precision", ("--mixed-precision",), str, "training precision: no or bf16 (default: no)"),
    (
        "train_args",
        ("--train-args",),
        str,
        "extra `aptune train` flags for every method, e.g. --train-args='--warmup-ratio 0.1'",
    ),
    (
        "eval_stride",
        ("--eval-stride",),
        int,
        "causal LM: held-out perplexity window stride (default: max length / 2)",
    ),
    ("eval_limit", ("--eval-limit",), int, "causal LM: rows scored per multiple-choice file (default: all)"),
    ("inference_batch_size", ("--inference-batch-size",), int, "inference batch size (default: 128)"),
    ("inference_length", ("--inference-length",), int, "inference sequence length (default: 128)"),
    (
        "inference_dtype",
        ("--inference-dtype",),
        str,
        f"inference dtype: {', '.join(INFERENCE_DTYPES)} (default: float32)",
    ),
    ("inference_device", ("--inference-device",), str, "auto, cpu, cuda or cuda:N (default: auto)"),
    ("inference_warmup", ("--inference-warmup",), int, "untimed warm-up passes (default: 3)"),
    ("inference_runs", ("--inference-runs",), int, "timed passes; the median is reported (default: 10)"),
    (
        "tta_fraction",
        ("--tta-fraction",),
        float,
        "TTA threshold as a fraction of full FT's best validation (default: 0.97)",
    ),
    (
        "mmap_threshold",
        ("--mmap-threshold",),
        int,
        "set glibc's MALLOC_MMAP_THRESHOLD_ (bytes) in the children, instead of the 4 MiB that aptune train "
        "fixes on the CPU: 131072 makes CPU peak RSS follow live tensors, but CPU training runs slower (a memory "
        "run, not a timing run)",
    ),
    (
        "save_every",
        ("--save-every",),
        int,
        "each training child writes a resumable checkpoint every N steps; with --resume a half-finished "
        "method continues from its newest one",
    ),
)


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default=None, help=f"start from a preset: {', '.join(PRESETS)}")
    parser.add_argument("--config", default=None, help="JSON or YAML file of bench keys (flags win)")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=S,
        metavar="NAME",
        help="variants to run, in order (default: full lora lora-prune loraprune llm-pruner apt apt-distill, "
        "or the preset's)",
    )
    parser.add_argument(
        "--method-args",
        action="append",
        default=S,
        metavar="NAME=FLAGS",
        help='extra `aptune train` flags for one method, e.g. full="--learning-rate 5e-5" (repeatable)',
    )
    for dest, names, kind, text in _VALUE_FLAGS:
        parser.add_argument(*names, dest=dest, type=kind, default=S, help=text)
    parser.add_argument(
        "--eval-mc",
        nargs="+",
        default=S,
        metavar="FILE",
        help="causal LM: multiple-choice files (question/choices/answer) scored at the end; a path, or one "
        "relative to the shared data folder (mc/wikihow_goal.jsonl)",
    )
    for dest, text in (
        ("cpu", "train on CPU even when a GPU is present"),
        (
            "resume",
            "skip methods whose report.json already exists in the output folder; continue a half-finished one "
            "from its newest checkpoint",
        ),
        ("progress", "show the progress bar (default: on)"),
    ):
        parser.add_argument(
            f"--{dest}", dest=dest, action=argparse.BooleanOptionalAction, default=S, help=text
        )
    parser.add_argument("--list-methods", action="store_true", help="list the runnable methods and exit")


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to the main CLI's subparsers."""
    text = "run several methods on one model and task side by side; writes results.json, results.md, plots"
    parser = subparsers.add_parser("bench", help=text, description=text)
    add_bench_arguments(parser)
    parser.set_defaults(func=bench_command)
    return parser


def config_from_args(args: argparse.Namespace):
    """The BenchConfig the parsed flags describe (raises ConfigError for bad input)."""
    from .config import build_config, parse_method_args

    file_values: dict[str, Any] = {}
    if args.config:
        from ..cli import read_config_file

        file_values = read_config_file(args.config)
    skip = {"command", "func", "config", "preset", "list_methods"}
    flags = {k: v for k, v in vars(args).items() if k not in skip}
    if "method_args" in flags:
        flags["method_args"] = parse_method_args(flags["method_args"], "--method-args")
    return build_config(args.preset, file_values, flags)


def bench_command(args: argparse.Namespace, command: str | None = None) -> int:
    """The ``aptune bench`` handler. Bad input raises ConfigError before any child process starts.

    ``command`` is the command line to record (default: ``sys.argv``).
    """
    if args.list_methods:
        from .variants import variants

        registry = variants()
        width = max(map(len, registry)) + 2
        for name, flags in registry.items():
            print(f"{name:{width}}aptune train {' '.join(flags)}")
        return 0
    config = config_from_args(args)
    from .session import RESULTS_JSON, RESULTS_MD, all_succeeded, run_bench

    results = run_bench(config, command)
    from .report import markdown

    print(markdown(results))
    files = [RESULTS_JSON, RESULTS_MD, *results["plots"]]
    print(f"wrote {', '.join(f'{config.output_dir}/{f}' for f in files)}")
    return 0 if all_succeeded(results) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m aptune.bench``: the subcommand without the main CLI."""
    from ..assets import AssetError

    parser = argparse.ArgumentParser(prog="aptune bench", description=__doc__.split("\n\n")[0])
    add_bench_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    command = shlex.join([sys.executable, "-m", "aptune.bench", *argv])
    try:
        return bench_command(args, command)
    except (ConfigError, AssetError, ValueError, FileNotFoundError) as e:
        print(f"aptune bench: error: {e}", file=sys.stderr)
        return 2
