"""Process memory (RSS) of one CPU training run, sampled over time, and how much of it is free heap.

    python benchmarks/rss_probe.py apt                          # 1 epoch of MiniLM on rt-polarity, density 0.4
    python benchmarks/rss_probe.py apt --cpu-mmap-threshold 0   # glibc's own moving threshold
    MALLOC_ARENA_MAX=1 python benchmarks/rss_probe.py lora      # the environment's glibc settings apply as usual

Trains with ``aptune.train`` (no self-distillation, 4 evaluations per epoch) while a thread reads ``VmRSS`` and
``VmHWM`` from ``/proc/self/status`` twice a second. Like ``aptune train``, it fixes glibc's mmap threshold at
4 MiB unless ``--cpu-mmap-threshold`` says otherwise (0: glibc's own) or ``MALLOC_MMAP_THRESHOLD_`` is set.
Prints the run's peak RSS, its training time, a coarse RSS trace, and the RSS just before and after one
``malloc_trim(0)`` at the end: what the trim gives back is heap that glibc kept after the tensors in it were
freed. Linux only.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

LEARNING_RATES = {"apt": 1e-3, "lora": 5e-4, "full": 5e-5}


def status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("method", choices=sorted(LEARNING_RATES))
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--output", default="runs/rss-probe")
    parser.add_argument("--shape", default=None, help="APT's shape (default per-layer for an encoder)")
    parser.add_argument("--ffn-multiple", type=int, default=None, help="APT's FFN width alignment")
    parser.add_argument(
        "--prune-hidden", action=argparse.BooleanOptionalAction, default=None, help="APT's hidden pruning"
    )
    parser.add_argument("--cpu-mmap-threshold", type=int, default=None, help="bytes; 0 leaves glibc's own")
    args = parser.parse_args(argv)

    from aptune.config import APTConfig
    from aptune.memory import release_memory
    from aptune.train import TrainConfig, train

    trace: list[tuple[float, float, float]] = []
    done = threading.Event()

    def poll() -> None:
        start = time.time()
        while not done.is_set():
            trace.append((time.time() - start, status_mb("VmRSS"), status_mb("VmHWM")))
            time.sleep(0.5)

    threading.Thread(target=poll, daemon=True).start()
    config = TrainConfig(
        model="",
        data="rt-polarity",
        output_dir=f"{args.output}/{args.method}",
        method=args.method,
        epochs=args.epochs,
        evals_per_epoch=4,
        learning_rate=LEARNING_RATES[args.method],
        measure_speed=False,
        progress=False,
        cpu=True,
        **({} if args.cpu_mmap_threshold is None else {"cpu_mmap_threshold": args.cpu_mmap_threshold}),
    )
    knobs = {"shape": args.shape} if args.shape else {}
    if args.ffn_multiple:
        knobs["ffn_multiple"] = args.ffn_multiple
    if args.prune_hidden is not None:
        knobs["prune_hidden"] = args.prune_hidden
    report = train(config, APTConfig(distill=False, **knobs))
    done.set()
    before = status_mb("VmRSS")
    release_memory()
    after = status_mb("VmRSS")
    print(
        f"{args.method}: peak RSS {report['peak_memory_mb']:.0f} MiB, train {report['train_time_s']:.1f} s, "
        f"best validation {report['metrics']['best_validation']:.3f}"
    )
    print(f"RSS at the end {before:.0f} MiB, after malloc_trim {after:.0f} MiB")
    every = max(1, len(trace) // 40)
    print("trace (s, RSS MiB, peak MiB):", [(round(t), round(r), round(h)) for t, r, h in trace[::every]])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
