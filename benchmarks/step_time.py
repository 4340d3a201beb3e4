"""APT's training step against LoRA's in the dense phase, on the same adapted projections, interleaved.

    python benchmarks/step_time.py --out benchmarks/results/step-time-cpu.json            # MiniLM, CPU
    python benchmarks/step_time.py --device cuda --batch-size 32 --length 128 --out step-gpu.json

Two copies of the same classifier train side by side on the same random batches: one under an
:class:`aptune.APTController` (adapters on ``--targets``, salience hooks on, masks all ones: the dense phase
before the first decay window), one with PEFT's LoRA on the same projections at the same rank. Steps alternate
(A B A B ...) after a warm-up, so load changes on a shared machine fall on both; the result is the median of the
per-pair ratios APT step / LoRA step, with its spread, and each side's median step time. The target of
issue 11: APT's dense-phase step within 1.10x of LoRA's.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForSequenceClassification

import aptune
import aptune.assets
from aptune.methods.plain import attach_peft_lora


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="", help="dense model folder (default: the packaged MiniLM)")
    parser.add_argument(
        "--dense-config", help="instead of --model: 'bert-base' or a config.json, randomly initialised"
    )
    parser.add_argument("--targets", nargs="+", default=["q", "v", "up"])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="autocast to bfloat16 (CUDA)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.length < 1:
        parser.error("--steps, --batch-size and --length must be >= 1")

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if args.dense_config == "bert-base":
        base = AutoModelForSequenceClassification.from_config(transformers.BertConfig(num_labels=2))
    elif args.dense_config:
        config = transformers.AutoConfig.from_pretrained(args.dense_config, num_labels=2)
        base = AutoModelForSequenceClassification.from_config(config)
    else:
        path = args.model or str(aptune.assets.minilm_path())
        transformers.utils.logging.set_verbosity_error()
        base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=torch.float32)
    base.to(device).train()

    total = 10_000  # a long run whose dense phase (salience on, masks at one) covers every timed step
    apt_model = copy.deepcopy(base)
    apt_config = aptune.APTConfig(
        adapter_targets=tuple(args.targets), initial_rank=args.rank, distill=False, salience_start=0
    )
    controller = aptune.APTController(apt_model, apt_config, total_steps=total, steps_per_epoch=1000)
    lora_model = attach_peft_lora(copy.deepcopy(base), args.rank, args.targets)
    del base

    g = torch.Generator().manual_seed(args.seed)
    vocab = apt_model.config.vocab_size

    def batch() -> dict[str, torch.Tensor]:
        ids = torch.randint(5, vocab, (args.batch_size, args.length), generator=g)
        return {
            "input_ids": ids.to(device),
            "attention_mask": torch.ones_like(ids).to(device),
            "labels": torch.randint(0, 2, (args.batch_size,), generator=g).to(device),
        }

    apt_opt = torch.optim.AdamW(controller.trainable_parameters(), lr=1e-4)
    lora_opt = torch.optim.AdamW([p for p in lora_model.parameters() if p.requires_grad], lr=1e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    cuda = device.type == "cuda"
    peaks = {"apt": 0.0, "lora": 0.0}  # CUDA: the most a step allocated above what was allocated before it

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def track(side: str, before: int) -> None:
        if cuda:
            peaks[side] = max(peaks[side], (torch.cuda.max_memory_allocated(device) - before) / 2**20)

    def begin() -> int:
        if not cuda:
            return 0
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)

    def apt_step(b) -> float:
        sync()
        before = begin()
        start = time.perf_counter()
        controller.before_forward()
        with autocast:
            loss = controller.compute_loss(b)
        loss.backward()
        controller.after_backward()
        torch.nn.utils.clip_grad_norm_(controller.trainable_parameters(), 1.0)
        apt_opt.step()
        apt_opt.zero_grad(set_to_none=True)
        if controller.after_step():
            raise RuntimeError("the structure changed: the timed steps left the dense phase")
        sync()
        elapsed = time.perf_counter() - start
        track("apt", before)
        return elapsed

    def lora_step(b) -> float:
        sync()
        before = begin()
        start = time.perf_counter()
        with autocast:
            loss = lora_model(**b).loss
        loss.backward()
        params = [p for p in lora_model.parameters() if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        lora_opt.step()
        lora_opt.zero_grad(set_to_none=True)
        sync()
        elapsed = time.perf_counter() - start
        track("lora", before)
        return elapsed

    for _ in range(args.warmup):
        b = batch()
        apt_step(b)
        lora_step(b)
    apt_times, lora_times = [], []
    for i in range(args.steps):
        b = batch()
        if i % 2 == 0:  # alternate which side goes first in a pair
            apt_times.append(apt_step(b))
            lora_times.append(lora_step(b))
        else:
            lora_times.append(lora_step(b))
            apt_times.append(apt_step(b))
    ratios = sorted(a / lora for a, lora in zip(apt_times, lora_times, strict=True))
    q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
    result = {
        "command": " ".join(["python", *sys.argv]),
        "model": args.dense_config or args.model or "all-MiniLM-L6-v2",
        "targets": args.targets,
        "rank": args.rank,
        "batch_size": args.batch_size,
        "length": args.length,
        "bf16": args.bf16,
        "steps": args.steps,
        "seed": args.seed,
        "apt_step_s_median": statistics.median(apt_times),
        "lora_step_s_median": statistics.median(lora_times),
        "ratio_median": statistics.median(ratios),
        "ratio_spread": {"min": ratios[0], "q1": q[0], "q3": q[2], "max": ratios[-1]},
        "trainable_params": {
            "apt": sum(p.numel() for p in controller.trainable_parameters()),
            "lora": sum(p.numel() for p in lora_model.parameters() if p.requires_grad),
        },
        # CUDA: the most one training step allocated above what was allocated when it began (activations,
        # gradients, temporaries); the weights and optimizer state held between steps are not in it
        "step_peak_above_start_mib": peaks if cuda else None,
        "load_average": os.getloadavg(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "aptune": aptune.__version__,
            "python": platform.python_version(),
        },
        "machine": {
            "device": str(device),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        },
    }
    if cuda:
        print(
            f"step peak above its start (MiB): APT {peaks['apt']:.1f}, LoRA {peaks['lora']:.1f}", flush=True
        )
    print(
        f"dense-phase step: APT {result['apt_step_s_median'] * 1e3:.1f} ms, LoRA "
        f"{result['lora_step_s_median'] * 1e3:.1f} ms, APT/LoRA {result['ratio_median']:.3f} "
        f"(pairs: {ratios[0]:.3f}-{ratios[-1]:.3f}, IQR {q[0]:.3f}-{q[2]:.3f})",
        flush=True,
    )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
