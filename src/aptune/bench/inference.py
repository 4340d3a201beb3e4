"""The inference child: load a saved model, time it at a fixed batch and length, write one JSON file.

    python -m aptune.bench.inference RUN/model --batch-size 128 --length 128 --dtype float32 \
        --reference DENSE_MODEL --out inf.json

It runs in its own process so its memory figures see only this model. It works in two passes:

1. The model alone: throughput is the median of timed forward passes after warm-up
   (:func:`aptune.evaluate.measure_throughput`), on random token ids with every token attended to, and
   peak memory is taken here, before anything else is loaded:

   * CUDA: ``torch.cuda.max_memory_allocated`` during the timed runs (weights, activations, workspace).
   * CPU: the process's peak resident memory during warm-up and timed runs minus its resident memory right
     after loading (the extra memory inference needs; the weights are reported apart as ``weights_mb``). The
     high-water mark is reset after loading through ``/proc/self/clear_refs``; where that is not possible
     the peak also covers loading, and ``peak_memory_kind`` says so.

2. With ``--reference`` (the dense model the bench started from): the reference is loaded as a sequence
   classifier with the model's number of labels, and the two are timed alternately, reference, model,
   reference, model, ... (:func:`aptune.evaluate.compare_throughput`), in this process at the same moment.
   ``vs_dense`` holds the median of the per-pair throughput ratios model / reference (``speedup``), their
   spread, every ratio, each model's median throughput in that pass and ``reference_path``. The memory
   figures come from pass 1 and are not affected by the second model (that pass takes twice the time).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

_KIB = 1024


def _status_mb(key: str) -> float | None:
    """A memory line of /proc/self/status (VmRSS, VmHWM) in MiB, or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / _KIB
    except (OSError, ValueError, IndexError):
        pass
    return None


def load_reference(source: str, like: Any, dtype: str = "float32") -> Any:
    """The dense model at ``source`` as a sequence classifier with ``like``'s number of labels.

    Loaded quietly: its classifier head is new, and transformers' load report saying so is not a problem
    here. A reference without a padding id takes ``like``'s (decoder classifiers need one for batches).
    """
    import torch

    from ..evaluate import quiet_transformers
    from ..train import load_classifier

    with quiet_transformers():
        model = load_classifier(source, list(range(like.config.num_labels)), dtype=getattr(torch, dtype))
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = getattr(like.config, "pad_token_id", None)
    return model.eval()


def measure_saved_model(
    path: str | Path,
    batch_size: int,
    length: int,
    dtype: str = "float32",
    device: str = "cpu",
    warmup: int = 3,
    runs: int = 10,
    seed: int = 0,
    reference: str | None = None,
) -> dict[str, Any]:
    """Throughput and peak memory of the model saved at ``path``, and with ``reference`` its interleaved
    speed-up over that dense model (see the module docstring)."""
    import torch

    from ..compact import load_pruned
    from ..evaluate import compare_throughput, measure_throughput
    from ..memory import peak_rss_mb, reset_peak_rss

    for name, value in (("batch_size", batch_size), ("length", length), ("runs", runs)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    torch_dtype = getattr(torch, dtype)
    rss_before = _status_mb("VmRSS")
    model = load_pruned(path).to(dtype=torch_dtype, device=device).eval()
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and length > max_positions:
        raise ValueError(f"inference length {length} exceeds the model's {max_positions} positions")
    weights_mb = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 2**20
    rss_after = _status_mb("VmRSS")
    reset = reset_peak_rss()
    speed = measure_throughput(
        model, batch_size=batch_size, length=length, warmup=warmup, runs=runs, device=device, seed=seed
    )
    result: dict[str, Any] = {
        **speed.to_dict(),
        "warmup": warmup,
        "runs": runs,
        "weights_mb": weights_mb,
        "torch_threads": torch.get_num_threads(),
    }
    if speed.peak_memory_mb is not None:
        result["peak_memory_kind"] = "cuda_max_allocated"
    else:
        peak = peak_rss_mb()
        result.update(
            rss_before_load_mb=rss_before,
            rss_after_load_mb=rss_after,
            peak_rss_mb=peak,
            peak_memory_mb=peak - rss_after if rss_after is not None else peak,
            peak_memory_kind=(
                "rss_peak_minus_after_load"
                if reset and rss_after is not None
                else "process_peak_rss_including_loading"
            ),
        )
    if reference is not None:  # after the memory figures: they see the model alone
        dense = load_reference(reference, model, dtype).to(device)
        comparison = compare_throughput(
            dense, model, batch_size, length, warmup=warmup, runs=runs, device=device, seed=seed
        )
        result["vs_dense"] = {**comparison.to_dict(), "reference_path": str(reference)}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m aptune.bench.inference", description=__doc__.split("\n")[0]
    )
    parser.add_argument("model", help="a folder saved by aptune train (OUTPUT/model)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--reference",
        help="the dense model to compare with (interleaved runs, same process); default: no comparison",
    )
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    for name in ("batch_size", "length", "runs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    result = measure_saved_model(
        args.model,
        args.batch_size,
        args.length,
        args.dtype,
        args.device,
        args.warmup,
        args.runs,
        args.seed,
        reference=args.reference,
    )
    Path(args.out).write_text(json.dumps(result, indent=2))
    text = f"throughput {result['throughput']:.1f}/s, peak memory {result['peak_memory_mb']:.1f} MiB"
    if "vs_dense" in result:
        from ..evaluate import format_speedup

        vs = result["vs_dense"]
        text += f", vs dense {format_speedup(vs['speedup'], vs['spread'], vs['runs'])}"
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
