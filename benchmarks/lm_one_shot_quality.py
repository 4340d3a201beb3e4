"""How much a one-shot prune costs before any tuning: validation perplexity of SmolLM2-135M on brown right
after pruning to a density, for each pruning criterion, against the dense model.

    MALLOC_MMAP_THRESHOLD_=1048576 python benchmarks/lm_one_shot_quality.py --density 0.7 --out results.json

Criteria: APT's salience (activation x gradient summed over calibration rows) with and without the kurtosis
outlier term, APT with ``one_shot_salience="taylor"`` (its one-row scoring passes, heads and neurons scored by
``|w * dL/dw|``), and LLM-Pruner's first-order Taylor importance (|w * dL/dw| summed over each block's weights,
one pass per batch), each on the same 32 calibration batches of 4 x 128 tokens (the ``cpu-lm`` bench preset's
data), per-layer shape. ``--criteria`` picks some of them. Perplexity: the validation split's packed 128-token
blocks, token weighted (the first ``--blocks``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import shlex
import sys
import time
from pathlib import Path

# name: (kurtosis term, APT's one_shot_salience); None: not an APT criterion
CRITERIA = {
    "apt salience + kurtosis": (True, "activation"),
    "apt salience": (False, "activation"),
    "apt taylor": (False, "taylor"),
    "llm-pruner taylor": (False, None),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--density", type=float, default=0.7)
    parser.add_argument("--batches", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=96, help="validation blocks scored")
    parser.add_argument(
        "--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "brown")
    )
    parser.add_argument("--out", default=None)
    parser.add_argument("--criteria", nargs="+", default=list(CRITERIA), choices=list(CRITERIA))
    args = parser.parse_args(argv)

    import torch
    import transformers

    import aptune
    from aptune.config import APTConfig
    from aptune.controller import APTController
    from aptune.methods.llm_pruner.importance import taylor_scores
    from aptune.methods.structure import prune_to_budget
    from aptune.tasks.causal_lm import labelled_perplexity
    from aptune.train import TrainConfig, prepare

    torch.manual_seed(0)
    config = TrainConfig(model="smollm2", data=args.data, max_length=128, batch_size=4, progress=False)
    prepared = prepare(config)
    path = prepared.model_path
    validation = list(itertools.islice(prepared.loaders["validation"], args.blocks // 4))

    def calibration():
        return itertools.islice(prepared.loaders["calibration"], args.batches)

    def fresh():
        return prepared.task.load_model(path, prepared.data).train()

    results = {}
    started = time.perf_counter()
    results["dense"] = {"perplexity": labelled_perplexity(fresh(), validation), "density": 1.0}
    for name, (kurtosis, salience) in CRITERIA.items():
        if name not in args.criteria or salience is None:
            continue
        model = fresh()
        apt = APTConfig(
            target_density=args.density,
            use_kurtosis=kurtosis,
            one_shot_batches=args.batches,
            one_shot_salience=salience,
            shape="per-layer",  # like prune_to_budget below: the criteria differ, not the shapes
        )
        controller = APTController(model, apt, total_steps=100, steps_per_epoch=1000)
        controller.calibrate(calibration())
        model = controller.finish()
        results[name] = {
            "perplexity": labelled_perplexity(model, validation),
            "density": controller.density(),
        }
        print(name, results[name], flush=True)
    if "llm-pruner taylor" in args.criteria:
        model = fresh()
        heads, neurons = taylor_scores(model, calibration())
        prune_to_budget(model, heads, neurons, args.density, 64)
        results["llm-pruner taylor"] = {
            "perplexity": labelled_perplexity(model, validation),
            "density": aptune.param_report(model)["density"],
        }
        print("llm-pruner taylor", results["llm-pruner taylor"], flush=True)
    out = {
        "command": shlex.join([sys.executable.split("/")[-1], *sys.argv]),
        "density": args.density,
        "calibration": f"{args.batches} batches of 4 x 128 tokens (APT scores one row per pass)",
        "validation_tokens_scored": f"first {args.blocks} blocks of 128 tokens",
        "results": results,
        "seconds": time.perf_counter() - started,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "aptune": aptune.__version__,
        },
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
        },
        "seed": 0,
    }
    print(json.dumps(out, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
