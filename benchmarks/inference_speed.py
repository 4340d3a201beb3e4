"""Inference throughput of a dense model vs a pruned shape of it, at several batch sizes and lengths.

    python benchmarks/inference_speed.py --structure runs/demo/model/aptune_structure.json \
        --batch-sizes 32 --lengths 64 128 --device cpu --out benchmarks/results/speed.json
    python benchmarks/inference_speed.py --dense-config bert-base --uniform-density 0.4 \
        --batch-sizes 512 --lengths 128 --device cuda --dtypes bfloat16 --out speed-bert-base.json

The pruned model is the dense one cut to the saved shape plan (``aptune_structure.json``), or, with
``--uniform-density``, to the same number of heads and of FFN neurons (a multiple of ``--ffn-multiple``) in
every layer, hidden size kept, as large as fits the density. Speed does not depend on the weight values, so
only the structure file is needed, and ``--dense-config bert-base`` builds a randomly initialised BERT-base
(hidden 768, 12 layers, 12 heads, FFN 3072) when no such weights are at hand. Reports the median of timed runs after
warm-up, and the speed-up of the pruned model over the dense one measured in the same run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
from dataclasses import replace
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForSequenceClassification

import aptune
import aptune.assets
from aptune.budget import StructureShape, count_prunable
from aptune.compact import SavedStructure, masks_for_shape, read_structure
from aptune.evaluate import measure_throughput


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--structure", help="aptune_structure.json of a pruned model (or its folder)")
    parser.add_argument("--uniform-density", type=float, help="instead of --structure: prune layers alike")
    parser.add_argument(
        "--ffn-multiple", type=int, default=64, help="FFN width alignment for --uniform-density"
    )
    parser.add_argument("--model", default="", help="the dense model folder (default: the packaged MiniLM)")
    parser.add_argument(
        "--dense-config", help="instead of --model: 'bert-base' or a config.json, randomly initialised"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32])
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", nargs="+", default=["float32"])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    if (args.structure is None) == (args.uniform_density is None):
        sys.exit("pass exactly one of --structure and --uniform-density")
    torch.manual_seed(args.seed)
    dense = dense_model(args).eval()
    if args.structure is not None:
        structure_path = Path(args.structure)
        if structure_path.is_file():
            saved = SavedStructure(**json.loads(structure_path.read_text()))
        else:
            saved = read_structure(structure_path)
        if saved is None:
            sys.exit(f"no aptune_structure.json at {args.structure}")
        shape = saved.shape
    else:
        if not 0 < args.uniform_density <= 1:
            sys.exit(f"--uniform-density must be in (0, 1], got {args.uniform_density}")
        shape = uniform_shape(dense, args.uniform_density, args.ffn_multiple).plan_dict()
    pruned = aptune.compact(copy.deepcopy(dense), masks_for_shape(dense, shape))
    density = aptune.param_report(pruned)["density"]
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for batch in args.batch_sizes:
            for length in args.lengths:
                d = measure_throughput(
                    dense, batch, length, runs=args.runs, device=args.device, dtype=dtype, seed=args.seed
                )
                p = measure_throughput(
                    pruned, batch, length, runs=args.runs, device=args.device, dtype=dtype, seed=args.seed
                )
                row = {
                    "dtype": dtype_name,
                    "batch_size": batch,
                    "length": length,
                    "dense_per_s": d.throughput,
                    "pruned_per_s": p.throughput,
                    "speedup": p.throughput / d.throughput,
                    "dense_peak_mb": d.peak_memory_mb,
                    "pruned_peak_mb": p.peak_memory_mb,
                }
                rows.append(row)
                print(
                    f"{dtype_name:8} batch {batch:4} length {length:4}: dense {d.throughput:9.1f}/s  "
                    f"pruned {p.throughput:9.1f}/s  speed-up {row['speedup']:.2f}x",
                    flush=True,
                )
    result = {
        "command": " ".join(["python", *sys.argv]),
        "dense": args.dense_config or args.model or "all-MiniLM-L6-v2",
        "structure": shape,
        "density": density,
        "seed": args.seed,
        "rows": rows,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "aptune": aptune.__version__,
            "python": platform.python_version(),
        },
        "machine": {
            "device": args.device,
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        },
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


def dense_model(args) -> torch.nn.Module:
    if args.dense_config is None:
        path = args.model or str(aptune.assets.minilm_path())
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=torch.float32)
    if args.dense_config == "bert-base":
        config = transformers.BertConfig(num_labels=2)  # the defaults are BERT-base's sizes
    else:
        config = transformers.AutoConfig.from_pretrained(args.dense_config, num_labels=2)
    return AutoModelForSequenceClassification.from_config(config)


def uniform_shape(model: torch.nn.Module, density: float, ffn_multiple: int) -> StructureShape:
    """Every layer keeps round(density x heads) heads and the most aligned FFN neurons that fit the budget."""
    shape = StructureShape.of(aptune.describe(model))
    target = int(density * count_prunable(shape))
    heads = [max(1, round(density * h)) for h in shape.heads]

    def build(neurons: int) -> StructureShape:
        return StructureShape(
            shape.hidden,
            tuple(replace(a, heads=h, kv_heads=h) for a, h in zip(shape.attention, heads, strict=True)),
            tuple(replace(f, neurons=min(neurons, f.neurons)) for f in shape.ffn),
        )

    neurons = max(shape.neurons)
    while neurons > 0 and count_prunable(build(neurons)) > target:
        neurons -= ffn_multiple if neurons % ffn_multiple == 0 else neurons % ffn_multiple
    return build(max(neurons, 0))


if __name__ == "__main__":
    main()
