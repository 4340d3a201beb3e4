"""The training entry point: fine-tune (and, with a pruning method, prune) a model for a task (a classifier or
a causal LM, :mod:`aptune.tasks`), evaluate, keep the best, export.

    report = aptune.train(TrainConfig(model="path/or/name", data="rt-polarity", output_dir="runs/x"), APTConfig())

The loop is plain PyTorch on Accelerate's device and mixed-precision handling. It only calls the method
object (:mod:`aptune.methods`: APT, full fine-tuning, LoRA or a pruning baseline) and owns the learning-rate
schedule, so rebuilding the optimizer after a structural change never resets it (a method may ask for a fresh
schedule at a phase boundary, e.g. retraining after pruning). At the end the best validation checkpoint taken
once the structure is final is restored, the method merges its adapters and removes pruned blocks, and the
model is saved to ``OUTPUT/model`` (readable by :func:`aptune.load_pruned`), and ``OUTPUT/report.json``
records metrics, density, parameters, time, memory and the settings.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed
from .arch import describe
from .budget import param_report
from .checkpoint import (
    atomic_folder,
    atomic_write_text,
    load_checkpoint,
    load_optimizer_state,
    read_state,
    resolve_resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .compact import load_state_strictly, save_pruned, shape_and_ranks
from .config import ADAPTER_ROLES, APTConfig, ConfigError
from .memory import (
    DEFAULT_CPU_MMAP_THRESHOLD,
    MAX_MMAP_THRESHOLD,
    peak_memory_mb,
    reset_peak_memory,
    set_mmap_threshold,
)
from .methods import BaselineConfig, build_method, check_supported, lr_factor, method_info, method_names
from .sharding import check_sharded, full_state_dict, load_full_state_dict, local_numel, shard_model
from .tasks import TaskData
from .tasks.classification import compare_speed, load_classifier  # noqa: F401  (re-exported: aptune.train API)
from .tasks.lm_loss import use_chunked_loss, use_model_loss

WEIGHT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
METHODS = method_names()  # the registered methods (aptune.methods.register adds more)


@dataclass(frozen=True)
class TrainConfig:
    """Everything about a run except the APT knobs. CLI flags mirror these fields."""

    model: str = ""  # a folder, a hub name, or a packaged model: "" / "minilm", "smollm2", "gemma3-270m"
    task: str | None = (
        None  # classification | causal-lm | qa | seq2seq; default: inferred from the data and the model
    )
    data: str | None = None  # a data set name ("rt-polarity"), a folder of split files, or a hub name
    train: str | None = (
        None  # a training file (.jsonl, .json, .csv, .tsv, .parquet; .txt for a causal LM), instead of --data
    )
    validation: str | None = None  # a validation file, with --train
    test: str | None = None  # a test file, with --train: scored once at the end
    # default: detected (text, sentence, premise+hypothesis, ...); for a causal LM, the one column of plain text
    text_fields: tuple[str, ...] | None = None
    label_field: str = "label"  # classification: the column of labels
    tokenizer: str | None = None  # defaults to the model folder
    output_dir: str = "runs/aptune"  # OUTPUT/model (the final model), OUTPUT/report.json, checkpoints
    method: str = "apt"  # apt | full | lora | lora-prune | loraprune | llm-pruner (see aptune.methods)
    lora_rank: int = 8  # the baselines' LoRA rank (alpha = 2 x rank)
    # the baselines' LoRA roles; default per method (q, v; all projections for loraprune, whose importance needs
    # an adapter on each)
    lora_targets: tuple[str, ...] | None = None
    epochs: float = 3.0  # passes over the training data (fractions allowed)
    max_steps: int | None = None  # stop after this many optimizer steps (the schedules follow it)
    batch_size: int = 32  # rows per micro-batch
    eval_batch_size: int = 128  # rows per evaluation batch
    max_length: int = 64  # tokens per row (a causal LM: per packed block)
    learning_rate: float | None = None  # default per method: apt 1e-3, full 5e-5, LoRA-based 5e-4
    weight_decay: float = 0.01  # AdamW's
    warmup_ratio: float = 0.06  # share of the steps with a linearly rising learning rate
    max_grad_norm: float = 1.0  # gradient clipping (0: none)
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step (APT decides once per step)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, more time
    # causal LM: the training loss without the vocabulary-sized logits (aptune.tasks.lm_loss; the same loss,
    # computed a chunk of tokens at a time)
    chunked_lm_loss: bool = True
    evals_per_epoch: int = 2  # validations per epoch (the final model takes the best one's trained weights)
    max_target_length: int = (
        128  # seq2seq: target tokens kept in training, new tokens generated in evaluation
    )
    source_prefix: str = ""  # seq2seq: put before every source text (T5's "summarize: ")
    doc_stride: int = 128  # extractive QA: context tokens shared by consecutive windows of a long context
    eval_stride: int | None = None  # causal LM: held-out perplexity stride (default max_length / 2)
    eval_mc: tuple[str, ...] = ()  # causal LM: multiple-choice files scored at the end
    eval_limit: int | None = None  # causal LM: rows per multiple-choice file (default: all)
    seed: int = 0  # data order, initialisation and dropout
    mixed_precision: str = "no"  # "no" or "bf16"
    dtype: str = (
        "float32"  # the frozen weights' dtype: float32 | bfloat16 (half the memory; implies bf16 compute)
    )
    cpu: bool = False  # force CPU even when a GPU is present
    fsdp: bool = False  # shard the frozen weights over the processes (FSDP2; apt and lora)
    # CPU runs: glibc's mmap threshold in bytes, fixed so that freed activations go back to the system
    # (aptune.memory.set_mmap_threshold); 0 leaves glibc's own moving threshold. MALLOC_MMAP_THRESHOLD_ in the
    # environment wins.
    cpu_mmap_threshold: int = DEFAULT_CPU_MMAP_THRESHOLD
    measure_speed: bool = True  # time dense vs final model at inference after training
    progress: bool = True  # a progress bar while training
    save_every: int | None = None  # write a resumable checkpoint every N optimizer steps
    keep_checkpoints: int = 2  # how many of the newest checkpoints to keep (the newest is never deleted)
    resume: str | None = None  # "latest" (the newest checkpoint in output_dir), a checkpoint or a run folder

    def __post_init__(self) -> None:
        method_info(self.method)  # unknown names fail here
        if self.mixed_precision not in ("no", "bf16"):
            raise ConfigError(f"mixed_precision must be 'no' or 'bf16', got {self.mixed_precision!r}")
        if self.dtype not in WEIGHT_DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {self.dtype!r}")
        if self.dtype != "float32":
            if self.method == "full":
                raise ConfigError(
                    f"full fine-tuning trains every weight: with dtype {self.dtype} its master weights would be "
                    "bf16 and small updates lost; use --dtype float32 (--mixed-precision bf16 still computes in bf16)"
                )
            object.__setattr__(self, "mixed_precision", "bf16")  # bf16 weights compute in bf16 (autocast)
        if self.epochs <= 0 and not self.max_steps:
            raise ConfigError(f"epochs must be > 0, got {self.epochs}")
        if self.task is not None:
            from .tasks import get_task

            get_task(self.task)  # unknown names fail here
        for name in (
            "batch_size",
            "eval_batch_size",
            "max_length",
            "max_target_length",
            "evals_per_epoch",
            "gradient_accumulation_steps",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.doc_stride < 0:
            raise ConfigError(f"doc_stride must be >= 0, got {self.doc_stride}")
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.save_every is not None and self.save_every < 1:
            raise ConfigError(f"save_every must be >= 1, got {self.save_every}")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.lora_rank < 1:
            raise ConfigError(f"lora_rank must be >= 1, got {self.lora_rank}")
        bad = [r for r in self.lora_targets or () if r not in ADAPTER_ROLES]
        if bad:
            raise ConfigError(f"unknown LoRA targets {bad}; choose from {', '.join(ADAPTER_ROLES)}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.cpu_mmap_threshold <= MAX_MMAP_THRESHOLD:
            raise ConfigError(
                f"cpu_mmap_threshold must be between 0 (glibc's own) and {MAX_MMAP_THRESHOLD} bytes, "
                f"got {self.cpu_mmap_threshold}"
            )

    @property
    def lr(self) -> float:
        return self.learning_rate if self.learning_rate is not None else method_info(self.method).default_lr

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- loading --------------------------------------------------------------------------------------------


PACKAGED_MODELS = ("minilm", "smollm2", "gemma3-270m")  # models that ship as PyPI packages (aptune.assets)


def _resolve_model_path(name: str) -> str:
    """A model folder or hub name; "" or "minilm" is the packaged all-MiniLM-L6-v2, "smollm2" the packaged
    SmolLM2-135M-Instruct, "gemma3-270m" the packaged gemma-3-270m (both converted from GGUF files once)."""
    if not name or name in PACKAGED_MODELS:
        from .assets import packaged_path

        return str(packaged_path(name))
    path = Path(name)
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} holds no model (no config.json)")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"model path does not exist: {name}")
    return name  # a hub name: works with network access


def load_tokenizer(source: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"no tokenizer found at {source!r} ({type(e).__name__}); pass --tokenizer PATH"
        ) from None


def resolve_task(config: TrainConfig, model_path: str):
    """The task of this run: ``config.task``, or inferred from the data and the model."""
    from .tasks import get_task, infer_task

    name = config.task or infer_task(config.data, config.train, model_path, config.label_field)
    return get_task(name)


# -- the run ---------------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """Everything checked and loaded before the first step, so bad input fails fast."""

    model: nn.Module
    tokenizer: Any
    loaders: dict[str, Any]
    model_path: str
    task: Any = None  # the run's :class:`aptune.tasks.Task`
    data: Any = None  # its :class:`aptune.tasks.TaskData`


def prepare(config: TrainConfig) -> Prepared:
    """Resolve the task, load and check the data, the tokenizer and the model (the model's family last:
    an unsupported one fails before any training)."""
    from accelerate.utils import set_seed

    from .arch import get_spec

    set_seed(config.seed)  # a task head the model lacks is initialised now: from the run's seed

    model_path = _resolve_model_path(config.model)
    task = resolve_task(config, model_path)
    tokenizer = load_tokenizer(config.tokenizer or model_path)
    data = task.load_data(config, tokenizer)
    if _receives_weights(config):
        # a sharded run: process 0 alone reads the weights; the others build the model empty once it has
        # loaded (train(), _empty_copy_of_process_0) and receive their shards from it
        return Prepared(None, tokenizer, data.loaders, model_path, task, data)
    model = load_model(task, model_path, data, config)
    check_supported(config.method, get_spec(model).family)
    if config.gradient_checkpointing:
        set_activation_checkpointing(model, True)
    return Prepared(model, tokenizer, data.loaders, model_path, task, data)


def load_model(task: Any, path: str, data: Any, config: TrainConfig) -> nn.Module:
    """The task's model with its weights in ``config.dtype``; the layers the task adds (a new classifier) stay
    fp32 whatever that dtype, like the adapters: they train, and bf16 master weights would lose small updates."""
    from .arch import describe

    model = task.load_model(path, data, WEIGHT_DTYPES[config.dtype])
    if config.dtype != "float32":
        for module in describe(model).new_heads.values():
            module.float()
    return model


def sharded_launch(config: TrainConfig) -> bool:
    """``--fsdp``, or a launch with Accelerate's FSDP (``accelerate launch --use_fsdp``)."""
    return config.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")


def _receives_weights(config: TrainConfig) -> bool:
    """A sharded run's process other than 0: it never reads the weights, process 0 sends it its shards."""
    return sharded_launch(config) and os.environ.get("RANK", "0") != "0"


def _empty_copy_of_process_0(model: nn.Module | None, config: TrainConfig) -> nn.Module:
    """Process 0's model class and config on every process; elsewhere the model is built on the meta device
    (no memory), to be given its shards by process 0 (:func:`aptune.sharding.load_full_state_dict`)."""
    import transformers

    from .arch import class_name

    mine = None
    if model is not None:
        dtypes = {n: str(p.dtype).removeprefix("torch.") for n, p in model.named_parameters()}
        mine = (class_name(model), model.config.to_dict(), dtypes)
    shared = distributed.all_gather_objects(mine)[0]
    if model is not None:
        return model
    name, values, dtypes = shared
    cls = getattr(transformers, name)
    with torch.device("meta"):
        empty = cls(cls.config_class.from_dict(values))
        for n, p in empty.named_parameters():  # process 0's dtype for each (bf16 weights, fp32 new heads)
            p.data = p.data.to(getattr(torch, dtypes[n]))
    if config.gradient_checkpointing:
        set_activation_checkpointing(empty, True)
    return empty


def set_activation_checkpointing(model: nn.Module, on: bool) -> None:
    """Turn non-reentrant activation checkpointing on or off (off: only where it is on), under the name the
    installed transformers gives it: ``activation_checkpointing_*`` since 5.18, where the older
    ``gradient_checkpointing_*`` names still work but warn that they go in v6."""
    if on:
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
        disable = (
            getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        )
        disable()


def _accelerator(config: TrainConfig):
    """An Accelerator for this run. Accelerate keeps one state per process; a single-process run that asks
    for other settings than an earlier run in the same process (a notebook, a test suite) starts it afresh."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("distributed_type") is not None and state.get("num_processes", 1) == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(mixed_precision=config.mixed_precision, cpu=config.cpu)


def check_parallelism(accelerator, fsdp: bool = False) -> bool:
    """Whether this run shards the model (``--fsdp``, or ``accelerate launch --use_fsdp``; :mod:`aptune.sharding`).
    DeepSpeed and Megatron launches stop with one line: aptune shards with FSDP2 itself."""
    kind = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type))
    if kind in ("DEEPSPEED", "MEGATRON_LM"):
        raise ConfigError(
            f"aptune train does not support {kind}: to shard the frozen weights use --fsdp (FSDP2; "
            "accelerate launch --use_fsdp), or launch data-parallel processes (accelerate launch --multi_gpu)"
        )
    return fsdp or kind == "FSDP"


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


@dataclass
class RunState:
    """The training loop's own state: what a checkpoint stores besides the model, method and optimizer."""

    step: int = 0
    setup_time_s: float = 0.0
    train_time_s: float = 0.0
    eval_time_s: float = 0.0
    checkpoint_time_s: float = 0.0
    train_tokens: int = 0  # real (non-padding) tokens of every training batch so far, all processes together
    losses: list[float] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=lambda: {"validation": None})
    best_state: dict[str, torch.Tensor] | None = None  # trainable tensors at the best validation
    resumed_from: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> RunState:
        return cls(**state)


class BatchStream:
    """Groups of ``accumulate`` training batches, epoch after epoch (a short last group is dropped), and
    the position in that order a checkpoint records: the epoch, the batches taken from it, and the state
    of the loader's generator when the epoch started (the shuffle is drawn from it)."""

    def __init__(self, loader: Any, accumulate: int, min_rows: int = 1):
        self.loader, self.accumulate, self.min_rows = loader, accumulate, min_rows
        self.epoch = 0
        self.position = 0  # batches taken from the current epoch
        self._batches = None
        self._epoch_start: torch.Tensor | None = None

    def next_group(self) -> list[dict[str, torch.Tensor]]:
        group: list[dict[str, torch.Tensor]] = []
        while len(group) < self.accumulate:
            if self._batches is None:
                self._start_epoch()
            try:
                batch = next(self._batches)
            except StopIteration:
                self._batches, group = None, []
                self.epoch += 1
                continue
            self.position += 1
            if _rows(batch) >= self.min_rows:  # a multi-process run skips a last batch too short to share
                group.append(batch)
        return group

    def _start_epoch(self) -> None:
        generator = getattr(self.loader, "generator", None)
        self._epoch_start = None if generator is None else generator.get_state()
        self._batches = iter(self.loader)
        self.position = 0

    def state_dict(self, loaders: dict[str, Any]) -> dict[str, Any]:
        """This stream's position, and the current state of every other loader's generator (calibration
        batches are drawn from one)."""
        others = {
            name: loader.generator.get_state()
            for name, loader in loaders.items()
            if loader is not self.loader and getattr(loader, "generator", None) is not None
        }
        started = self._batches is not None
        return {
            "epoch": self.epoch,
            "position": self.position if started else None,
            "epoch_start": self._epoch_start if started else None,
            "generators": others,
        }

    def load_state_dict(self, state: dict[str, Any], loaders: dict[str, Any]) -> None:
        for name, generator_state in state["generators"].items():
            loaders[name].generator.set_state(generator_state)
        self.epoch = state["epoch"]
        if state["position"] is None:
            return
        generator = getattr(self.loader, "generator", None)
        if generator is not None and state["epoch_start"] is not None:
            generator.set_state(state["epoch_start"])
        self._start_epoch()
        for _ in range(state["position"]):  # the same order as before: skip what was already trained on
            next(self._batches)
        self.position = state["position"]


def _rows(batch: dict[str, torch.Tensor]) -> int:
    return len(next(iter(batch.values())))


def shard(
    batch: dict[str, torch.Tensor], index: int, processes: int
) -> tuple[dict[str, torch.Tensor], float]:
    """Process ``index``'s contiguous share of the rows of a global ``batch``, and the weight of its mean loss
    (its rows x ``processes`` / the batch's rows), so that the processes' average loss and gradient are those
    of the whole batch."""
    if processes == 1:
        return batch, 1.0
    rows = _rows(batch)
    start, end = rows * index // processes, rows * (index + 1) // processes
    return {k: v[start:end] for k, v in batch.items()}, (end - start) * processes / rows


def optimizer_parameters(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [p for g in optimizer.param_groups for p in g["params"]]


# Settings that may differ between a run and its resumption: where it writes, what it reports, and where the
# allocator puts tensors (not what is computed).
RESUMABLE_CHANGES = (
    "output_dir",
    "resume",
    "save_every",
    "keep_checkpoints",
    "progress",
    "measure_speed",
    "cpu_mmap_threshold",
)


def run_configs(
    config: TrainConfig, apt: APTConfig, baseline: BaselineConfig, processes: int = 1
) -> dict[str, Any]:
    train = {k: v for k, v in config.to_dict().items() if k not in RESUMABLE_CHANGES}
    train["processes"] = processes  # each process's random generators are in the checkpoint
    return {"train": train, "apt": apt.to_dict(), "baseline": baseline.to_dict()}


def check_same_run(
    trainer: dict[str, Any],
    config: TrainConfig,
    apt: APTConfig,
    baseline: BaselineConfig,
    source: Path,
    processes: int = 1,
) -> None:
    """A checkpoint continues only the run that wrote it: every setting that shapes training must match."""
    now, then = run_configs(config, apt, baseline, processes), trainer["configs"]
    changed = [
        f"{key} ({then[part].get(key)!r} -> {now[part].get(key)!r})"
        for part in now
        for key in sorted(set(now[part]) | set(then[part]))
        if _plain(now[part].get(key)) != _plain(then[part].get(key))
    ]
    if changed:
        raise ConfigError(f"{source} was written by a run with other settings: {'; '.join(changed[:4])}")


def resume_source(config: TrainConfig, apt: APTConfig, baseline: BaselineConfig) -> Path:
    """The checkpoint ``config.resume`` names, checked to belong to this run (reads its small JSON part only)."""
    source = resolve_resume(config.resume, config.output_dir)
    processes = distributed.launched_processes()
    check_same_run(read_state(source, "trainer"), config, apt, baseline, source, processes)
    return source


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def train(
    config: TrainConfig,
    apt: APTConfig | None = None,
    prepared: Prepared | None = None,
    baseline: BaselineConfig | None = None,
) -> dict[str, Any]:
    """Run one training job and return its report (also written to ``OUTPUT/report.json``).

    ``apt`` holds APT's knobs and the pruning target every pruning method shares (``target_density``,
    ``ffn_multiple``); ``baseline`` the knobs of the pruning baselines.
    """
    from accelerate.utils import set_seed

    apt = apt or APTConfig()
    baseline = baseline or BaselineConfig()
    if sharded_launch(config):  # before anything loads: a sharded run aptune cannot do fails fast
        check_sharded(
            config.method, method_info(config.method).sharded, apt, distributed.launched_processes()
        )
    set_seed(config.seed)
    # on the CPU, freed activations go back to the system, so the process's memory follows the (pruned) model
    heap_threshold = (
        config.cpu_mmap_threshold
        if config.cpu_mmap_threshold
        and (config.cpu or not torch.cuda.is_available())
        and set_mmap_threshold(config.cpu_mmap_threshold)
        else None
    )
    out = Path(config.output_dir)
    saved = None
    if config.resume:
        source = resume_source(config, apt, baseline)
        # sharded: the weights reach the other processes from process 0, which alone reads them
        skip = ("model",) if _receives_weights(config) else ()
        saved = load_checkpoint(source, skip=skip)
    prepared = prepared or prepare(config)
    model, loaders = prepared.model, prepared.loaders
    task = prepared.task or resolve_task(config, prepared.model_path)
    data = prepared.data or TaskData(loaders)
    accelerator = _accelerator(config)
    device = accelerator.device
    processes, main_process = accelerator.num_processes, accelerator.is_main_process
    sharded = check_parallelism(accelerator, config.fsdp)  # what it cannot do was refused before loading
    if sharded:
        model = _empty_copy_of_process_0(model, config)
    else:
        model.to(device)  # a sharded model is moved by FSDP, a shard at a time
    chunked_loss = config.chunked_lm_loss and not sharded and use_chunked_loss(model)
    out.mkdir(parents=True, exist_ok=True)

    accumulate = config.gradient_accumulation_steps
    if len(loaders["train"]) < accumulate:
        raise ConfigError(
            f"gradient_accumulation_steps ({accumulate}) is more than the {len(loaders['train'])} training "
            "batches of an epoch"
        )
    steps_per_epoch = max(1, len(loaders["train"]) // accumulate)  # optimizer steps
    length = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    eval_every = max(1, steps_per_epoch // config.evals_per_epoch)
    dense_report = param_report(model)

    def calibration():
        return ({k: v.to(device) for k, v in b.items()} for b in loaders.get("calibration", loaders["train"]))

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()  # building a method may already prune (one-shot APT, llm-pruner): timed
    if sharded:  # before the method attaches its adapters, which stay whole on every process
        whole = model.state_dict() if main_process else {}
        new_heads = [p for m in describe(model).new_heads.values() for p in m.parameters()]
        shard_model(model, device, replicated=new_heads)
        if not main_process:
            model.to_empty(device=device)
        load_full_state_dict(model, whole, "process 0's model", from_process_0=True)
        distributed.broadcast_(list(model.buffers()))  # also those no state dict holds (rotary frequencies)
        del whole
        distributed.set_lockstep(True)  # every forward is a collective: every process runs every pass
    with accelerator.autocast():
        method = _build(
            config, apt, baseline, model, length, steps_per_epoch, calibration, saved is not None, sharded
        )
    model = method.model
    total = method.total_steps
    select_from = method.final_structure_step  # the best checkpoint is taken once the structure is final

    def new_optimizer(parameters):
        return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)

    # every process starts from process 0's adapters and heads (a run resumed from a checkpoint loads them)
    distributed.broadcast_(method.trainable_parameters())
    optimizer = new_optimizer(method.trainable_parameters())
    stream = BatchStream(loaders["train"], accumulate, min_rows=processes)
    setup_time = time.perf_counter() - started
    run = RunState(setup_time_s=setup_time, train_time_s=setup_time)  # setup counts as training time too
    # the peak of loading and setup (APT's calibration and one-shot pruning), then the training steps' own
    setup_peak = peak_memory_mb(device)
    steps_peak_known = reset_peak_memory(device)
    if saved is not None:
        method.restore(saved["structure"], saved["method"])
        model = method.model
        if sharded:
            load_full_state_dict(model, saved.get("model", {}), str(source), from_process_0=True)
        else:
            load_state_strictly(model, saved["model"])
        optimizer = new_optimizer(method.trainable_parameters())
        load_optimizer_state(optimizer, saved["optimizer"])
        run = RunState.from_dict(saved["trainer"]["run"])
        run.resumed_from.append({"step": run.step, "checkpoint": str(source)})
        stream.load_state_dict(saved["trainer"]["data"], loaders)
        set_rng_state(saved["trainer"]["rng"][distributed.rank()])  # last: nothing after it draws randomness
        del saved
    elif processes > 1:
        set_seed(config.seed, device_specific=True)  # each process its own dropout (seed + process index)
    density, n_trainable = method.density(), sum(p.numel() for p in model.parameters() if p.requires_grad)
    low_precision = accelerator.autocast if config.dtype != "float32" else contextlib.nullcontext
    progress = _Progress(total, config.progress and main_process, initial=run.step)
    model.train()

    while run.step < total:
        group = stream.next_group()
        run.train_tokens += sum(_token_count(b) for b in group)  # host batches: no device sync, not timed
        started = time.perf_counter()
        lr = config.lr * lr_factor(run.step, total, config.warmup_ratio, method.lr_restarts)
        for g in optimizer.param_groups:
            g["lr"] = lr
        method.before_forward()  # salience is gathered over every micro-batch of this step
        loss_sum = None
        for batch in group:
            batch, weight = shard(batch, distributed.rank(), processes)  # this process's rows of the batch
            batch = {k: v.to(device) for k, v in batch.items()}
            with accelerator.autocast():
                loss = method.compute_loss(batch) * (weight / accumulate)
            accelerator.backward(loss)
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()  # no host sync here
        if processes > 1:  # the gradient of the global batch's mean loss, on every process
            distributed.all_reduce_(
                [p.grad for p in optimizer_parameters(optimizer) if p.grad is not None], "mean"
            )
            distributed.all_reduce_([loss_sum], "mean")
        method.after_backward()  # decisions are taken once per optimizer step
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(optimizer_parameters(optimizer), config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        run.step += 1
        step = run.step
        if method.after_step():
            model = method.model
            distributed.broadcast_(method.trainable_parameters())  # grown adapters start equal everywhere
            optimizer = new_optimizer(method.trainable_parameters())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        run.train_time_s += time.perf_counter() - started
        evaluate_now = step % eval_every == 0 or step in (total, select_from)
        if step % 10 == 0 or evaluate_now:  # bookkeeping off the hot path
            density = method.density()
            n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        run.losses.append(float(loss_sum))
        progress.update(loss=run.losses[-1], density=density, trainable=n_trainable)

        if evaluate_now:
            started = time.perf_counter()
            with low_precision():  # bf16 weights and fp32 heads meet under autocast only
                val = task.evaluate(model, loaders["validation"], device)
            val = distributed.broadcast_float(val, device)  # decisions that read it agree across processes
            run.eval_time_s += time.perf_counter() - started
            method.observe_validation(task.selection_score(val))
            run.history.append(
                {
                    "step": step,
                    "epoch": step / steps_per_epoch,
                    "train_time_s": run.train_time_s,
                    "validation": val,
                    "density": density,
                    "trainable_params": n_trainable,
                }
            )
            progress.note(f"step {step}: validation {task.metric} {val:.4f}, density {density:.3f}")
            if step >= select_from and task.better(val, run.best["validation"]):
                run.best = {"validation": val, "step": step}
                run.best_state = _trainable_state(model)
        if config.save_every and step % config.save_every == 0 and step < total:
            started = time.perf_counter()
            rng = distributed.all_gather_objects(rng_state())  # each process continues its own streams
            whole = full_state_dict(model) if sharded else None  # a collective: process 0 gets the weights
            if main_process:
                trainer = {
                    "run": run.to_dict(),
                    "data": stream.state_dict(loaders),
                    "configs": run_configs(config, apt, baseline, processes),
                }
                keep = config.keep_checkpoints
                save_checkpoint(
                    out,
                    step,
                    method=method,
                    optimizer=optimizer,
                    trainer=trainer,
                    rng=rng,
                    keep=keep,
                    model_state=whole,
                )
            del whole
            distributed.barrier()
            run.checkpoint_time_s += time.perf_counter() - started
    progress.close()

    steps_peak = peak_memory_mb(device) if steps_peak_known else None
    peak_memory = max(setup_peak, steps_peak or 0.0)
    step, best, history = run.step, run.best, run.history
    sharding_report = local_numel(model) if sharded else None
    if sharded:  # process 0 continues on a whole copy; the others are done once the weights are gathered
        method = _unsharded_copy(config, apt, baseline, prepared, task, data, method, length, steps_per_epoch)
        if method is None:
            distributed.barrier()
            return {}
        model = method.model  # on the CPU until it is compacted
    if run.best_state is not None:
        model.load_state_dict(run.best_state, strict=False)
    model = method.finish().to(device)
    use_model_loss(model)  # the final model computes its logits, as any transformers model does
    if config.dtype != "float32":  # the saved model in one dtype, as it was loaded (merged heads included)
        model.to(WEIGHT_DTYPES[config.dtype])
    for p in model.parameters():
        p.requires_grad_(False)
    if config.gradient_checkpointing:
        set_activation_checkpointing(model, False)
    model.eval()
    if not main_process:  # the model is the same on every process: process 0 evaluates and saves it
        distributed.barrier()
        return {}
    metrics = {
        "validation_metric": task.metric,
        "best_validation": best["validation"],
        "best_step": best.get("step"),
    }
    metrics.update(task.final_metrics(model, data, config, device, prepared.tokenizer))
    final_report = param_report(model)
    with atomic_folder(out / "model") as folder:  # a crash while saving leaves the previous model whole
        save_pruned(model, folder, tokenizer=prepared.tokenizer)

    report: dict[str, Any] = {
        "command": shlex.join(sys.argv),
        "task": task.name,
        "method": config.method,
        "metrics": metrics,
        "density": final_report["density"],
        "params_before": dense_report,
        "params_after": final_report,
        "train_time_s": run.train_time_s,
        "setup_time_s": run.setup_time_s,  # building the method: one-shot calibration and pruning, if any
        "eval_time_s": run.eval_time_s,
        "checkpoint_time_s": run.checkpoint_time_s,
        "train_tokens": run.train_tokens,
        # the training steps' throughput: tokens of the global batches per second of steps (setup excluded)
        "train_tokens_per_s": _per_second(run.train_tokens, run.train_time_s - run.setup_time_s),
        "resumed_from": run.resumed_from,
        "train_losses": run.losses,  # the loss of every optimizer step
        "peak_memory_mb": peak_memory,
        "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "process_peak_rss",
        # loading and setup (building the method: calibration, one-shot pruning), then the training steps
        "peak_memory_phases_mb": {"load_and_setup": setup_peak, "training_steps": steps_peak},
        "cpu_mmap_threshold": heap_threshold,  # glibc's mmap threshold aptune set, None when it set none
        "chunked_lm_loss": chunked_loss,  # the causal-LM loss computed without the logits
        "processes": processes,  # peak memory and times are process 0's
        "sharding": {"kind": "fsdp", "params_per_process": sharding_report} if sharded else None,
        "steps": step,
        "steps_per_epoch": steps_per_epoch,
        "final_structure_step": select_from,
        "history": history,
        "method_history": method.history,
        "apt_history": method.history if config.method == "apt" else [],
        "train_config": config.to_dict(),
        "apt_config": method.config_dict() if config.method == "apt" else None,
        "method_config": method.config_dict(),
        "environment": environment(device),
    }
    if config.measure_speed:
        report["inference"] = task.compare_speed(prepared.model_path, model, data, config, device)
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    distributed.barrier()
    return report


def _token_count(batch: dict[str, torch.Tensor]) -> int:
    """The real tokens of a (host) batch: its attention mask's ones, else every input id (an encoder-decoder's
    source side)."""
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        return int(mask.sum())
    ids = batch.get("input_ids")
    return int(ids.numel()) if isinstance(ids, torch.Tensor) else 0


def _per_second(count: float, seconds: float) -> float | None:
    return count / seconds if count and seconds > 0 else None


def _build(
    config: TrainConfig,
    apt: APTConfig,
    baseline: BaselineConfig,
    model: nn.Module,
    length: int,
    steps_per_epoch: int,
    calibration: Any,
    resuming: bool,
    sharded: bool = False,
) -> Any:
    """The run's method on ``model`` (:func:`aptune.methods.build_method` with the run's settings)."""
    return build_method(
        config.method,
        model,
        total_steps=length,
        steps_per_epoch=steps_per_epoch,
        apt=apt,
        baseline=baseline,
        lora_rank=config.lora_rank,
        lora_targets=config.lora_targets,
        calibration=calibration,
        resuming=resuming,
        sharded=sharded,
    )


def _unsharded_copy(
    config: TrainConfig,
    apt: APTConfig,
    baseline: BaselineConfig,
    prepared: Prepared,
    task: Any,
    data: Any,
    method: Any,
    length: int,
    steps_per_epoch: int,
) -> Any:
    """The end of a sharded run: the whole weights gathered to process 0's CPU and loaded, with the method's
    state, into a freshly built unsharded copy (the resume path), whose method process 0 returns; ``None``
    on the other processes. Every process must call it."""
    full = full_state_dict(method.model)
    structure, state = shape_and_ranks(method.model), method.state_dict()
    distributed.set_lockstep(False)
    if not distributed.is_main():
        return None
    model = load_model(task, prepared.model_path, data, config)
    fresh = _build(config, apt, baseline, model, length, steps_per_epoch, lambda: iter(()), resuming=True)
    fresh.restore(structure, state)
    load_state_strictly(fresh.model, full, "the gathered sharded model")
    return fresh


def environment(device) -> dict[str, Any]:
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    from . import __version__

    env["aptune"] = __version__
    return env


class _Progress:
    """A tqdm bar with loss, density and trainable parameters; silent when disabled."""

    def __init__(self, total: int, enabled: bool, initial: int = 0):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total, initial=initial, desc="aptune train", unit="step", dynamic_ncols=True
            )

    def update(self, loss: float, density: float, trainable: int) -> None:
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{loss:.4f}", density=f"{density:.3f}", trainable=f"{trainable:,}", refresh=False
            )
            self.bar.update(1)

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        elif distributed.is_main():  # one copy of each line in a multi-process run
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def config_fields() -> dict[str, list[str]]:
    """Field names of the three configs (the CLI builds its flags from these)."""
    return {
        "train": [f.name for f in fields(TrainConfig)],
        "apt": [f.name for f in fields(APTConfig)],
        "baseline": [f.name for f in fields(BaselineConfig)],
    }


__all__ = ["METHODS", "TrainConfig", "config_fields", "prepare", "resume_source", "train"]
