"""Bad input gets an error that says what is wrong; the CLI prints one line for it."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model
from transformers import GPT2Config, GPT2LMHeadModel

import aptune
from aptune.cli import main


def test_non_binary_mask_at_compaction():
    model = tiny_model("BertForSequenceClassification")
    masks = aptune.StructuralMasks.for_model(model)
    masks.set_heads(0, [1.0, 0.5, 1.0, 0.0])
    with pytest.raises(aptune.MaskError, match=r"binary.*0\.5"):
        aptune.compact(model, masks)


def test_unsupported_model_family_names_the_supported_ones():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(aptune.UnsupportedModelError, match=r"GPT2LMHeadModel.*supported families: bert"):
        aptune.describe(model)


def test_unsupported_head_names_the_supported_heads():
    model = tiny_model("BertForMaskedLM")
    with pytest.raises(aptune.UnsupportedModelError, match=r"BertForMaskedLM.*BertForSequenceClassification"):
        aptune.StructuralMasks.for_model(model)


@pytest.mark.parametrize(
    ("setter", "args", "message"),
    [
        ("set_heads", (0, [1, 0, 1]), "head mask for attention site 0 has 3 entries but must have 4"),
        ("set_neurons", (2, torch.ones(41)), "neuron mask for FFN site 2 has 41 entries but must have 40"),
        ("set_hidden", (torch.ones(31),), "hidden mask has 31 entries but must have 32"),
        ("set_heads", (7, [1, 1, 1, 1]), "attention site 7 does not exist"),
        ("set_heads", (0, [1, 1.5, 1, 1]), "outside"),
    ],
)
def test_bad_masks(setter, args, message):
    masks = aptune.StructuralMasks.for_model(tiny_model("BertForSequenceClassification"))
    with pytest.raises(aptune.MaskError, match=message):
        getattr(masks, setter)(*args)


def test_masks_of_another_model_are_refused():
    small = aptune.StructuralMasks.for_model(
        tiny_model("BertForSequenceClassification", intermediate_size=20)
    )
    with pytest.raises(aptune.MaskError, match="has 20 entries but it has 40 neurons"):
        aptune.apply_masks(tiny_model("BertForSequenceClassification"), small)


def test_path_with_no_model(tmp_path):
    with pytest.raises(aptune.PrunedModelError, match="no such directory"):
        aptune.load_pruned(tmp_path / "missing")
    with pytest.raises(aptune.PrunedModelError, match="no config.json"):
        aptune.load_pruned(tmp_path)


def test_cli_info_on_a_pruned_folder(tmp_path, capsys):
    model = tiny_model("BertForSequenceClassification")
    masks = aptune.StructuralMasks.for_model(model)
    masks.set_heads(0, [1, 0, 0, 1])
    masks.set_neurons(1, (torch.arange(40) < 10).float())
    aptune.save_pruned(aptune.compact(model, masks), tmp_path / "m")
    assert main(["info", str(tmp_path / "m"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["heads"] == [2, 4, 4] and info["heads_before"] == [4, 4, 4]
    assert info["neurons"] == [40, 10, 40]
    assert info["prunable"] < info["prunable_before"]
    assert info["density"] == pytest.approx(info["prunable"] / info["prunable_before"])
    assert main(["info", str(tmp_path / "m")]) == 0
    table = capsys.readouterr().out
    assert "2/4" in table and "10/40" in table and f"density {info['density']:.3f}" in table


def test_cli_bad_path_is_one_line(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no such directory" in err
