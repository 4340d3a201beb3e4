"""Give the GPU machine a SmolLM2-135M folder with weights, from what ``prepare.py`` carried there.

    python benchmarks/gpu/lm_weights.py .gpu-lm/smollm2 OUT_FOLDER \
        [--gguf-parts .gpu-w1/smollm2.gguf.part1 .gpu-w2/smollm2.gguf.part2]

``.gpu-lm/smollm2`` holds SmolLM2's config and tokenizer only: its weights (a 98 MB 4-bit GGUF file) do not fit
in one device call's 64 MiB beside anything else, so ``prepare.py --lm-weights`` splits the file in two halves
that two calls carry in turn. With ``--gguf-parts`` the halves are joined and dequantized with transformers (the
``gguf`` package, carried as a wheel): the same weights as ``aptune.assets.smollm2_path()`` here. Without it the
weights are random (seeded): training memory and tokens/s are measured on the same architecture, but the shape APT
keeps comes from random salience. ``OUT_FOLDER/aptune_weights.txt`` says which.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a folder with SmolLM2's config.json and tokenizer files")
    parser.add_argument("out", help="the model folder to write")
    parser.add_argument("--gguf-parts", nargs="+", help="the GGUF file's parts, in order")
    parser.add_argument("--seed", type=int, default=0, help="random weights: the seed")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    source, out = Path(args.source), Path(args.out)
    if not (source / "config.json").is_file():
        print(f"lm_weights: no config.json in {source}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        if f.is_file():
            shutil.copy2(f, out / f.name)
    if args.gguf_parts:
        missing = [p for p in args.gguf_parts if not Path(p).is_file()]
        if missing:
            print(f"lm_weights: missing GGUF parts: {', '.join(missing)}", file=sys.stderr)
            return 2
        with tempfile.TemporaryDirectory() as tmp:
            whole = Path(tmp) / "model.gguf"
            with whole.open("wb") as w:
                for part in args.gguf_parts:
                    with open(part, "rb") as r:
                        shutil.copyfileobj(r, w)
            loaded = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=whole.name, dtype=torch.float32)
            state = loaded.state_dict()
        config = AutoConfig.from_pretrained(source)
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(state)
        what = "SmolLM2-135M-Instruct from its GGUF file (dequantized 4-bit weights)"
    else:
        torch.manual_seed(args.seed)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
        what = f"random (seed {args.seed}): SmolLM2's architecture, not its weights"
    model.save_pretrained(out)
    (out / "aptune_weights.txt").write_text(what + "\n")
    print(f"lm_weights: {out}: {what}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
