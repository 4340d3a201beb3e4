"""Time and memory of the LM-head loss: the whole logits against PyTorch's ``linear_cross_entropy`` in chunks.

    python benchmarks/lm_loss_chunks.py --out benchmarks/results/lm-loss-cpu/chunks.json
    python benchmarks/lm_loss_chunks.py --device cuda --dtype bfloat16 --tokens 16384 \
        --shapes llama3-8b:4096:128256 --rows 1024 2048 4096 --out OUT.json          # on a GPU

For each head shape (default: SmolLM2's 49,152-token vocabulary at hidden 576, Gemma 3's 262,144 at hidden 640)
and ``--tokens`` tokens (default 512: the ``cpu-lm`` bench's 4 x 128), one forward and backward of the loss with
respect to the hidden states, the head frozen as in adapter training: the reference
(``cross_entropy(linear(h, W).float())``, what a model's own forward does), PyTorch's default chunking ("auto",
a few tokens per chunk on the CPU) and fixed chunk sizes through aptune's
:func:`aptune.tasks.lm_loss.chunked_cross_entropy` (``linear_cross_entropy`` with aptune's accumulation policy, or
checkpointed chunks where PyTorch is older than 2.13). The variants are timed alternately (a round runs each once, in
turn; the first round warms up; medians are reported). On a GPU each variant's peak allocation above its inputs
is reported too. ``chunk_logits_mib`` is one chunk's fp32 logits; the reference holds the whole logits, their
log-softmax and their gradient. aptune's own chunk size (:func:`aptune.tasks.lm_loss.chunk_rows`) is always
among the variants.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

SHAPES = ("smollm2:576:49152", "gemma3-270m:640:262144")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), help="NAME:HIDDEN:VOCAB")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from aptune.tasks.lm_loss import chunk_rows, chunked_cross_entropy

    native = hasattr(F, "linear_cross_entropy")  # PyTorch 2.13; before, aptune checkpoints each chunk

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    torch.manual_seed(0)
    results: dict[str, dict] = {}
    for shape in args.shapes:
        model, hidden, vocab = shape.split(":")
        hidden, vocab = int(hidden), int(vocab)
        weight = (torch.randn(vocab, hidden, device=device) * 0.02).to(dtype)
        target = torch.randint(0, vocab, (args.tokens,), device=device)
        ours = chunk_rows(vocab, device.type)
        variants: dict[str, int | None] = {"whole logits": None}  # name -> tokens per chunk (0: PyTorch's)
        if native:
            variants["pytorch auto chunks"] = 0
        for rows in sorted({*args.rows, ours}):
            variants[f"{rows} tokens per chunk"] = rows
        times: dict[str, list[float]] = {name: [] for name in variants}
        peaks: dict[str, float] = {}
        for _ in range(args.rounds + 1):
            for name, rows in variants.items():
                h = torch.randn(args.tokens, hidden, device=device, dtype=dtype, requires_grad=True)
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                sync()
                start = time.perf_counter()
                if rows is None:
                    loss = F.cross_entropy(F.linear(h, weight).float(), target, reduction="sum")
                elif rows == 0:
                    from torch.nn import LinearCrossEntropyOptions

                    loss = F.linear_cross_entropy(
                        h, weight, target, reduction="sum", options=LinearCrossEntropyOptions()
                    )
                else:
                    loss = chunked_cross_entropy(h, weight, None, target, rows)
                loss.backward()
                sync()
                times[name].append(time.perf_counter() - start)
                if cuda:
                    peaks[name] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
                del loss, h
        reference = statistics.median(times["whole logits"][1:])
        rows_of = {name: int(name.split()[0]) for name in variants if name.endswith("per chunk")}
        results[model] = {
            "hidden": hidden,
            "vocab": vocab,
            "aptune_rows": ours,
            "variants": {
                name: {
                    "median_s": statistics.median(t[1:]),
                    "vs_whole_logits": statistics.median(t[1:]) / reference,
                    "chunk_logits_mib": rows_of[name] * vocab * 4 / 2**20 if name in rows_of else None,
                    "peak_above_inputs_mib": peaks.get(name),
                }
                for name, t in times.items()
            },
        }
        print(model, {k: round(v["vs_whole_logits"], 2) for k, v in results[model]["variants"].items()})
    out = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "tokens": args.tokens,
        "rounds": args.rounds,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "dtype": args.dtype,
        "chunks_by": "torch linear_cross_entropy"
        if native
        else "aptune's checkpointed chunks (no linear_cross_entropy)",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "seed": 0,
        "results": results,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
