"""Structured pruning of a real grouped-query-attention LLaMA (SmolLM2-135M-Instruct) with aptune's spec.

What it checks and measures, on Brown-corpus text:

1. one-shot APT salience (activation x gradient plus the kurtosis term, summed over calibration batches, as
   the paper does for LLaMA before tuning) and a budgeted selection of key/value-head units, FFN neurons
   and hidden channels at ``--density``;
2. the masked model and its physically compacted copy give the same logits (max |difference|), and so
   does the copy saved with ``save_pruned`` and loaded back with ``load_pruned``;
3. perplexity before and after pruning (no tuning: pruning alone costs accuracy; tuning is what APT adds);
4. CPU (or CUDA) inference throughput of the dense and the compacted model, median of timed runs.

Usage (writes a JSON result with the command, versions, machine and seed):

    python benchmarks/llama_structure.py --density 0.7 --out benchmarks/results/smollm2-structure-0.7.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

import aptune
from aptune.arch import describe
from aptune.assets import smollm2_path
from aptune.budget import StructureShape, count_prunable
from aptune.evaluate.speed import measure_throughput
from aptune.methods.structure import selection_masks
from aptune.salience import BlockScores, SalienceCollector, outlier_scores, with_outliers
from aptune.selection import select_blocks


def text_batches(tokenizer, path: Path, batch: int, length: int, count: int) -> list[dict[str, torch.Tensor]]:
    """``count`` batches of ``batch`` x ``length`` consecutive tokens from the documents in ``path``."""
    ids: list[int] = []
    for line in path.read_text().splitlines():
        ids += tokenizer(json.loads(line)["text"])["input_ids"]
        if len(ids) >= batch * length * count:
            break
    need = batch * length * count
    if len(ids) < need:
        raise SystemExit(f"{path} has only {len(ids)} tokens; {need} needed")
    t = torch.tensor(ids[:need]).view(count, batch, length)
    return [{"input_ids": b, "labels": b} for b in t]


def perplexity(model, batches) -> float:
    with torch.no_grad():
        losses = [float(model(**b).loss) for b in batches]
    return float(torch.tensor(losses).mean().exp())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--density", type=float, default=0.7)
    parser.add_argument("--data", default="../shared/data/brown")
    parser.add_argument("--calibration-batches", type=int, default=8)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--ffn-multiple", type=int, default=64)
    parser.add_argument("--no-hidden", action="store_true", help="keep every hidden channel")
    parser.add_argument("--speed-batch", type=int, default=8)
    parser.add_argument("--speed-length", type=int, default=128)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    data = Path(args.data)
    calibration = text_batches(
        tokenizer, data / "train.jsonl", args.batch_size, args.length, args.calibration_batches
    )
    evaluation = text_batches(
        tokenizer, data / "validation.jsonl", args.batch_size, args.length, args.eval_batches
    )
    structure = describe(model)
    shape = StructureShape.of(structure)
    dense_ppl = perplexity(model, evaluation)

    # 1. salience summed over the calibration batches (the frozen weights need grads for the hooks to fire)
    started = time.perf_counter()
    model.requires_grad_(True)
    collector = SalienceCollector(model, structure)
    heads = neurons = hidden = None
    head_inputs: list = []
    neuron_inputs: list = []
    for b in calibration:
        collector.start()
        model(**b).loss.backward()
        h_in, n_in = collector.mean_inputs()
        head_inputs = h_in if not head_inputs else [a + c for a, c in zip(head_inputs, h_in, strict=True)]
        neuron_inputs = (
            n_in if not neuron_inputs else [a + c for a, c in zip(neuron_inputs, n_in, strict=True)]
        )
        s = collector.scores()
        heads = s.heads if heads is None else [a + c for a, c in zip(heads, s.heads, strict=True)]
        neurons = s.neurons if neurons is None else [a + c for a, c in zip(neurons, s.neurons, strict=True)]
        hidden = s.hidden if hidden is None else hidden + s.hidden
        model.zero_grad(set_to_none=True)
    collector.remove()
    model.requires_grad_(False)
    # the outlier term (kurtosis of W x mean input), at the scale of the salience of each block type
    outliers = outlier_scores(structure, head_inputs, neuron_inputs)
    scored = with_outliers(BlockScores(heads, neurons, hidden), outliers, weight=1.0)
    heads, neurons, hidden = scored.heads, scored.neurons, scored.hidden
    target = int(args.density * count_prunable(shape))
    sel = select_blocks(
        shape, heads, neurons, hidden, target, ffn_multiple=args.ffn_multiple, prune_hidden=not args.no_hidden
    )
    select_s = time.perf_counter() - started

    # 2. masked == compacted == reloaded
    aptune.apply_masks(model, selection_masks(sel))
    probe = evaluation[0]
    with torch.no_grad():
        masked_logits = model(input_ids=probe["input_ids"]).logits
    masked_ppl = perplexity(model, evaluation)
    dense = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    aptune.compact(model)
    with torch.no_grad():
        compact_logits = model(input_ids=probe["input_ids"]).logits
    with tempfile.TemporaryDirectory() as tmp:
        aptune.save_pruned(model, tmp, tokenizer=tokenizer)
        loaded = aptune.load_pruned(tmp)
        with torch.no_grad():
            loaded_logits = loaded(input_ids=probe["input_ids"]).logits
        plain_loadable = aptune.read_structure(tmp).plain_loadable
    compacted_ppl = perplexity(model, evaluation)
    report = aptune.param_report(model)

    # 4. inference speed, dense vs compacted
    device = torch.device(args.device)
    speed = {}
    for name, m in (("dense", dense), ("compacted", model)):
        r = measure_throughput(
            m.to(device), batch_size=args.speed_batch, length=args.speed_length, device=device, runs=args.runs
        )
        speed[name] = r.to_dict()
    final = StructureShape.of(describe(model))
    result = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32)",
        "seed": args.seed,
        "settings": vars(args),
        "versions": {
            "aptune": aptune.__version__,
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "python": platform.python_version(),
        },
        "machine": {
            "platform": platform.platform(),
            "cpu_count": __import__("os").cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": str(device),
        },
        "dense_shape": {
            "hidden": shape.hidden,
            "heads": list(shape.heads),
            "kv_heads": list(shape.units),
            "neurons": list(shape.neurons),
        },
        "pruned_shape": {
            "hidden": final.hidden,
            "heads": list(final.heads),
            "kv_heads": list(final.units),
            "neurons": list(final.neurons),
        },
        "target_params": target,
        "prunable_params": report["prunable"],
        "prunable_before": report["prunable_before"],
        "density": report["density"],
        "selection_time_s": select_s,
        "max_abs_diff": {
            "compacted_vs_masked": float((compact_logits - masked_logits).abs().max()),
            "reloaded_vs_masked": float((loaded_logits - masked_logits).abs().max()),
        },
        "logit_scale": float(masked_logits.abs().max()),
        "plain_loadable": plain_loadable,
        "perplexity": {"dense": dense_ppl, "masked": masked_ppl, "compacted": compacted_ppl},
        "inference": speed,
        "speedup": speed["compacted"]["throughput"] / speed["dense"]["throughput"],
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
