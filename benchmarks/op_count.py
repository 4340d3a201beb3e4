"""How many tensor operations one dense-phase training step runs: APT against PEFT LoRA on the same projections.

    python benchmarks/op_count.py                      # MiniLM, batch 8 x 32, adapters on q, v, up
    python benchmarks/op_count.py --top 20             # also the operations APT adds, by phase
    python benchmarks/op_count.py --accelerator-path   # what the salience hooks run on a GPU instead
    python benchmarks/op_count.py --padded             # rows of random length, as in classification

A small model's step on a GPU is bound by kernel launches, so the number of operations that launch kernels is
a device-free proxy for APT's overhead there. Every ATen call of one step (after warm-up) is counted through a
``TorchDispatchMode``, by phase (forward, backward, APT's hooks after backward, clipping, optimizer). Views and
host reads launch no kernel and are counted apart. The optimizer and clipping use their multi-tensor (foreach)
kernels, as on CUDA. The salience hooks choose their kernels by device (``aptune.salience._host_side``):
``--accelerator-path`` takes the GPU's choices on the CPU, so the count is the one a GPU would launch.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import platform
import sys
from pathlib import Path

import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForSequenceClassification

import aptune
import aptune.assets
import aptune.salience
from aptune.methods.plain import attach_peft_lora

NO_KERNEL = {
    "aten.view",
    "aten._unsafe_view",
    "aten.t",
    "aten.transpose",
    "aten.permute",
    "aten.expand",
    "aten.detach",
    "aten.alias",
    "aten.slice",
    "aten.select",
    "aten.unsqueeze",
    "aten.squeeze",
    "aten.as_strided",
    "aten.split",
    "aten.split_with_sizes",
    "aten.unbind",
    "aten._local_scalar_dense",
}


class Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()
        self.phase = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[(self.phase, str(func.overloadpacket))] += 1
        return func(*args, **(kwargs or {}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="", help="dense model folder (default: the packaged MiniLM)")
    parser.add_argument("--targets", nargs="+", default=["q", "v", "up"])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--top", type=int, default=0, help="list the N operations APT adds most")
    parser.add_argument(
        "--padded",
        action="store_true",
        help="rows of random length (padding in every batch, as in classification)",
    )
    parser.add_argument(
        "--accelerator-path",
        action="store_true",
        help="count the operations APT's salience hooks run on an accelerator (CUDA) rather than on the CPU",
    )
    parser.add_argument("--out", help="write the counts, the command and the versions to this JSON file")
    args = parser.parse_args(argv)
    if args.accelerator_path:  # the collector's device-dependent choices, taken as on a GPU
        aptune.salience._host_side = lambda x: False

    torch.manual_seed(0)
    transformers.utils.logging.set_verbosity_error()
    path = args.model or str(aptune.assets.minilm_path())
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=torch.float32).train()
    config = aptune.APTConfig(
        adapter_targets=tuple(args.targets), initial_rank=args.rank, distill=False, salience_start=0
    )
    controller = aptune.APTController(copy.deepcopy(base), config, total_steps=10_000, steps_per_epoch=1000)
    lora = attach_peft_lora(copy.deepcopy(base), args.rank, args.targets)
    apt_params = controller.trainable_parameters()
    lora_params = [p for p in lora.parameters() if p.requires_grad]
    apt_opt = torch.optim.AdamW(apt_params, lr=1e-4, foreach=True)
    lora_opt = torch.optim.AdamW(lora_params, lr=1e-4, foreach=True)
    g = torch.Generator().manual_seed(0)

    def batch() -> dict[str, torch.Tensor]:
        ids = torch.randint(5, base.config.vocab_size, (args.batch_size, args.length), generator=g)
        labels = torch.randint(0, 2, (args.batch_size,), generator=g)
        mask = torch.ones_like(ids)
        if args.padded:
            lengths = torch.randint(1, args.length + 1, (args.batch_size,), generator=g)
            mask = (torch.arange(args.length)[None, :] < lengths[:, None]).long()
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def clip_and_update(
        c: Counter, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer
    ) -> None:
        c.phase = "clip"
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        c.phase = "optimizer"
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def apt_step(c: Counter) -> None:
        c.phase = "forward"
        controller.before_forward()
        loss = controller.compute_loss(batch())
        c.phase = "backward"
        loss.backward()
        c.phase = "after backward"
        controller.after_backward()
        clip_and_update(c, apt_params, apt_opt)
        c.phase = "after step"
        if controller.after_step():
            raise RuntimeError("the structure changed: the step left the dense phase")

    def lora_step(c: Counter) -> None:
        c.phase = "forward"
        loss = lora(**batch()).loss
        c.phase = "backward"
        loss.backward()
        clip_and_update(c, lora_params, lora_opt)

    for _ in range(3):  # warm-up: optimizer states, caches
        apt_step(Counter())
        lora_step(Counter())
    kernels = {}
    summary: dict[str, dict] = {}
    for name, step in (("apt", apt_step), ("lora", lora_step)):
        counter = Counter()
        with counter:
            step(counter)
        kernels[name] = collections.Counter(
            {key: n for key, n in counter.counts.items() if key[1] not in NO_KERNEL}
        )
        by_phase = collections.Counter()
        for (phase, _), n in kernels[name].items():
            by_phase[phase] += n
        views = sum(counter.counts.values()) - sum(kernels[name].values())
        summary[name] = {
            "kernel_ops": sum(kernels[name].values()),
            "by_phase": dict(by_phase),
            "views": views,
        }
        print(
            f"{name}: {sum(kernels[name].values())} kernel ops ({dict(by_phase)}), {views} views and host reads"
        )
    ratio = sum(kernels["apt"].values()) / sum(kernels["lora"].values())
    print(f"APT / LoRA kernel ops: {ratio:.3f}")
    if args.top:
        added = kernels["apt"] - kernels["lora"]
        for (phase, op), n in added.most_common(args.top):
            print(f"  +{n:4d}  {phase:15s} {op}")
    if args.out:
        added = kernels["apt"] - kernels["lora"]
        result = {
            "command": " ".join(
                ["python", "benchmarks/op_count.py", *(sys.argv[1:] if argv is None else argv)]
            ),
            "model": path,
            "targets": args.targets,
            "rank": args.rank,
            "batch_size": args.batch_size,
            "length": args.length,
            "padded": args.padded,
            "accelerator_path": args.accelerator_path,
            "seed": 0,
            **summary,
            "ratio": ratio,
            "added_by_apt": [
                {"phase": phase, "op": op, "count": n} for (phase, op), n in added.most_common()
            ],
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "aptune": aptune.__version__,
                "python": platform.python_version(),
            },
            "machine": {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()},
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
