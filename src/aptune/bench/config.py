"""BenchConfig: the settings of one ``aptune bench`` run, validated on construction, and the presets.

Values come from, lowest priority first: the dataclass defaults, a preset (:data:`PRESETS`), a config file
(JSON or YAML, keys are the field names) and command-line flags. ``method_args`` and ``train_args`` are
``aptune train`` flags; per-method flags from several sources are concatenated, so a later source overrides
single flags of an earlier one (argparse keeps the last value of a repeated flag) and keeps the others.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..memory import MAX_MMAP_THRESHOLD
from .variants import REFERENCES, base_method, default_methods, variants

TASKS = ("classification", "causal-lm", "qa")  # the tasks the bench has a report for (aptune.tasks)
LM_ONLY = ("eval_stride", "eval_mc", "eval_limit")  # settings that only a causal-LM bench uses

# Preset values, in one place so they are easy to tune. Explicit flags and config-file keys override them.
PRESETS: dict[str, dict[str, Any]] = {
    # MiniLM on rt-polarity with a short schedule, meant to finish within 30 minutes on 2 CPU cores. Measured
    # per-step times there (40-step runs): full 0.84 s, LoRA 0.59 s, APT 0.36 s, LoRAPrune 0.48 s; one epoch
    # is 268 steps and one validation pass about 8 s. lora-prune trains LoRA for one epoch, prunes (Fisher and
    # rescaling on 8 batches), then retrains for one epoch.
    "cpu-small": {
        "model": "",  # the packaged all-MiniLM-L6-v2
        "data": "rt-polarity",
        "epochs": 1.0,
        "batch_size": 32,
        "max_length": 64,
        "evals_per_epoch": 4,
        "target_density": 0.4,
        "cpu": True,
        "inference_batch_size": 32,
        "inference_length": 64,
        "inference_dtype": "float32",
        "inference_device": "cpu",
        "method_args": {
            "full": "--learning-rate 5e-5",
            "lora": "--learning-rate 5e-4",
            "apt": "--learning-rate 1e-3",  # also apt-nodistill: flags of a base method apply to its variants
            "lora-prune": "--calibration-batches 8",
            "llm-pruner": "--calibration-batches 8",
        },
    },
    # The full schedule on one GPU; inference at the APT paper's batch and length, in bf16.
    "gpu": {
        "model": "",
        "data": "rt-polarity",
        "epochs": 6.0,
        "batch_size": 32,
        "max_length": 64,
        "evals_per_epoch": 2,
        "target_density": 0.4,
        "inference_batch_size": 512,
        "inference_length": 128,
        "inference_dtype": "bfloat16",
        "inference_device": "cuda",
        "method_args": {
            "full": "--learning-rate 5e-5",
            "lora": "--learning-rate 5e-4",
            "apt": "--learning-rate 1e-3",
        },
    },
    # MiniLM on SQuAD v1.1 (shared/data/squad: 8,510 / 812 / 1,243 questions, 9,674 training windows of at most
    # 256 tokens with a 128-token stride) at density 0.4 and 0.6 against full fine-tuning, on 2 CPU cores. One epoch
    # is 303 steps; measured there (benchmarks/results/bench-cpu-qa): full fine-tuning about 5 s a step, APT about
    # 2 s once pruned, the whole preset about 2.5 hours.
    "cpu-qa": {
        "task": "qa",
        "model": "",
        "data": "squad",
        "methods": ["full", "apt", "apt-density-0.6"],
        "epochs": 2.0,
        "batch_size": 32,
        "max_length": 256,
        "evals_per_epoch": 4,
        "target_density": 0.4,
        "cpu": True,
        "inference_batch_size": 32,
        "inference_length": 256,
        "inference_dtype": "float32",
        "inference_device": "cpu",
        "method_args": {
            "full": "--learning-rate 1e-4",
            "apt": "--learning-rate 1e-3",
        },
    },
    # The packaged SmolLM2-135M-Instruct on the Brown corpus (shared/data/brown: 450/25/25 documents) at
    # density 0.7, on the CPU, for a fixed number of steps (an epoch is about 2300 steps of 4 x 128 tokens).
    # Evaluation is the expensive part (sliding-window perplexity of the test split, 200 multiple-choice
    # rows, prefill and decode timing against dense), so validation runs once at the end. Children run with
    # a 1 MiB mmap threshold so the training peak RSS follows live tensors (and training is slower).
    "cpu-lm": {
        "task": "causal-lm",
        "model": "smollm2",
        "data": "brown",  # found as rt-polarity is: $APTUNE_SHARED_DATA, then shared/data near the checkout
        # shapes named explicitly: the decoder default is uniform (issue 12's measurement)
        "methods": ["lora", "apt-per-layer", "apt-uniform", "llm-pruner-per-layer"],
        "epochs": 1.0,
        "max_steps": 100,
        "batch_size": 4,
        "max_length": 128,
        "evals_per_epoch": 1,
        "target_density": 0.7,
        "cpu": True,
        "eval_stride": 64,
        "eval_mc": ["mc/wikihow_goal.jsonl"],  # a path, or one relative to the shared data folder
        "eval_limit": 200,
        "mmap_threshold": 2**20,
        "method_args": {
            "lora": "--lora-targets q v gate",  # as in the APT paper's LLaMA LoRA baseline
        },
    },
    # Issue 15's causal-LM measurement on one GPU: SmolLM2-135M, APT pruned once to 0.7 before tuning (the
    # decoder recipe, uniform shape) against dense LoRA, batch 8 x 512, bf16 weights with fp32 adapters. The
    # numbers it is for: CUDA max-allocated memory of the training steps and training tokens/s; held-out
    # perplexity and prefill/decode speed against dense come with them.
    "gpu-lm": {
        "task": "causal-lm",
        "model": "smollm2",
        "data": "brown",
        "methods": ["lora", "apt-uniform"],
        "epochs": 1.0,
        "max_steps": 200,
        "batch_size": 8,
        "max_length": 512,
        "evals_per_epoch": 1,
        "target_density": 0.7,
        "eval_stride": 256,
        "mixed_precision": "bf16",
        "train_args": ["--dtype", "bfloat16"],
        "method_args": {
            "lora": "--lora-targets q v gate",  # as in the APT paper's LLaMA LoRA baseline
        },
    },
}

INFERENCE_DTYPES = ("float32", "bfloat16", "float16")


def parse_flags(value: Any, what: str) -> tuple[str, ...]:
    """``aptune train`` flags from a shell-quoted string or a list of strings."""
    if value is None:
        return ()
    if isinstance(value, str):
        try:
            return tuple(shlex.split(value))
        except ValueError as e:
            raise ConfigError(f"cannot parse {what} {value!r}: {e}") from None
    if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float)) for v in value):
        return tuple(str(v) for v in value)
    raise ConfigError(f"{what} must be a string of flags or a list of strings, got {value!r}")


def parse_method_args(items: Any, what: str = "method_args") -> dict[str, tuple[str, ...]]:
    """Per-method flags from a mapping {name: flags} or from ``NAME=FLAGS`` strings (the CLI form)."""
    if items is None:
        return {}
    if isinstance(items, Mapping):
        pairs = list(items.items())
    elif isinstance(items, (list, tuple)):
        pairs = []
        for item in items:
            name, sep, flags = str(item).partition("=")
            if not sep or not name.strip():
                raise ConfigError(
                    f'{what} must look like NAME=FLAGS (e.g. full="--learning-rate 5e-5"), got {item!r}'
                )
            pairs.append((name.strip(), flags))
    else:
        raise ConfigError(f"{what} must map method names to flags, got {items!r}")
    out: dict[str, tuple[str, ...]] = {}
    for name, flags in pairs:
        out[str(name)] = out.get(str(name), ()) + parse_flags(flags, f"{what} for {name}")
    return out


def merge_method_args(*sources: Mapping[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    """Concatenate per-method flags, earlier sources first (so later single flags win in argparse)."""
    out: dict[str, tuple[str, ...]] = {}
    for source in sources:
        for name, flags in source.items():
            out[name] = out.get(name, ()) + tuple(flags)
    return out


def _parse_methods(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"methods must be a list of names, got {value!r}")
    return tuple(name.strip() for item in value for name in str(item).split(",") if name.strip())


def _parse_paths(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{what} must be a list of file paths, got {value!r}")
    return tuple(value)


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def find_shared(name: str) -> Path | None:
    """``name`` when that path exists, else ``NAME`` inside the first shared data folder that holds it (the
    folders rt-polarity is looked for in: ``$APTUNE_SHARED_DATA``, then ``shared/data`` next to the checkout
    or the working directory); None when neither exists."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    if path.is_absolute() or name.startswith((".", "~")):
        return None
    from ..data.rt_polarity import shared_data_candidates

    for folder in shared_data_candidates():
        if (folder / name).exists():
            return folder / name
    return None


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark: methods to compare and everything they share. Field names are the config-file keys."""

    methods: tuple[str, ...] = field(default_factory=default_methods)
    task: str = "classification"  # or causal-lm; passed to every `aptune train` child as --task
    # the variant ratios are taken against; default per task: full (classification), lora (causal-lm)
    reference: str | None = None
    model: str = ""  # a model folder or hub name; "" (or "minilm") the packaged all-MiniLM-L6-v2, "smollm2"
    # the packaged SmolLM2-135M-Instruct
    data: str | None = None  # a data set name ("rt-polarity"), a folder of split files, a folder's name in
    # the shared data folder ("brown"), or a hub name
    train: str | None = None
    validation: str | None = None
    test: str | None = None
    output_dir: str = "runs/bench"
    epochs: float = 3.0
    max_steps: int | None = None
    batch_size: int = 32
    max_length: int = 64
    evals_per_epoch: int = 2
    seed: int = 0
    target_density: float = 0.4
    mixed_precision: str = "no"
    cpu: bool = False
    train_args: tuple[str, ...] = ()  # extra `aptune train` flags for every method
    method_args: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # name -> extra flags
    # causal LM only: held-out perplexity stride (default: max_length / 2), multiple-choice files (paths, or
    # relative to the shared data folder) and the rows scored per file (default: all)
    eval_stride: int | None = None
    eval_mc: tuple[str, ...] = ()
    eval_limit: int | None = None
    # classification only: the inference child (a causal LM is timed by its train child, see docs/bench.md)
    inference_batch_size: int = 128
    inference_length: int = 128
    inference_dtype: str = "float32"
    inference_device: str = "auto"  # auto: CUDA when present and `cpu` is off, else CPU
    inference_warmup: int = 3
    inference_runs: int = 10
    tta_fraction: float = 0.97  # TTA threshold: this fraction of full fine-tuning's best validation
    # glibc's MALLOC_MMAP_THRESHOLD_ for the children (bytes): tensors at least this large get their own
    # mapping, returned on free, so a CPU child's peak RSS follows its live tensors instead of heap
    # fragmentation; it slows CPU training (page faults), so times from such a run are not comparable
    mmap_threshold: int | None = None
    save_every: int | None = None  # training children write a resumable checkpoint every N steps
    resume: bool = False  # skip methods whose report.json exists; continue one that has checkpoints
    progress: bool = True
    preset: str | None = None  # recorded in results; its values are applied by build_config

    def __post_init__(self) -> None:
        if self.preset is not None and self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; choose from {', '.join(PRESETS)}")
        set_ = object.__setattr__
        set_(self, "methods", _parse_methods(self.methods))
        set_(self, "train_args", parse_flags(self.train_args, "train_args"))
        margs = self.method_args
        if not (isinstance(margs, Mapping) and all(isinstance(v, tuple) for v in margs.values())):
            margs = parse_method_args(margs)
        set_(self, "method_args", dict(margs))
        set_(self, "eval_mc", _parse_paths(self.eval_mc, "eval_mc"))
        self._check_types()
        self._check_task()
        self._check_methods()
        self._check_numbers()
        self._check_inputs()

    def _check_types(self) -> None:
        """Config files can hold anything: wrong types get a clear message rather than a TypeError later."""
        for f in fields(self):
            value, kind = getattr(self, f.name), str(f.type)
            if value is None and "None" in kind:
                continue
            if kind.startswith("int"):
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif kind.startswith("float"):
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
                if ok:
                    object.__setattr__(self, f.name, float(value))
            elif kind.startswith("bool"):
                ok = isinstance(value, bool)
            elif kind.startswith("str"):
                ok = isinstance(value, str)
            else:
                continue
            if not ok:
                raise ConfigError(f"{f.name} must be {kind.split(' ')[0]}, got {value!r}")

    def _check_task(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"unknown task {self.task!r}; choose from {', '.join(TASKS)}")
        if self.task != "causal-lm":
            given = [name for name in LM_ONLY if getattr(self, name) not in (None, ())]
            if given:
                raise ConfigError(f"{', '.join(given)} only apply to --task causal-lm")

    @property
    def reference_method(self) -> str:
        """The variant ratios are taken against: ``reference``, or the task's default."""
        return self.reference or REFERENCES[self.task]

    def _check_methods(self) -> None:
        known = variants()
        if not self.methods:
            raise ConfigError("no methods to run")
        for name in self.methods:
            if name not in known:
                raise ConfigError(f"unknown method {name!r}; choose from {', '.join(known)}")
        dup = sorted({m for m in self.methods if self.methods.count(m) > 1})
        if dup:
            raise ConfigError(f"methods listed twice: {', '.join(dup)}")
        for name in self.method_args:
            if name not in known:
                raise ConfigError(f"method_args for unknown method {name!r}; choose from {', '.join(known)}")
        if self.reference is not None and self.reference not in known:
            raise ConfigError(f"unknown reference method {self.reference!r}; choose from {', '.join(known)}")

    def _check_numbers(self) -> None:
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.epochs <= 0 and not self.max_steps:
            raise ConfigError(f"epochs must be > 0, got {self.epochs}")
        for name in (
            "batch_size",
            "max_length",
            "evals_per_epoch",
            "inference_batch_size",
            "inference_length",
            "inference_runs",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.mmap_threshold is not None and not 0 <= self.mmap_threshold <= MAX_MMAP_THRESHOLD:
            raise ConfigError(
                f"mmap_threshold must be between 0 and {MAX_MMAP_THRESHOLD} bytes (glibc's limit), "
                f"got {self.mmap_threshold}"
            )
        if self.save_every is not None and self.save_every < 1:
            raise ConfigError(f"save_every must be >= 1, got {self.save_every}")
        for name in ("eval_stride", "eval_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if self.eval_stride is not None and self.eval_stride > self.max_length:
            raise ConfigError(
                f"eval_stride must be <= max_length ({self.max_length}), got {self.eval_stride}"
            )
        if self.inference_warmup < 0:
            raise ConfigError(f"inference_warmup must be >= 0, got {self.inference_warmup}")
        if not 0 < self.target_density <= 1:
            raise ConfigError(f"target_density must be in (0, 1], got {self.target_density}")
        if not 0 < self.tta_fraction <= 1:
            raise ConfigError(f"tta_fraction must be in (0, 1], got {self.tta_fraction}")
        if self.mixed_precision not in ("no", "bf16"):
            raise ConfigError(f"mixed_precision must be 'no' or 'bf16', got {self.mixed_precision!r}")
        if self.inference_dtype not in INFERENCE_DTYPES:
            raise ConfigError(
                f"inference_dtype must be one of {', '.join(INFERENCE_DTYPES)}, got {self.inference_dtype!r}"
            )
        device = self.inference_device
        if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
            raise ConfigError(f"inference_device must be auto, cpu, cuda or cuda:N, got {device!r}")

    def _check_inputs(self) -> None:
        if self.model:
            path = Path(self.model).expanduser()
            if path.exists():
                if not (path / "config.json").is_file():
                    raise ConfigError(f"{self.model} holds no model (no config.json)")
            elif _looks_like_path(self.model):
                raise ConfigError(f"model folder does not exist: {self.model}")
        if self.data is None and self.train is None:
            raise ConfigError(
                "pass --data NAME_OR_FOLDER, or --train FILE with --validation FILE (or a --preset)"
            )
        if (
            self.data is not None
            and _looks_like_path(self.data)
            and not Path(self.data).expanduser().exists()
        ):
            raise ConfigError(f"data folder does not exist: {self.data}")
        for name in ("train", "validation", "test"):
            value = getattr(self, name)
            if value is not None and not Path(value).expanduser().is_file():
                raise ConfigError(f"{name} file not found: {value}")
        self.eval_mc_paths()  # a missing multiple-choice file fails here

    def data_path(self) -> str | None:
        """``data`` as the children get it: an existing path or ``rt-polarity`` as given; a name found in the
        shared data folder (``brown``) as that folder's path; anything else as given (a hub name)."""
        if self.data is None or self.data == "rt-polarity" or Path(self.data).expanduser().exists():
            return self.data
        found = find_shared(self.data)
        return str(found.resolve()) if found is not None else self.data

    def eval_mc_paths(self) -> tuple[str, ...]:
        """The multiple-choice files, each an existing path or found in the shared data folder."""
        paths = []
        for name in self.eval_mc:
            found = find_shared(name)
            if found is None or not found.is_file():
                raise ConfigError(
                    f"multiple-choice file not found: {name} (not a file, nor in a shared data folder)"
                )
            paths.append(str(found.resolve()))
        return tuple(paths)

    def flags_for(self, name: str) -> tuple[str, ...]:
        """Extra ``aptune train`` flags of one variant: those of its base method, then its own."""
        base = base_method(name, variants()[name])
        own = self.method_args.get(name, ()) if name != base else ()
        return (*self.train_args, *self.method_args.get(base, ()), *own)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["methods"] = list(self.methods)
        d["train_args"] = list(self.train_args)
        d["method_args"] = {k: list(v) for k, v in self.method_args.items()}
        d["eval_mc"] = list(self.eval_mc)
        return d


FIELDS = tuple(f.name for f in fields(BenchConfig))


def build_config(
    preset: str | None = None,
    file_values: Mapping[str, Any] | None = None,
    flag_values: Mapping[str, Any] | None = None,
) -> BenchConfig:
    """A BenchConfig from a preset, then config-file values, then flags (each overriding the one before)."""
    file_values = dict(file_values or {})
    flag_values = dict(flag_values or {})
    preset = preset if preset is not None else file_values.pop("preset", None)
    file_values.pop("preset", None)
    flag_values.pop("preset", None)
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    for where, values in (("config file", file_values), ("flags", flag_values)):
        unknown = sorted(set(values) - set(FIELDS))
        if unknown:
            raise ConfigError(f"unknown {where} keys: {', '.join(unknown)}")
    layers = [dict(PRESETS[preset]) if preset else {}, file_values, flag_values]
    method_args = merge_method_args(
        *(parse_method_args(layer.pop("method_args", None), "method_args") for layer in layers)
    )
    values: dict[str, Any] = {}
    for layer in layers:
        values.update(layer)
    return BenchConfig(**values, method_args=method_args, preset=preset)
