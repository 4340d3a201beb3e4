"""Run checkpoints: written atomically, read back without unpickling anything.

A checkpoint is a folder ``OUTPUT/checkpoints/step-000120`` that holds everything a run needs to continue as
if it had never stopped:

* ``model.safetensors`` and ``structure.json``: the model in its current, possibly partly pruned shape (the
  shape plan of every layer and the rank of every adapter, so a fresh copy of the starting model can be cut
  to it before the weights are loaded strictly);
* ``method.safetensors`` / ``method.json``: the method's state (APT: masks, salience averages, ranks, history,
  the teacher; a baseline: its importance averages and phase);
* ``optimizer.safetensors`` / ``optimizer.json``;
* ``trainer.safetensors`` / ``trainer.json``: the step, the position in the data order, every random
  generator in use, the best checkpoint so far, the clocks and the validation history.

Nested state (dicts, lists, tuples, ``None``, numbers, strings and tensors) is split by :func:`split_state`
into a JSON tree and a flat mapping of tensors, so the only readers are ``json`` and ``safetensors``.

Writes are atomic: :func:`atomic_folder` fills a hidden temporary folder next to the target, fsyncs every
file and the folder, and renames it into place. A crash during a save leaves the previous checkpoint (and
the previous final model) whole; a half-written temporary folder is never read and is removed by the next
save.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TENSOR = "__tensor__"
_TUPLE = "__tuple__"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, or does not belong to this run."""


# -- nested state <-> (JSON, tensors) --------------------------------------------------------------------


def split_state(state: Any) -> tuple[Any, dict[str, Tensor]]:
    """Split nested ``state`` into a JSON-able tree and a flat ``{key: tensor}`` mapping for safetensors.

    Tensors become ``{"__tensor__": key}``; tuples become ``{"__tuple__": [...]}`` so they come back as tuples.
    Tensors are copied to the CPU and made contiguous (tensors that share memory are stored once each).
    """
    tensors: dict[str, Tensor] = {}

    def walk(x: Any, path: str) -> Any:
        if isinstance(x, Tensor):
            key = f"t{len(tensors)}"  # unique whatever the tree's own keys are
            tensors[key] = x.detach().to("cpu").contiguous().clone()
            return {_TENSOR: key}
        if isinstance(x, dict):
            bad = [k for k in x if not isinstance(k, str | int)]
            if bad:
                raise TypeError(f"state keys must be strings or ints, got {bad[:3]}")
            # int keys are kept as strings with a marker so they come back as ints
            return {
                (f"#int:{k}" if isinstance(k, int) else k): walk(v, f"{path}.{k}" if path else str(k))
                for k, v in x.items()
            }
        if isinstance(x, tuple):
            return {_TUPLE: [walk(v, f"{path}.{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(x)]
        if x is None or isinstance(x, bool | int | float | str):
            return x
        raise TypeError(f"cannot store a {type(x).__name__} in a checkpoint (at {path or 'the root'})")

    return walk(state, ""), tensors


def join_state(tree: Any, tensors: dict[str, Tensor]) -> Any:
    """The inverse of :func:`split_state`."""

    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            if set(x) == {_TENSOR}:
                return tensors[x[_TENSOR]]
            if set(x) == {_TUPLE}:
                return tuple(walk(v) for v in x[_TUPLE])
            return {(int(k[5:]) if k.startswith("#int:") else k): walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    return walk(tree)


def write_state(folder: Path, name: str, state: Any) -> None:
    """Write ``state`` as ``NAME.json`` and (when it holds tensors) ``NAME.safetensors``."""
    from safetensors.torch import save_file

    tree, tensors = split_state(state)
    (folder / f"{name}.json").write_text(json.dumps(tree))
    if tensors:
        save_file(tensors, str(folder / f"{name}.safetensors"))


def read_state(folder: Path, name: str, device: torch.device | str = "cpu") -> Any:
    from safetensors.torch import load_file

    f = folder / f"{name}.json"
    if not f.is_file():
        raise CheckpointError(f"{folder} is incomplete: no {f.name}")
    tree = json.loads(f.read_text())
    t = folder / f"{name}.safetensors"
    tensors = load_file(str(t), device=str(device)) if t.is_file() else {}
    return join_state(tree, tensors)


# -- atomic folders ----------------------------------------------------------------------------------------


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{kind}-{os.getpid()}"


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it replaces ``path`` in one rename.

    Every file and the folder are fsynced before the rename. An existing ``path`` is first renamed aside and
    removed only after the new folder is in place, so at every moment one whole version exists (under its
    own name or, for an instant, the aside name, which :func:`recover_folder` restores).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    tmp = _temporary(path, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync(f)
        _fsync(tmp)
        aside = None
        if path.exists():
            aside = _temporary(path, "old")
            os.rename(path, aside)
        os.rename(tmp, path)
        _fsync(path.parent)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_stale(path: Path) -> None:
    """Remove temporary folders a crashed save left next to ``path``; restore an aside copy if needed."""
    recover_folder(path)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def recover_folder(path: str | Path) -> None:
    """If a crash fell between the two renames of :func:`atomic_folder`, put the previous version back."""
    path = Path(path)
    if path.exists():
        for aside in path.parent.glob(f".{path.name}.old-*"):
            shutil.rmtree(aside, ignore_errors=True)
        return
    asides = sorted(path.parent.glob(f".{path.name}.old-*"))
    if asides:
        os.rename(asides[-1], path)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a small file atomically (temporary file, fsync, rename)."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# -- the checkpoints of a run ------------------------------------------------------------------------------


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step-{step:06d}"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """The complete checkpoints of a run, oldest first (temporary folders of a crashed save are skipped)."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and d.is_dir() and (d / "trainer.json").is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def resolve_resume(resume: str, output_dir: str | Path) -> Path:
    """The checkpoint folder ``--resume`` names: ``latest`` (the newest in the output folder), a checkpoint
    folder, or a run's output folder (its newest checkpoint)."""
    if resume == "latest":
        found = latest_checkpoint(output_dir)
        if found is None:
            raise CheckpointError(
                f"--resume: no checkpoint in {Path(output_dir) / CHECKPOINTS} (train with --save-every N)"
            )
        return found
    path = Path(resume)
    if (path / "trainer.json").is_file():
        return path
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is not None:
            return found
    raise CheckpointError(
        f"--resume: {resume} is neither a checkpoint folder nor a run folder with checkpoints"
    )


def keep_latest(output_dir: str | Path, keep: int) -> None:
    """Delete all but the ``keep`` newest complete checkpoints (never the newest one)."""
    found = list_checkpoints(output_dir)
    for _, path in found[: max(0, len(found) - max(1, keep))]:
        shutil.rmtree(path, ignore_errors=True)


# -- random generators -------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """The state of the global generators: Python's, NumPy's, torch's CPU one and every CUDA device's."""
    import numpy as np

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].to(torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.to(torch.uint8) for s in state["cuda"]])


# -- optimizer --------------------------------------------------------------------------------------------


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    state = optimizer.state_dict()
    return {"state": state["state"], "param_groups": state["param_groups"]}


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    groups = saved["param_groups"]
    if len(groups) != len(optimizer.param_groups) or any(
        len(a["params"]) != len(b["params"]) for a, b in zip(groups, optimizer.param_groups, strict=True)
    ):
        raise CheckpointError("the checkpoint's optimizer state does not fit the restored model's parameters")
    optimizer.load_state_dict({"state": saved["state"], "param_groups": groups})


# -- one run's checkpoint -----------------------------------------------------------------------------------


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    method: Any,
    optimizer: torch.optim.Optimizer,
    trainer: dict,
    keep: int,
    rng: list[dict[str, Any]] | None = None,
    model_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the checkpoint of ``step`` atomically and keep the ``keep`` newest. ``method`` is the run's
    :class:`aptune.methods.Method`; ``trainer`` the loop's own state; ``rng`` the global random generators'
    states of every process, in process order (default: this process's); ``model_state`` the model's whole
    weights when ``method.model`` is sharded (:func:`aptune.sharding.full_state_dict`)."""
    from .compact import shape_and_ranks

    path = checkpoint_dir(output_dir, step)
    with atomic_folder(path) as tmp:
        write_state(tmp, "structure", shape_and_ranks(method.model))
        write_state(tmp, "model", method.model.state_dict() if model_state is None else model_state)
        write_state(tmp, "method", method.state_dict())
        write_state(tmp, "optimizer", optimizer_state(optimizer))
        rng = rng if rng is not None else [rng_state()]
        write_state(tmp, "trainer", {**trainer, "rng": rng})  # last: marks the folder complete
    keep_latest(output_dir, keep)
    return path


def load_checkpoint(path: str | Path, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The parts of a checkpoint written by :func:`save_checkpoint` (tensors on the CPU), except those in
    ``skip`` (a sharded run's processes other than 0 skip ``"model"``)."""
    path = Path(path)
    parts = ("trainer", "structure", "model", "method", "optimizer")
    return {name: read_state(path, name) for name in parts if name not in skip}


__all__ = [
    "CHECKPOINTS",
    "CheckpointError",
    "atomic_folder",
    "atomic_write_text",
    "checkpoint_dir",
    "join_state",
    "keep_latest",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_optimizer_state",
    "optimizer_state",
    "read_state",
    "recover_folder",
    "resolve_resume",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "split_state",
    "write_state",
]
