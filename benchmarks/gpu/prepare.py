"""Stage what a lent GPU machine needs for the GPU benchmarks, under ``.gpu/`` in the repository root.

The device machine has PyTorch, transformers, accelerate, peft and matplotlib but no package registry and no
``../shared``. This writes, once, on the development machine:

* ``.gpu/minilm``: the packaged all-MiniLM-L6-v2 saved in fp16 safetensors (about 45 MB; aptune loads it as
  fp32), with its tokenizer;
* ``.gpu/data/rt-polarity``: a copy of the rt-polarity splits;

and adds ``/.gpu/`` to ``.git/info/exclude`` so the folder is never committed. Name ``.gpu`` in the device
tool's ``carry``. The commands to run there are in ``docs/bench.md`` ("On a lent GPU machine").

Usage: python benchmarks/gpu/prepare.py [--data ../shared/data/rt-polarity]
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
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    raise SystemExit(main())
