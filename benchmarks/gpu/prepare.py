"""Stage what a lent GPU machine needs for the GPU benchmarks, under ``.gpu/`` in the repository root.

The device machine has PyTorch, transformers, accelerate, peft and matplotlib but no package registry and no
``../shared``. This writes, once, on the development machine:

* ``.gpu/minilm``: the packaged all-MiniLM-L6-v2 saved in fp16 safetensors (about 45 MB; aptune loads it as
  fp32), with its tokenizer;
* ``.gpu/data/rt-polarity``: a copy of the rt-polarity splits;

and adds ``/.gpu/`` to ``.git/info/exclude`` so the folder is never committed. Name ``.gpu`` in the device
tool's ``carry``. The commands to run there are in ``docs/bench.md`` ("On a lent GPU machine").

Usage: python benchmarks/gpu/prepare.py [--data ../shared/data/rt-polarity]

``--tiny --out DIR`` writes the same layout for ``benchmarks/gpu/run.sh --dry-run``: a randomly initialised
2-layer BERT with MiniLM's tokenizer in ``DIR/minilm``, its config as ``DIR/tiny-bert-config.json``, and the
first 256/64/64 rows of each split in ``DIR/data/rt-polarity``.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "rt-polarity"))
    parser.add_argument("--out", default=str(ROOT / ".gpu"))
    parser.add_argument("--tiny", action="store_true", help="a tiny random model and data for a dry run")
    args = parser.parse_args(argv)
    if args.tiny:
        return write_tiny(Path(args.out), Path(args.data))
    from safetensors.torch import load_file, save_file

    from aptune.assets import minilm_path

    out = Path(args.out)
    source = minilm_path()
    # the same folder with every floating tensor in fp16: config and tokenizer files are copied as they are
    (out / "minilm").mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copy2(f, out / "minilm" / f.name)
    tensors = load_file(str(source / "model.safetensors"))
    half = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(half, str(out / "minilm" / "model.safetensors"), metadata={"format": "pt"})
    data = Path(args.data)
    if not (data / "train.jsonl").is_file():
        raise SystemExit(f"no rt-polarity splits in {data}; pass --data FOLDER")
    shutil.copytree(data, out / "data" / "rt-polarity", dirs_exist_ok=True)
    exclude = ROOT / ".git" / "info" / "exclude"
    if exclude.parent.is_dir():
        lines = exclude.read_text().splitlines() if exclude.is_file() else []
        if "/.gpu/" not in lines:
            exclude.write_text("\n".join([*lines, "/.gpu/"]) + "\n")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
    print(f"wrote {out} ({size:.1f} MiB); carry it as '.gpu'")
    return 0


def write_tiny(out: Path, data: Path) -> int:
    """A 2-layer random BERT with MiniLM's tokenizer and a slice of rt-polarity (dry runs on the CPU)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from aptune.assets import minilm_path

    if not (data / "train.jsonl").is_file():
        raise SystemExit(f"no rt-polarity splits in {data}; pass --data FOLDER")
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, num_labels=2
    )
    (out / "minilm").mkdir(parents=True, exist_ok=True)
    BertForSequenceClassification(config).save_pretrained(out / "minilm")
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(out / "minilm")
    config.to_json_file(out / "tiny-bert-config.json")
    (out / "data" / "rt-polarity").mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", 256), ("validation", 64), ("test", 64)):
        lines = (data / f"{split}.jsonl").read_text().splitlines()[:rows]
        (out / "data" / "rt-polarity" / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    print(f"wrote a tiny model and data to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
