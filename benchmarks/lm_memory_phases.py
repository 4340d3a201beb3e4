"""Peak process memory (RSS) of a causal-LM training run, phase by phase: loading, building the method (APT's
one-shot calibration and pruning, LLM-Pruner's importance pass), and training steps.

    MALLOC_MMAP_THRESHOLD_=1048576 python benchmarks/lm_memory_phases.py apt --density 0.7
    MALLOC_MMAP_THRESHOLD_=1048576 python benchmarks/lm_memory_phases.py lora
    MALLOC_MMAP_THRESHOLD_=1048576 python benchmarks/lm_memory_phases.py lora --no-chunked-lm-loss

``--no-chunked-lm-loss`` computes the loss as the model's own forward does, over the whole logits (the
default computes it without them, :mod:`aptune.tasks.lm_loss`); ``--model gemma3-270m`` (262,144-token
vocabulary), ``--gradient-checkpointing`` and ``--dtype bfloat16`` are the other memory switches.

The packaged SmolLM2-135M-Instruct on ``../shared/data/brown`` at batch 4 x 128, as the ``cpu-lm`` bench preset.
Before each phase the kernel's peak-RSS mark is reset (``/proc/self/clear_refs``), so each phase's peak is its
own. Linux only. The 1 MiB mmap threshold makes freed tensors leave the RSS (see docs/bench.md).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path


def status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("method", choices=["apt", "lora", "llm-pruner"])
    parser.add_argument("--density", type=float, default=0.7)
    parser.add_argument("--shape", default="per-layer")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--chunked-lm-loss", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "brown")
    )
    args = parser.parse_args(argv)

    import torch

    from aptune.config import APTConfig
    from aptune.memory import release_memory, reset_peak_rss
    from aptune.methods import BaselineConfig, build_method
    from aptune.tasks.lm_loss import use_chunked_loss
    from aptune.train import TrainConfig, prepare

    phases: dict[str, dict[str, float]] = {}

    def mark(name: str, started: float) -> None:
        phases[name] = {
            "peak_rss_mb": status_mb("VmHWM"),
            "rss_after_mb": status_mb("VmRSS"),
            "s": time.perf_counter() - started,
        }
        reset_peak_rss()

    reset_peak_rss()
    t = time.perf_counter()
    config = TrainConfig(
        model=args.model,
        data=args.data,
        max_length=args.max_length,
        batch_size=args.batch_size,
        max_steps=100,
        progress=False,
        dtype=args.dtype,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    prepared = prepare(config)
    chunked = args.chunked_lm_loss and use_chunked_loss(prepared.model)
    mark("load", t)
    t = time.perf_counter()
    targets = ("q", "v", "gate") if args.method == "lora" else None
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    with autocast:
        method = build_method(
            args.method,
            prepared.model,
            total_steps=100,
            steps_per_epoch=len(prepared.loaders["train"]),
            apt=APTConfig(target_density=args.density, shape=args.shape),
            baseline=BaselineConfig(),
            lora_rank=8,
            lora_targets=targets,
            calibration=lambda: iter(prepared.loaders["calibration"]),
        )
    release_memory()
    mark("build method", t)
    t = time.perf_counter()
    optimizer = torch.optim.AdamW(method.trainable_parameters(), lr=1e-4)
    for batch in itertools.islice(prepared.loaders["train"], args.steps):
        method.before_forward()
        with autocast:
            loss = method.compute_loss(batch)
        loss.backward()
        method.after_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if method.after_step():
            optimizer = torch.optim.AdamW(method.trainable_parameters(), lr=1e-4)
    mark(f"{args.steps} training steps", t)
    settings = {
        k: getattr(args, k) for k in ("model", "batch_size", "max_length", "dtype", "gradient_checkpointing")
    }
    result = {"method": args.method, "density": method.density(), "chunked_lm_loss": chunked, **settings}
    print(json.dumps({**result, "phases": phases}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
