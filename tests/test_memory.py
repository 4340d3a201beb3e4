"""Weights out of a memory-mapped checkpoint (:func:`aptune.memory.copy_out_of_file_maps`): after physical
pruning no tensor uses the checkpoint's file map, so its pages leave the process; tied weights stay tied, and
outputs do not change."""

from __future__ import annotations

import sys

import pytest
import torch
from tiny_lm import tiny_causal_lm
from transformers import AutoModelForCausalLM

import aptune
from aptune.memory import copy_out_of_file_maps


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
