"""Handing freed memory back to the system after a structural change.

After physical pruning the old, larger tensors are garbage, but the allocators keep their memory: CUDA's
caching allocator holds the blocks for reuse, and glibc's heap keeps freed chunks mapped. What a user sees in
``nvidia-smi`` or ``top`` then follows the dense model, not the pruned one. :func:`release_memory` returns what
is free: Python's cycles are collected, CUDA's unused cached blocks are released, and on Linux with glibc
``malloc_trim(0)`` gives free heap pages back to the kernel.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys

import torch

_libc = None


def _malloc_trim() -> bool:
    global _libc
    if not sys.platform.startswith("linux"):
        return False
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        except OSError:
            _libc = False
    trim = getattr(_libc, "malloc_trim", None) if _libc else None
    if trim is None:
        return False
    return bool(trim(0))


def release_memory() -> None:
    """Collect garbage and return unused allocator memory to the system (CUDA cache, glibc heap)."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    _malloc_trim()
