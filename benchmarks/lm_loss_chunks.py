"""Time and memory of the LM-head loss: the whole logits against PyTorch's ``linear_cross_entropy`` in chunks.

    python benchmarks/lm_loss_chunks.py --out benchmarks/results/lm-loss-cpu/chunks.json

For each vocabulary (SmolLM2's 49,152 at hidden 576, Gemma 3's 262,144 at hidden 640) and 512 tokens (the
``cpu-lm`` bench's 4 x 128), one forward and backward of the loss with respect to the hidden states (the head
frozen, as in adapter training): the reference (``cross_entropy(linear(h, W))``), PyTorch's default chunking
("auto", a few tokens per chunk) and fixed chunk sizes, timed alternately (a round runs every variant once, in
turn; the median over rounds is reported). ``chunk_logits_mib`` is one chunk's fp32 logits; the reference holds
the whole logits, their log-softmax and their gradient (3 x ``tokens x vocabulary x 4`` bytes).
aptune's choice (:func:`aptune.tasks.lm_loss.chunk_rows`) is marked.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

SHAPES = {"smollm2": (576, 49152), "gemma3-270m": (640, 262144)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch
    import torch.nn.functional as F
    from torch.nn import LinearCrossEntropyOptions

    from aptune.tasks.lm_loss import chunk_rows

    torch.manual_seed(0)
    results: dict[str, dict] = {}
    for model, (hidden, vocab) in SHAPES.items():
        weight = torch.randn(vocab, hidden) * 0.02
        target = torch.randint(0, vocab, (args.tokens,))
        ours = chunk_rows(vocab, "cpu")

        variants: dict[str, LinearCrossEntropyOptions | None] = {
            "whole logits": None,
            "pytorch auto chunks": LinearCrossEntropyOptions(),
        }
        for rows in sorted({*args.rows, ours}):
            variants[f"{rows} tokens per chunk"] = LinearCrossEntropyOptions(
                chunking_method=None, batch_chunk_size=rows, acc_policy="accurate"
            )
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds + 1):  # the first round warms up
            for name, options in variants.items():
                h = torch.randn(args.tokens, hidden, requires_grad=True)
                start = time.perf_counter()
                if options is None:
                    loss = F.cross_entropy(F.linear(h, weight), target, reduction="sum")
                else:
                    loss = F.linear_cross_entropy(h, weight, target, reduction="sum", options=options)
                loss.backward()
                times[name].append(time.perf_counter() - start)
        base = statistics.median(times["whole logits"][1:])
        rows_of = {name: int(name.split()[0]) for name in variants if name.endswith("per chunk")}
        results[model] = {
            "hidden": hidden,
            "vocab": vocab,
            "aptune_rows": ours,
            "variants": {
                name: {
                    "median_s": statistics.median(t[1:]),
                    "vs_whole_logits": statistics.median(t[1:]) / base,
                    "chunk_logits_mib": rows_of[name] * vocab * 4 / 2**20 if name in rows_of else None,
                }
                for name, t in times.items()
            },
        }
        print(model, {k: round(v["vs_whole_logits"], 2) for k, v in results[model]["variants"].items()})
    out = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "tokens": args.tokens,
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "seed": 0,
        "results": results,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
