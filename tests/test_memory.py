"""Memory the user sees on the CPU.

Weights out of a memory-mapped checkpoint (:func:`aptune.memory.copy_out_of_file_maps`): after physical
pruning no tensor uses the checkpoint's file map, so its pages leave the process; tied weights stay tied, and
outputs do not change. glibc's mmap threshold (:func:`aptune.memory.set_mmap_threshold`): freed tensors leave
the resident memory even when something allocated after them is still alive."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny_lm import tiny_causal_lm
from transformers import AutoModelForCausalLM

import aptune
from aptune.config import ConfigError
from aptune.memory import (
    DEFAULT_CPU_MMAP_THRESHOLD,
    MAX_MMAP_THRESHOLD,
    copy_out_of_file_maps,
    mmap_threshold_from_environment,
    on_glibc,
    set_mmap_threshold,
)
from aptune.train import TrainConfig


def mapped_ranges(suffix: str) -> list[tuple[int, int]]:
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5].endswith(suffix):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((start, end))
    return ranges


def in_file_map(t: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    ptr = t.untyped_storage().data_ptr()
    return any(start <= ptr < end for start, end in ranges)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_weights_leave_the_checkpoint_map_and_stay_tied(tmp_path):
    tiny_causal_lm(tie_word_embeddings=True).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ranges = mapped_ranges(".safetensors")
    # the premise: transformers hands out views of the memory-mapped checkpoint
    assert ranges and any(in_file_map(p, ranges) for p in model.parameters())
    ids = torch.tensor([[3, 5, 7, 11, 13]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    assert copy_out_of_file_maps(model) > 0
    assert not any(in_file_map(p, ranges) for p in model.parameters())
    assert copy_out_of_file_maps(model) == 0
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_compaction_leaves_nothing_in_the_checkpoint_map(tmp_path):
    tiny_causal_lm(tie_word_embeddings=True).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ranges = mapped_ranges(".safetensors")
    masks = aptune.StructuralMasks.for_model(model)
    masks.neurons[0][:8] = 0  # one layer loses some neurons: every other tensor is untouched by the slicing
    ids = torch.tensor([[3, 5, 7, 11, 13]])
    aptune.apply_masks(model, masks)
    with torch.no_grad():
        masked = model(input_ids=ids).logits
    aptune.compact(model)
    assert not any(in_file_map(p, ranges) for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, masked, atol=1e-5)


# A fresh process holds 16 tensors of 8 MiB, frees every other one and reports how much of the freed 64 MiB left
# its resident memory. With glibc's moving threshold, freeing the first mapped 8 MiB block raises the threshold
# above 8 MiB, the tensors are carved from the heap one after another, and the freed ones are holes between live
# ones, which stay resident. With a fixed threshold below 8 MiB each tensor has a mapping of its own.
FRAGMENTATION = textwrap.dedent(
    """
    import json, sys, torch
    from aptune.memory import set_mmap_threshold

    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    applied = set_mmap_threshold(int(sys.argv[1])) if int(sys.argv[1]) else False
    torch.ones(2**21).sum()  # a mapped 8 MiB block, freed
    big = [torch.ones(2**21) for _ in range(16)]  # 8 MiB each, touched
    held = rss_mb()
    del big[::2]
    print(json.dumps({"applied": applied, "returned_mb": held - rss_mb()}))
    """
)


def _fragmentation(threshold: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")}
    done = subprocess.run(
        [sys.executable, "-c", FRAGMENTATION, str(threshold)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not on_glibc(), reason="glibc's allocator")
def test_a_fixed_mmap_threshold_gives_freed_tensors_back():
    moving = _fragmentation(0)
    fixed = _fragmentation(DEFAULT_CPU_MMAP_THRESHOLD)
    assert fixed["applied"] and not moving["applied"]
    # glibc's own moving threshold keeps the freed tensors resident; the fixed one gives them back
    assert moving["returned_mb"] < 16
    assert fixed["returned_mb"] > 60


def test_mmap_threshold_checks_and_the_environment_wins(monkeypatch):
    with pytest.raises(ValueError, match="between 1 and"):
        set_mmap_threshold(0)
    with pytest.raises(ValueError, match="between 1 and"):
        set_mmap_threshold(MAX_MMAP_THRESHOLD + 1)
    calls = []
    monkeypatch.setattr("aptune.memory._glibc_function", lambda name: lambda *a: calls.append(a) or 1)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert mmap_threshold_from_environment() and not set_mmap_threshold(2**20) and not calls
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=131072")
    assert not set_mmap_threshold(2**20) and not calls
    monkeypatch.delenv("GLIBC_TUNABLES")
    assert set_mmap_threshold(2**20) and calls == [(-3, 2**20)]


def test_train_config_checks_the_threshold():
    assert TrainConfig(cpu_mmap_threshold=0).cpu_mmap_threshold == 0  # glibc's own threshold
    for bad in (-1, MAX_MMAP_THRESHOLD + 1):
        with pytest.raises(ConfigError, match="cpu_mmap_threshold"):
            TrainConfig(cpu_mmap_threshold=bad)
