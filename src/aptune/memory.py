"""Handing freed memory back to the system after a structural change.

After physical pruning the old, larger tensors are garbage, but the allocators keep their memory: CUDA's
caching allocator holds the blocks for reuse, and glibc's heap keeps freed chunks mapped. What a user sees in
``nvidia-smi`` or ``top`` then follows the dense model, not the pruned one. :func:`release_memory` returns what
is free: Python's cycles are collected, CUDA's unused cached blocks are released, and on Linux with glibc
``malloc_trim(0)`` gives free heap pages back to the kernel.

One more holder: on the CPU, transformers memory-maps a safetensors checkpoint, so the loaded weights are the
file's pages, resident once touched (a forward pass touches them all), and the mapping lives as long as any
tensor uses it. Pruning replaces most weights by smaller copies, yet the embeddings and the untouched norms
still use the mapping, so the dense checkpoint stayed resident beside its pruned copy: SmolLM2 pruned to 70 %
held its 513 MiB of file pages besides the pruned weights. :func:`copy_out_of_file_maps` (run at the end
of every physical removal, :func:`aptune.compact.compact`) copies the tensors still in a mapping, whose last
user then drops it. Loading stays free (no copy until something is pruned); on a GPU there is nothing to do.

The heap itself: glibc serves an allocation from a mapping of its own (returned to the system when freed) only
above its mmap threshold, and by default that threshold moves. It starts at 128 KiB and, each time a mapped
block is freed, rises to that block's size (up to 32 MiB). After the first training step has freed a 12 MiB
activation, every tensor up to 12 MiB is carved from the heap. Pruning changes the tensors' sizes at each
checkpoint (per-layer widths give every layer sizes of its own), freed blocks of the old sizes are split and
scattered, and the heap's resident pages grow far past the live tensors: MiniLM pruned to 40 % peaked at
2237 MiB RSS while a ``malloc_trim`` at the end left 602. :func:`set_mmap_threshold` fixes the threshold
(what ``MALLOC_MMAP_THRESHOLD_`` does), so the activation-sized tensors come from mappings of their own and go
back when freed; the same run then peaked at 1543 MiB, in the same training time. ``aptune train`` sets it
for CPU runs (``TrainConfig.cpu_mmap_threshold``), unless the user has set it in the environment.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import sys

import torch

_libc = None
M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
MAX_MMAP_THRESHOLD = 32 * 2**20  # glibc refuses larger thresholds on 64-bit systems
DEFAULT_CPU_MMAP_THRESHOLD = 4 * 2**20  # aptune train on the CPU: tensors of 4 MiB or more get a mapping


def on_glibc() -> bool:
    """Whether this process runs on glibc, whose allocator the functions here tune (Linux, not musl)."""
    try:
        return sys.platform.startswith("linux") and (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith(
            "glibc"
        )
    except (ValueError, OSError, AttributeError):
        return False


def _glibc_function(name: str):
    """A function of glibc, or None off glibc or where it has no such function."""
    global _libc
    if not on_glibc():
        return None
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        except OSError:
            _libc = False
    return getattr(_libc, name, None) if _libc else None


def _malloc_trim() -> bool:
    trim = _glibc_function("malloc_trim")
    if trim is None:
        return False
    return bool(trim(0))


def mmap_threshold_from_environment() -> bool:
    """Whether the user set glibc's mmap threshold for this process (``MALLOC_MMAP_THRESHOLD_`` or
    ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=...``)."""
    return "MALLOC_MMAP_THRESHOLD_" in os.environ or "glibc.malloc.mmap_threshold" in os.environ.get(
        "GLIBC_TUNABLES", ""
    )


def set_mmap_threshold(nbytes: int) -> bool:
    """Fix glibc's mmap threshold at ``nbytes`` for the rest of the process (see the module's docstring); True
    when it was set. Allocations of at least ``nbytes`` then get a mapping of their own, unmapped when freed,
    so the process's resident memory follows its live tensors instead of the heap's high-water mark. It also
    stops glibc from moving the threshold. Nothing is changed off glibc, or where the user set the threshold
    in the environment (their setting wins)."""
    if not 0 < nbytes <= MAX_MMAP_THRESHOLD:
        raise ValueError(f"the mmap threshold must be between 1 and {MAX_MMAP_THRESHOLD} bytes, got {nbytes}")
    if mmap_threshold_from_environment():
        return False
    mallopt = _glibc_function("mallopt")
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, int(nbytes)))


def release_memory() -> None:
    """Collect garbage and return unused allocator memory to the system (CUDA cache, glibc heap)."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    _malloc_trim()


def _file_maps() -> list[tuple[int, int]]:
    """Address ranges of this process's file-backed mappings (Linux; elsewhere none)."""
    try:
        with open("/proc/self/maps") as maps:
            lines = maps.readlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/") and fields[4] != "0":  # a path and an inode
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


@torch.no_grad()
def copy_out_of_file_maps(model: torch.nn.Module) -> int:
    """Give every CPU parameter and buffer of ``model`` that lies in a file mapping (a memory-mapped
    checkpoint) memory of its own; return how many were copied. Tied weights stay tied (a shared parameter is
    one object, copied once)."""
    ranges = _file_maps()
    if not ranges:
        return 0

    def mapped(t: torch.Tensor) -> bool:
        if t.device.type != "cpu" or t.numel() == 0:
            return False
        ptr = t.untyped_storage().data_ptr()
        return any(start <= ptr < end for start, end in ranges)

    copied = 0
    for p in model.parameters():
        if mapped(p):
            p.data = p.data.clone()
            copied += 1
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and mapped(buffer):
                module._buffers[name] = buffer.clone()
                copied += 1
    return copied


def peak_rss_mb() -> float:
    """The process's peak resident memory since it started or since :func:`reset_peak_rss`, in MiB."""
    import resource

    scale = 2**20 if sys.platform == "darwin" else 2**10  # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def reset_peak_rss() -> bool:
    """Reset the resident-memory high-water mark to the current RSS through ``/proc/self/clear_refs`` (Linux
    4.0 and later; it resets ``ru_maxrss`` too); False where that cannot be done."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def peak_memory_mb(device: torch.device) -> float:
    """The peak since the start or the last :func:`reset_peak_memory`: CUDA max allocated on a GPU, the process's
    peak resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak for :func:`peak_memory_mb`; False where that cannot be done (a CPU other than Linux's)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    return reset_peak_rss()
