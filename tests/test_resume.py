"""Exact resume, atomic checkpoints and pickle-free loading (``aptune train --save-every / --resume``).

A resumed run must continue as if it had never stopped: from the checkpoint on, every step's loss equals the
uninterrupted run's to 1e-6 (on CPU in fp32 it is bit-equal), and it ends with the same masks, ranks and
weights. Checked for every method and for each phase that changes state differently (the dense phase, the
middle of pruning, the separate teacher of self-distillation, lora-prune's two phases), in-process and, for
APT, by killing a real ``aptune train`` process with SIGKILL.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_baselines import BASE_ARGS
from test_train_cli import make_tiny_folder, write_task

from aptune.checkpoint import (
    atomic_folder,
    join_state,
    latest_checkpoint,
    list_checkpoints,
    split_state,
)
from aptune.cli import main

BASE = [*BASE_ARGS, "--density", "0.5"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = make_tiny_folder(tmp_path_factory.mktemp("resume"))
    return root, write_task(root, n_train=96, n_eval=32)  # 12 steps per epoch at batch 8


def argv(task, out: Path, *extra: str) -> list[str]:
    root, data = task
    args = ["train", "--model", str(root / "model"), "--train", str(data["train"])]
    args += ["--validation", str(data["validation"]), "--test", str(data["test"]), "--output", str(out)]
    return args + BASE + list(extra)


# APT with a dense phase (salience from step 6) and pruning to step 24 of 36, a checkpoint every 2 steps
KILLED = ["--method", "apt", "--epochs", "3", "--salience-start", "6", "--pruning-end", "24"]
KILLED += ["--save-every", "2", "--keep-checkpoints", "50"]


@pytest.fixture(scope="module")
def reference(task, tmp_path_factory):
    """The uninterrupted run the killed ones are compared with."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(argv(task, out, *KILLED)) == 0
    return out


def report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def assert_same_run(a: Path, b: Path, from_step: int) -> float:
    """Losses from ``from_step`` on, the final shape, ranks and weights of runs ``a`` and ``b`` agree."""
    ra, rb = report(a), report(b)
    la, lb = ra["train_losses"], rb["train_losses"]
    assert len(la) == len(lb) == ra["steps"]
    worst = max(abs(x - y) for x, y in zip(la[from_step:], lb[from_step:], strict=True))
    assert worst <= 1e-6
    assert la[:from_step] == lb[:from_step]  # restored from the checkpoint, not recomputed
    assert ra["method_history"] == rb["method_history"]  # densities and ranks at every step
    sa = json.loads((a / "model" / "aptune_structure.json").read_text())
    sb = json.loads((b / "model" / "aptune_structure.json").read_text())
    assert sa["shape"] == sb["shape"]
    wa, wb = (
        load_file(str(a / "model" / "model.safetensors")),
        load_file(str(b / "model" / "model.safetensors")),
    )
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=1e-6)
    assert ra["metrics"] == rb["metrics"]  # the same best checkpoint, the same test score
    return worst


# Each case: the method's flags, and the checkpoints to resume from (one per phase it goes through).
CASES = {
    # (APT without distillation: the SIGKILL tests below, in its dense phase and in the middle of pruning)
    # with distillation the teacher shares the modules until step 14, then holds its own copy to step 27
    "apt-distill": (["--method", "apt", "--epochs", "2.5", "--distill"], [12, 20]),
    "full": (["--method", "full", "--epochs", "1"], [4]),
    "lora": (["--method", "lora", "--epochs", "1"], [4]),
    # 12 steps of LoRA, prune at step 12, 12 steps of retraining with a fresh LoRA
    "lora-prune": (
        ["--method", "lora-prune", "--epochs", "1", "--pretune-epochs", "1", "--calibration-batches", "2"],
        [8, 16],
    ),
    "loraprune": (["--method", "loraprune", "--epochs", "2", "--iterative-steps", "4"], [8]),
    "llm-pruner": (["--method", "llm-pruner", "--epochs", "1.5", "--calibration-batches", "2"], [4, 12]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_resumed_run_continues_exactly(task, tmp_path, case):
    flags, resume_at = CASES[case]
    full = tmp_path / "uninterrupted"
    assert main(argv(task, full, *flags, "--save-every", "4", "--keep-checkpoints", "20")) == 0
    saved = {step: path for step, path in list_checkpoints(full)}
    for step in resume_at:
        out = tmp_path / f"resumed-{step}"
        assert main(argv(task, out, *flags, "--resume", str(saved[step]))) == 0
        assert_same_run(full, out, step)
        assert report(out)["resumed_from"][0]["step"] == step


def test_resume_latest_in_the_output_folder_and_keep_checkpoints(task, tmp_path):
    out = tmp_path / "run"
    flags = ["--method", "apt", "--epochs", "2", "--save-every", "3", "--keep-checkpoints", "2"]
    assert main(argv(task, out, *flags)) == 0
    assert [s for s, _ in list_checkpoints(out)] == [
        18,
        21,
    ]  # the two newest of 3, 6, ..., 21 (24 is the end)
    shutil.rmtree(out / "model")
    (out / "report.json").unlink()
    # --resume alone: the newest in --output; where the allocator puts tensors may change on resumption
    assert main(argv(task, out, *flags, "--resume", "--cpu-mmap-threshold", "0")) == 0
    assert report(out)["resumed_from"][0]["step"] == 21


def test_a_changed_setting_or_a_missing_checkpoint_is_a_clear_error(task, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(argv(task, out, "--method", "lora", "--epochs", "1", "--save-every", "6")) == 0
    capsys.readouterr()
    changed = argv(task, out, "--method", "lora", "--epochs", "1", "--learning-rate", "0.01", "--resume")
    assert main(changed) == 2
    err = capsys.readouterr().err
    assert "was written by a run with other settings: learning_rate (None -> 0.01)" in err
    assert len(err.strip().splitlines()) == 1
    assert main(argv(task, tmp_path / "empty", "--method", "lora", "--epochs", "1", "--resume")) == 2
    assert "--resume: no checkpoint in" in capsys.readouterr().err


def test_nested_state_round_trips_through_json_and_safetensors():
    state = {
        "step": 3,
        "none": None,
        "pair": (torch.arange(3), 2.5),
        "by_index": {0: {"exp_avg": torch.ones(2, 2)}, 7: [torch.zeros(1, dtype=torch.bool), "x"]},
    }
    tree, tensors = split_state(state)
    back = join_state(json.loads(json.dumps(tree)), tensors)
    assert back["step"] == 3 and back["none"] is None and isinstance(back["pair"], tuple)
    assert torch.equal(back["pair"][0], torch.arange(3)) and back["pair"][1] == 2.5
    assert set(back["by_index"]) == {0, 7} and torch.equal(back["by_index"][0]["exp_avg"], torch.ones(2, 2))
    assert back["by_index"][7][0].dtype == torch.bool and back["by_index"][7][1] == "x"
    with pytest.raises(TypeError, match="cannot store a set"):
        split_state({"bad": {1, 2}})


def test_resuming_never_unpickles(task, tmp_path, reference, monkeypatch):

    def refuse(*args, **kwargs):
        raise AssertionError("a load path unpickled")

    class Refuse:
        def __init__(self, *args, **kwargs):
            refuse()

    for module, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)
    monkeypatch.setattr(pickle, "Unpickler", Refuse)
    with pytest.raises(AssertionError, match="unpickled"):  # the guard itself works
        torch.load(tmp_path / "anything")
    resumed = tmp_path / "resumed"
    assert main(argv(task, resumed, *KILLED, "--resume", str(latest_checkpoint(reference)))) == 0
    assert report(resumed)["resumed_from"][0]["step"] == 34


def test_an_interrupted_save_leaves_the_previous_version_whole(tmp_path):
    target = tmp_path / "model"
    with atomic_folder(target) as folder:
        (folder / "weights").write_text("first")
    with pytest.raises(RuntimeError), atomic_folder(target) as folder:
        (folder / "weights").write_text("half")
        raise RuntimeError("crash while saving")
    assert (target / "weights").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # the temporary folder is gone


CHILD = """
import fnmatch, os, sys
import safetensors.torch
real = safetensors.torch.save_file
def save_file(tensors, filename, *args, **kwargs):
    real(tensors, filename, *args, **kwargs)
    if os.environ["DIE_AFTER"] and fnmatch.fnmatch(filename, "*" + os.environ["DIE_AFTER"]):
        os._exit(137)  # killed in the middle of a checkpoint: some files written, not renamed into place
safetensors.torch.save_file = save_file
from aptune.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _child(args: list[str], **env: str) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **env}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, *args],
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def test_killed_during_a_checkpoint_the_previous_one_resumes(task, tmp_path, reference):
    out = tmp_path / "run"
    flags = KILLED
    # dies after writing the model of the checkpoint at step 8, before its method, optimizer and trainer state
    child = _child(argv(task, out, *flags), DIE_AFTER=os.path.join("step-000008.tmp-*", "model.safetensors"))
    _, err = child.communicate(timeout=300)  # reads and closes the pipe
    assert child.returncode == 137, err.decode()[-2000:]
    complete = list_checkpoints(out)
    assert [s for s, _ in complete] == [2, 4, 6]
    torn = list((out / "checkpoints").glob(".step-000008.tmp-*"))
    assert torn and (torn[0] / "model.safetensors").is_file()  # the torn one is there, and ignored
    assert main(argv(task, out, *flags, "--resume")) == 0
    assert not list((out / "checkpoints").glob(".*"))  # the next save removed it
    assert_same_run(reference, out, 6)


@pytest.mark.parametrize("kill_after", [4, 12], ids=["dense-phase", "mid-pruning"])
def test_sigkill_at_a_random_step_then_resume(task, tmp_path, reference, kill_after):
    """A real ``aptune train`` process killed with SIGKILL once checkpoint ``kill_after`` exists (the
    process may be a step further by then), resumed with ``--resume``: same losses, masks, ranks, weights."""
    flags = KILLED
    out = tmp_path / "killed"
    child = _child(argv(task, out, *flags), DIE_AFTER="")
    deadline = time.time() + 240
    while latest_checkpoint(out) is None or list_checkpoints(out)[-1][0] < kill_after:
        assert child.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    assert child.wait(timeout=60) == -signal.SIGKILL
    child.stderr.close()
    assert not (out / "report.json").exists()
    resumed_at = list_checkpoints(out)[-1][0]
    assert main(argv(task, out, *flags, "--resume")) == 0
    worst = assert_same_run(reference, out, resumed_at)
    assert report(out)["resumed_from"][0]["step"] == resumed_at
    print(
        f"killed after checkpoint {kill_after}, resumed at step {resumed_at}: worst loss difference {worst:.1e}"
    )
