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
from test_causal_lm_train import APT as LM_APT
from test_causal_lm_train import BASE as LM_BASE
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


@pytest.mark.parametrize("kind", ["DEEPSPEED", "MEGATRON_LM"])
def test_deepspeed_and_megatron_launches_stop_with_one_line(kind):
    from accelerate.utils import DistributedType

    from aptune.config import ConfigError
    from aptune.train import check_parallelism

    class Launched:
        distributed_type = DistributedType[kind]

    with pytest.raises(ConfigError, match=f"does not support {kind}: to shard the frozen weights use --fsdp"):
        check_parallelism(Launched())
    Launched.distributed_type = DistributedType.MULTI_GPU
    assert check_parallelism(Launched()) is False  # data parallel
    assert check_parallelism(Launched(), fsdp=True) is True
    Launched.distributed_type = DistributedType.FSDP  # accelerate launch --use_fsdp: aptune shards itself
    assert check_parallelism(Launched()) is True


@pytest.mark.parametrize(
    ("method", "flags", "processes", "message"),
    [
        ("apt", {}, 1, "launch at least 2"),
        ("llm-pruner", {}, 2, "method 'llm-pruner' does not run sharded"),
        ("full", {}, 2, "method 'full' does not run sharded"),
        ("apt", {"distill": True}, 2, "--distill does not run sharded"),
        ("apt", {"use_kurtosis": True}, 2, "--use-kurtosis does not run sharded"),
    ],
)
def test_sharded_runs_aptune_cannot_do_stop_with_one_line(method, flags, processes, message):
    from aptune.config import APTConfig, ConfigError
    from aptune.methods import method_info
    from aptune.sharding import check_sharded

    with pytest.raises(ConfigError, match=message):
        check_sharded(method, method_info(method).sharded, APTConfig(**flags), processes)
    check_sharded("apt", True, APTConfig(), 2)  # what runs sharded passes


# -- sharded (FSDP2) training on CPU processes ----------------------------------------------------------------


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    from tiny_lm import write_lm_folder

    return write_lm_folder(tmp_path_factory.mktemp("fsdp"))


# the tiny LM's flags of tests/test_causal_lm_train.py; 30 steps stay within the first epoch, whose batches are
# all full, so a single process sees the same rows as two
LM_ARGS = ["--data", "text", *LM_BASE, *LM_APT, "--max-steps", "30", "--density", "0.6"]
LM_ARGS += ["--learning-rate", "3e-3", "--cpu"]


def lm_argv(root: Path, out: Path, *extra: str) -> list[str]:
    args = [str(root / a) if a == "text" else a for a in LM_ARGS]
    return ["train", "--model", str(root / "model"), "--output", str(out), *args, *extra]


def torchrun_cli(args: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    command = ["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "aptune.cli"]
    done = subprocess.run(command + args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def single_process(args: list[str]) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torchrun gives each process one thread: the same kernels
    try:
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "flags",
    [
        # 3 scoring passes of 4 rows: process 0 scores 2, process 1 one and one pass that scores nothing
        ["--initial-density", "0.8", "--one-shot-batches", "3", "--one-shot-micro-batch", "4"],
        ["--method", "lora"],
    ],
    ids=["apt-one-shot-then-gradual", "lora"],
)
def test_fsdp_run_shards_the_frozen_weights_and_ends_where_one_process_ends(lm, tmp_path, flags):
    """``--fsdp`` on 2 processes: each holds half of every frozen tensor; APT keeps pruned blocks masked while
    sharded (one-shot to 0.8, then gradual to 0.6 with checkpoints and rank growth) and compacts at the end.
    Losses, kept structure, ranks and final weights equal a single-process run with the same global batch
    (against a data-parallel run on 2 processes they are bit-equal)."""
    torchrun_cli(lm_argv(lm, tmp_path / "sharded", "--fsdp", *flags))
    single_process(lm_argv(lm, tmp_path / "one", *flags))
    two, one = (json.loads((tmp_path / n / "report.json").read_text()) for n in ("sharded", "one"))
    held = two["sharding"]["params_per_process"]
    frozen = two["params_before"]["total"]  # every weight of the starting model is frozen and sharded
    assert two["processes"] == 2 and held["sharded_local"] == pytest.approx(frozen / 2, rel=0.02)
    worst = max(abs(a - b) for a, b in zip(one["train_losses"], two["train_losses"], strict=True))
    assert worst <= 1e-5  # losses near 5.4: float summation order, 2 + 2 rows against 4 (1.4e-6 seen)
    # the same kept blocks and ranks at every checkpoint
    assert one["method_history"] == two["method_history"]
    assert one["params_after"] == two["params_after"]
    assert one["metrics"]["test_perplexity"] == pytest.approx(two["metrics"]["test_perplexity"], rel=1e-5)
    wa, wb = (load_file(str(tmp_path / n / "model" / "model.safetensors")) for n in ("one", "sharded"))
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=1e-5)


def test_a_sharded_run_resumes_exactly_from_a_checkpoint_mid_pruning(lm, tmp_path):
    """Checkpoints of a sharded run hold the whole weights (gathered to process 0); a resumed sharded run loads
    them back into each process's shards and continues with the same losses."""
    flags = ["--fsdp", "--initial-density", "0.8", "--save-every", "8", "--keep-checkpoints", "5"]
    torchrun_cli(lm_argv(lm, tmp_path / "a", *flags))
    step8 = Path("checkpoints") / "step-000008"  # inside the pruning window (steps 2-12)
    shutil.copytree(tmp_path / "a" / step8, tmp_path / "b" / step8)
    torchrun_cli(lm_argv(lm, tmp_path / "b", *flags, "--resume"))
    a, b = (json.loads((tmp_path / n / "report.json").read_text()) for n in ("a", "b"))
    assert b["resumed_from"][0]["step"] == 8
    assert max(abs(x - y) for x, y in zip(a["train_losses"], b["train_losses"], strict=True)) <= 1e-6
    assert a["method_history"] == b["method_history"]


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
