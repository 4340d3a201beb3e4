"""Inference throughput of a dense model vs a pruned shape of it, at several batch sizes and lengths.

    python benchmarks/inference_speed.py --structure runs/demo/model/aptune_structure.json \
        --batch-sizes 32 --lengths 64 128 --device cpu --out benchmarks/results/speed.json

The pruned model is the dense one cut to the saved shape plan (``aptune_structure.json``). Speed does not
depend on the weight values, so only the structure file is needed. Reports the median of timed runs after
warm-up, and the speed-up of the pruned model over the dense one measured in the same run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForSequenceClassification

import aptune
import aptune.assets
from aptune.compact import SavedStructure, masks_for_shape, read_structure
from aptune.evaluate import measure_throughput


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--structure", required=True, help="aptune_structure.json of a pruned model (or its folder)"
    )
    parser.add_argument("--model", default="", help="the dense model folder (default: the packaged MiniLM)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32])
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", nargs="+", default=["float32"])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    structure_path = Path(args.structure)
    if structure_path.is_file():
        saved = SavedStructure(**json.loads(structure_path.read_text()))
    else:
        saved = read_structure(structure_path)
    if saved is None:
        sys.exit(f"no aptune_structure.json at {args.structure}")
    dense_path = args.model or str(aptune.assets.minilm_path())
    torch.manual_seed(args.seed)
    dense = AutoModelForSequenceClassification.from_pretrained(
        dense_path, num_labels=2, dtype=torch.float32
    ).eval()
    pruned = aptune.compact(copy.deepcopy(dense), masks_for_shape(dense, saved.shape))
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
        "structure": saved.shape,
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


if __name__ == "__main__":
    main()
