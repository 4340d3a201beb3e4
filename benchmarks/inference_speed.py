"""Inference throughput of a dense model vs a pruned shape of it, at several batch sizes and lengths.

    python benchmarks/inference_speed.py --structure runs/demo/model/aptune_structure.json \
        --batch-sizes 32 --lengths 64 128 --device cpu --out benchmarks/results/speed.json
    python benchmarks/inference_speed.py --dense-config bert-base --uniform-density 0.4 \
        --batch-sizes 512 --lengths 128 --device cuda --dtypes bfloat16 --out speed-bert-base.json

The pruned model is the dense one cut to the saved shape plan (``aptune_structure.json``), or, with
``--uniform-density`` (one or several densities), to the same number of heads and of FFN neurons (a multiple of
``--ffn-multiple``) in every layer, hidden size kept, as large as fits the density. ``--scale-to-dense`` scales a
saved plan to the dense model first: each layer keeps the same fractions of its heads and FFN neurons, and the
model the same fraction of its hidden channels, as the saved plan kept of its own base model (layers are mapped
in proportion when the depths differ), so the shape APT chose for MiniLM can be timed on a BERT-base. Speed does not depend on the weight values, so
only the structure file is needed, and ``--dense-config bert-base`` builds a randomly initialised BERT-base
(hidden 768, 12 layers, 12 heads, FFN 3072) when no such weights are at hand.

For every row the two models are warmed up, then timed alternately, dense, pruned, dense, pruned, ...
(:func:`aptune.evaluate.compare_throughput`), so a change in machine load lands on both. Each row reports
each model's median throughput and the median of the per-pair speed-ups (pruned / dense) with their spread
(min, quartiles, max). The load average at the start and end of the run is written too.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForSequenceClassification

import aptune
import aptune.assets
from aptune.budget import StructureShape, count_prunable
from aptune.compact import SavedStructure, masks_for_shape, read_structure
from aptune.evaluate import compare_throughput, format_speedup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--structure", help="aptune_structure.json of a pruned model (or its folder)")
    parser.add_argument(
        "--uniform-density", type=float, nargs="+", help="instead of --structure: prune layers alike"
    )
    parser.add_argument(
        "--scale-to-dense", action="store_true", help="scale the --structure plan to the dense model's sizes"
    )
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
    parser.add_argument("--runs", type=int, default=10, help="timed pairs (dense, pruned) per row")
    parser.add_argument("--warmup", type=int, default=3, help="untimed passes of each model per row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    if (args.structure is None) == (args.uniform_density is None):
        sys.exit("pass exactly one of --structure and --uniform-density")
    if args.runs < 1 or args.warmup < 0:
        sys.exit(f"--runs must be >= 1 and --warmup >= 0, got {args.runs} and {args.warmup}")
    load_at_start = load_average()
    torch.manual_seed(args.seed)
    dense = dense_model(args).eval()
    shapes: list[tuple[str, dict]] = []
    if args.structure is not None:
        structure_path = Path(args.structure)
        if structure_path.is_file():
            saved = SavedStructure(**json.loads(structure_path.read_text()))
        else:
            saved = read_structure(structure_path)
        if saved is None:
            sys.exit(f"no aptune_structure.json at {args.structure}")
        shape = saved.shape
        if args.scale_to_dense:
            base = StructureShape.of(aptune.describe(dense))
            shape = scale_shape(
                StructureShape.from_plan(saved.shape), StructureShape.from_plan(saved.base_shape), base
            ).plan_dict()
        shapes.append((str(args.structure), shape))
    else:
        for d in args.uniform_density:
            if not 0 < d <= 1:
                sys.exit(f"--uniform-density must be in (0, 1], got {d}")
            shapes.append((f"uniform-{d:g}", uniform_shape(dense, d, args.ffn_multiple).plan_dict()))
    rows = []
    densities = []
    for label, shape in shapes:
        pruned = aptune.compact(copy.deepcopy(dense), masks_for_shape(dense, shape))
        density = aptune.param_report(pruned)["density"]
        densities.append({"shape": label, "density": density, "structure": shape})
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            for batch in args.batch_sizes:
                for length in args.lengths:
                    c = compare_throughput(
                        dense,
                        pruned,
                        batch,
                        length,
                        warmup=args.warmup,
                        runs=args.runs,
                        device=args.device,
                        dtype=dtype,
                        seed=args.seed,
                    )
                    row = {
                        "shape": label,
                        "density": density,
                        "dtype": dtype_name,
                        "batch_size": batch,
                        "length": length,
                        "dense_per_s": c.reference.throughput,
                        "pruned_per_s": c.candidate.throughput,
                        "speedup": c.speedup,  # median of the per-pair ratios pruned / dense
                        "speedup_spread": asdict(c.spread),
                        "ratios": c.ratios,
                        "dense_peak_mb": c.reference.peak_memory_mb,
                        "pruned_peak_mb": c.candidate.peak_memory_mb,
                    }
                    rows.append(row)
                    print(
                        f"{label} (density {density:.3f}) {dtype_name:8} batch {batch:4} length {length:4}: "
                        f"dense {c.reference.throughput:9.1f}/s  pruned {c.candidate.throughput:9.1f}/s  "
                        f"speed-up {format_speedup(c.speedup, c.spread, c.runs)}",
                        flush=True,
                    )
        del pruned
    result = {
        "command": " ".join(["python", *sys.argv]),
        "dense": args.dense_config or args.model or "all-MiniLM-L6-v2",
        "structure": shapes[0][1],  # the first (or only) shape, as in earlier result files
        "density": densities[0]["density"],
        "shapes": densities,
        "seed": args.seed,
        "method": "interleaved: dense and pruned alternate run by run after warm-up of both; speedup is the "
        "median of the per-pair throughput ratios pruned / dense",
        "warmup": args.warmup,
        "runs": args.runs,
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
            "load_average_at_start": load_at_start,  # 1, 5 and 15 minutes; CPU timings mean little when busy
            "load_average_at_end": load_average(),
        },
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the platform has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


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


def scale_shape(shape: StructureShape, base: StructureShape, target: StructureShape) -> StructureShape:
    """``shape`` (a pruned form of ``base``) carried over to ``target``: the same kept fractions per layer.

    Layer ``i`` of ``target`` takes the fractions of layer ``i * len(base) // len(target)`` of the plan; head
    units round to the nearest count (at least one where the plan kept any), FFN widths to the nearest multiple
    of the scale factor (an aligned width stays aligned when both models' widths are), hidden channels likewise.
    """

    def fraction(kept: int, total: int) -> float:
        return kept / total if total else 0.0

    def scaled(kept: int, total: int, new_total: int) -> int:
        if kept == 0:
            return 0
        if kept == total:
            return new_total
        factor = max(1, new_total // total) if new_total % total == 0 else 1
        return min(new_total, max(factor, round(fraction(kept, total) * new_total / factor) * factor))

    n_base, n_target = len(base.attention), len(target.attention)
    source = [i * n_base // n_target for i in range(n_target)]
    attention = tuple(
        t.with_units(scaled(shape.attention[j].kv_heads, base.attention[j].kv_heads, t.kv_heads))
        for t, j in zip(target.attention, source, strict=True)
    )
    ffn = tuple(
        replace(t, neurons=scaled(shape.ffn[j].neurons, base.ffn[j].neurons, t.neurons))
        for t, j in zip(target.ffn, source, strict=True)
    )
    return StructureShape(max(1, scaled(shape.hidden, base.hidden, target.hidden)), attention, ffn)


if __name__ == "__main__":
    main()
