"""Prefill throughput of a dense causal LM against a uniformly pruned shape of it, with the logits of the last
position only (``logits_to_keep=1``, what a serving runtime computes for a prompt) and with every position's
logits (what a training forward computes), timed alternately.

    python benchmarks/lm_prefill_speed.py --model smollm2 --ffn 896 --out benchmarks/results/smollm2-prefill.json

Speed does not depend on the weight values, so both models are built from the dense model's config with random
weights: the pruned one keeps ``--kv-heads`` key/value groups (default: all) and ``--ffn`` FFN neurons in every
layer, the hidden size unchanged (the decoder default). The default shape is the one APT chose for SmolLM2-135M at
density 0.7 (benchmarks/results/smollm2-lm-cpu/density-0.7, ``apt-uniform``: every head, FFN 896 of 1536;
density 0.688).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch
import transformers

import aptune
from aptune.assets import packaged_path
from aptune.budget import param_report
from aptune.evaluate import compare_throughput


def build(config: transformers.PretrainedConfig, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", default="smollm2", help="a model folder or a packaged name (its config only)"
    )
    parser.add_argument("--ffn", type=int, default=896, help="FFN neurons kept in every layer")
    parser.add_argument(
        "--kv-heads", type=int, default=None, help="key/value groups kept per layer (default all)"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    path = packaged_path(args.model) or Path(args.model)
    config = transformers.AutoConfig.from_pretrained(path)
    dense = build(config)
    small_config = transformers.AutoConfig.from_pretrained(path)
    small_config.intermediate_size = args.ffn
    if args.kv_heads is not None:
        group = config.num_attention_heads // config.num_key_value_heads
        small_config.head_dim = (
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        small_config.num_key_value_heads = args.kv_heads
        small_config.num_attention_heads = args.kv_heads * group
    small = build(small_config)
    density = param_report(small)["prunable"] / param_report(dense)["prunable"]

    def last_logits(m, ids, mask):
        return m(input_ids=ids, attention_mask=mask, logits_to_keep=1)

    def all_logits(m, ids, mask):
        return m(input_ids=ids, attention_mask=mask)

    load = {"start": os.getloadavg()}
    rows = {}
    with torch.no_grad():
        for name, call in (("last_position_logits", last_logits), ("all_position_logits", all_logits)):
            result = compare_throughput(
                dense, small, args.batch_size, args.length, warmup=args.warmup, runs=args.runs, call=call
            )
            rows[name] = result.report()
            print(f"{name}: speed-up {result.speedup:.3f}x", flush=True)
    load["end"] = os.getloadavg()
    out = {
        "command": " ".join([sys.executable, *sys.argv]),
        "model": str(path),
        "shape": {
            "ffn": args.ffn,
            "kv_heads": args.kv_heads or config.num_key_value_heads,
            "dense_ffn": config.intermediate_size,
            "dense_kv_heads": config.num_key_value_heads,
        },
        "density": density,
        "batch_size": args.batch_size,
        "length": args.length,
        "results": rows,
        "load_average": load,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "aptune": aptune.__version__,
        },
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
        },
        "seed": 0,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
