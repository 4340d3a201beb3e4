"""Multi-process training: ``torchrun --nproc_per_node 2 -m aptune.cli train ...`` on CPU (gloo), the way
``accelerate launch --multi_gpu`` starts processes on GPUs.

Every process must hold the same model at every step (parameters, shapes, masks, ranks: hashed by
``ddp_child.py`` on each process), and the run must match a single-process run with the same global batch:
per-step losses within 1e-6 and final weights within 1e-5 (float summation order differs between a batch
of 8 rows and two halves of 4).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_baselines import BASE_ARGS
from test_train_cli import make_tiny_folder, write_task

from aptune.cli import main

pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")
CHILD = Path(__file__).with_name("ddp_child.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = make_tiny_folder(tmp_path_factory.mktemp("ddp"))  # no dropout: both runs draw no random numbers
    return root, write_task(root, n_train=96, n_eval=32)


def argv(task, out: Path, *extra: str) -> list[str]:
    root, data = task
    args = ["train", "--model", str(root / "model"), "--train", str(data["train"]), "--output", str(out)]
    args += ["--validation", str(data["validation"]), "--test", str(data["test"]), "--cpu"]
    return args + BASE_ARGS + ["--density", "0.5", "--epochs", "2", *extra]


def torchrun(args: list[str], hash_dir: Path) -> None:
    env = {**os.environ, "HASH_DIR": str(hash_dir), "PYTHONPATH": os.pathsep.join(sys.path)}
    command = ["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()), str(CHILD), *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize(
    "flags",
    [["--method", "apt"], ["--method", "llm-pruner", "--calibration-batches", "2"]],
    ids=["apt", "llm-pruner"],
)
def test_two_processes_agree_with_each_other_and_with_one(task, tmp_path, flags):
    torchrun(argv(task, tmp_path / "two", *flags), tmp_path)
    hashes = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(hashes[0]) == 24 and hashes[0] == hashes[1]  # the same model on both, at every step

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torchrun gives each process one thread: the same kernels
    try:
        assert main(argv(task, tmp_path / "one", *flags)) == 0
    finally:
        torch.set_num_threads(threads)
    one, two = (json.loads((tmp_path / n / "report.json").read_text()) for n in ("one", "two"))
    assert two["processes"] == 2 and one["processes"] == 1
    worst = max(abs(a - b) for a, b in zip(one["train_losses"], two["train_losses"], strict=True))
    assert worst <= 1e-6
    assert one["method_history"] == two["method_history"]  # the same densities and ranks at every step
    assert one["params_after"] == two["params_after"]
    wa, wb = (load_file(str(tmp_path / n / "model" / "model.safetensors")) for n in ("one", "two"))
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=1e-5)


def test_a_two_process_run_resumes_exactly(task, tmp_path):
    """Each process's random generators are in the checkpoint; the resumed run continues as before."""
    flags = ["--method", "apt", "--save-every", "8", "--keep-checkpoints", "5"]
    torchrun(argv(task, tmp_path / "a", *flags), tmp_path)
    shutil.copytree(
        tmp_path / "a" / "checkpoints" / "step-000008", tmp_path / "b" / "checkpoints" / "step-000008"
    )
    torchrun(argv(task, tmp_path / "b", *flags, "--resume"), tmp_path)
    a, b = (json.loads((tmp_path / n / "report.json").read_text()) for n in ("a", "b"))
    assert b["resumed_from"][0]["step"] == 8
    assert max(abs(x - y) for x, y in zip(a["train_losses"], b["train_losses"], strict=True)) <= 1e-6
    assert a["method_history"] == b["method_history"]


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED", "MEGATRON_LM"])
def test_sharded_launches_stop_with_one_line(kind):
    from accelerate.utils import DistributedType

    from aptune.config import ConfigError
    from aptune.train import check_parallelism

    class Launched:
        distributed_type = DistributedType[kind]

    with pytest.raises(ConfigError, match=f"does not support {kind} yet: physical removal"):
        check_parallelism(Launched())
    Launched.distributed_type = DistributedType.MULTI_GPU
    check_parallelism(Launched())  # data parallel is fine


TRAINER_CHILD = Path(__file__).with_name("ddp_trainer_child.py")


@pytest.fixture(scope="module")
def trainer_alone(tmp_path_factory):
    """APTCallback in a single-process Trainer run with the global batch (16 rows per step)."""
    out = tmp_path_factory.mktemp("trainer-one")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("WORLD_SIZE", None)
    done = subprocess.run(
        [sys.executable, str(TRAINER_CHILD), str(out)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return load_file(str(out / "final.safetensors"))


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_trainer_callback_on_two_processes(tmp_path, trainer_alone, checkpointing):
    """Two Trainer processes with APTCallback (8 rows each) hold the same adapters, masks and ranks after every
    step, and end where one process with 16 rows per step ends: same structure, weights within 2e-4 after 100
    Adam steps (float summation order; Adam amplifies it a little)."""
    args = [str(TRAINER_CHILD), str(tmp_path), *(["--gradient-checkpointing"] if checkpointing else [])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    command = ["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()), *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [json.loads((tmp_path / f"steps-rank{r}.json").read_text()) for r in (0, 1)]
    assert len(steps[0]) == 100 and steps[0] == steps[1]
    final = load_file(str(tmp_path / "final.safetensors"))
    assert final.keys() == trainer_alone.keys()
    for name, value in trainer_alone.items():
        torch.testing.assert_close(final[name], value, rtol=0, atol=2e-4)
