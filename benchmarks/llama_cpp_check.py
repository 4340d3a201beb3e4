"""Does a pruned causal LM that aptune saved run in llama.cpp, and compute what transformers computes?

    python benchmarks/llama_cpp_check.py PRUNED_DIR [PRUNED_DIR ...] --dense smollm2 \
        --convert path/to/llama.cpp/convert_hf_to_gguf.py --out benchmarks/results/llama-cpp-smollm2.json

Needs llama.cpp's converter script (``convert_hf_to_gguf.py``, with ``pip install gguf``) and its Python bindings
(``pip install llama-cpp-python``, which builds llama.cpp). The model is converted to GGUF in float32, as any
user of llama.cpp converts a Hugging Face folder, and loaded by llama.cpp. On the same token ids (the folder's
own tokenizer, so both runtimes see the same input) it compares, against transformers in float32:

* every position's logits, teacher-forced: the largest absolute difference, relative to the logits' spread, and
  how often the top token agrees;
* greedy decoding of ``--new-tokens`` tokens from each prompt: whether the tokens are identical;

each with llama.cpp's default float16 KV cache, as users run it, and with a float32 one, which computes what
transformers computes up to the order of additions.

``--dense`` runs the same comparison on the dense model, which shows what agreement to expect of two runtimes
that add up the same numbers in a different order. ``--drop-kv-group G`` also removes key/value group ``G`` (with
its query heads) from every layer of the pruned model, through ``aptune.compact`` and ``aptune.save_pruned``,
and checks that shape too: grouped-query attention with fewer groups than the original.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
import transformers

import aptune
from aptune.assets import packaged_path

PROMPTS = [
    "The history of the city begins in the twelfth century, when",
    "To make a good cup of tea, first",
    "In mathematics, a prime number is",
    "She opened the letter and read",
]


def convert(folder: Path, script: Path, out: Path) -> Path:
    """``folder`` (a Hugging Face model folder) as a float32 GGUF file, with llama.cpp's own converter."""
    target = out / f"{folder.name}-f32.gguf"
    cmd = [sys.executable, str(script), str(folder), "--outtype", "f32", "--outfile", str(target)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"convert_hf_to_gguf.py failed on {folder}:\n{done.stderr[-3000:]}")
    return target


def drop_kv_group(folder: Path, group: int, out: Path) -> Path:
    """``folder``'s model without key/value group ``group`` in any layer, saved by aptune to ``out``."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    masks = aptune.StructuralMasks.for_model(model)
    for site, heads in enumerate(masks.heads):
        keep = torch.ones_like(heads)
        keep[group] = 0
        masks.set_heads(site, keep)
    aptune.compact(model, masks)
    aptune.save_pruned(model, out, tokenizer=transformers.AutoTokenizer.from_pretrained(folder))
    return out


def _agreement(llm, model, tokenizer, new_tokens: int) -> dict:
    """Teacher-forced logits and greedy decoding of every prompt: llama.cpp (``llm``) against transformers."""
    worst_relative, agree, positions, greedy_equal = 0.0, 0, 0, []
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            want = model(torch.tensor([ids])).logits[0].numpy()
        llm.reset()
        llm.eval(ids)
        got = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
        spread = float(want.max() - want.min())
        worst_relative = max(worst_relative, float(np.abs(got - want).max()) / spread)
        agree += int((got.argmax(-1) == want.argmax(-1)).sum())
        positions += len(ids)
        with torch.no_grad():
            hf = model.generate(
                torch.tensor([ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
            )[0, len(ids) :].tolist()
        llm.reset()
        llm.eval(ids)
        cpp = []
        for _ in range(new_tokens):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            cpp.append(token)
            llm.eval([token])
        greedy_equal.append(hf == cpp)
    return {
        "logits_max_abs_diff_over_spread": worst_relative,
        "top_token_agreement": agree / positions,
        "positions": positions,
        "greedy_tokens_identical": greedy_equal,
    }


# llama.cpp's KV cache: its default (float16), and float32 (GGML_TYPE_F32 = 0), which keeps keys and values exact
KV_CACHES = {"f16 (default)": {}, "f32": {"type_k": 0, "type_v": 0}}


def compare(folder: Path, script: Path, work: Path, new_tokens: int, threads: int) -> dict:
    from llama_cpp import Llama

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    gguf = convert(folder, script, work)
    config = model.config
    result = {
        "folder": str(folder),
        "architecture": type(model).__name__,
        "gguf_mib": round(gguf.stat().st_size / 2**20, 1),
        "shape": {
            "layers": config.num_hidden_layers,
            "heads": config.num_attention_heads,
            "kv_heads": config.num_key_value_heads,
            "head_dim": getattr(config, "head_dim", None),
            "ffn": config.intermediate_size,
            "hidden": config.hidden_size,
        },
        "parameters": sum(p.numel() for p in model.parameters()),
        "new_tokens": new_tokens,
        "kv_cache": {},
    }
    for name, options in KV_CACHES.items():
        llm = Llama(str(gguf), n_ctx=256, logits_all=True, n_threads=threads, verbose=False, **options)
        result["kv_cache"][name] = _agreement(llm, model, tokenizer, new_tokens)
        llm.close()
    return result


def _name(folder: Path) -> str:
    """A run's name: ``runs/x/model`` is ``x``."""
    return folder.parent.name if folder.name == "model" else folder.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "pruned", nargs="+", help="pruned causal LM folders that aptune saved (uniform shape)"
    )
    parser.add_argument("--dense", help="the dense model folder or packaged name, compared the same way")
    parser.add_argument("--convert", required=True, help="llama.cpp's convert_hf_to_gguf.py")
    parser.add_argument(
        "--drop-kv-group", type=int, help="also check the first pruned model without this group"
    )
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", help="write the result here (JSON)")
    args = parser.parse_args()
    script = Path(args.convert)
    if not script.is_file():
        parser.error(f"--convert: no such file: {script}")
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        parser.error("llama.cpp's Python bindings are missing: pip install llama-cpp-python")
    missing = [p for p in args.pruned if not Path(p).is_dir()]
    if missing:
        parser.error(f"no such model folder: {', '.join(missing)}")
    folders = {_name(Path(p)): Path(p) for p in args.pruned}
    first = next(iter(folders.values()))
    if args.dense:
        dense = Path(args.dense) if Path(args.dense).is_dir() else packaged_path(args.dense)
        if dense is None:
            parser.error(f"--dense: neither a folder nor a packaged model: {args.dense}")
        folders["dense"] = Path(dense)
    result: dict = {
        "command": " ".join(["python", "benchmarks/llama_cpp_check.py", *sys.argv[1:]]),
        "converter": "llama.cpp's convert_hf_to_gguf.py (with its own gguf-py), --outtype f32",
    }
    with tempfile.TemporaryDirectory() as work:
        if args.drop_kv_group is not None:
            folders[f"{_name(first)}, kv group {args.drop_kv_group} removed"] = drop_kv_group(
                first, args.drop_kv_group, Path(work) / "fewer-kv-groups"
            )
        for name, folder in folders.items():
            result[name] = compare(folder, script, Path(work), args.new_tokens, args.threads)
            for cache, r in result[name]["kv_cache"].items():
                print(
                    f"{name} {result[name]['shape']}, KV cache {cache}: top token agrees at "
                    f"{r['top_token_agreement']:.3f} of {r['positions']} positions, max |diff| "
                    f"{r['logits_max_abs_diff_over_spread']:.2e} of the logits' spread, greedy identical "
                    f"{sum(r['greedy_tokens_identical'])}/{len(PROMPTS)}",
                    flush=True,
                )
    result["versions"] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "aptune": aptune.__version__,
        "llama-cpp-python": metadata.version("llama-cpp-python"),
        "python": platform.python_version(),
    }
    result["machine"] = {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    result["seed"] = None  # no randomness: greedy decoding of fixed prompts
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
