"""The few collective operations multi-process training needs, as no-ops in a single process.

``accelerate launch --num_processes N -m aptune train ...`` starts N processes; Accelerate sets up the
process group and the device of each. Every process holds the whole model and trains on its slice of each
global batch (``aptune.train``), and every decision that changes the model (which blocks to prune, which
adapters grow) must be the same on every process. So the statistics those decisions read are reduced
across processes *before* any selection, and parameters that a structural change re-creates are broadcast
from process 0. The helpers here flatten a list of tensors into one buffer, so each reduction is a single
collective call.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")

_LOCKSTEP = False


def set_lockstep(on: bool) -> None:
    """Every process runs every evaluation pass (``on``), instead of its share of them.

    A sharded model's forward is a collective call (:mod:`aptune.sharding`): processes that ran different
    numbers of passes would wait for each other forever. In lockstep :func:`my_share` yields every item,
    :func:`sum_over_processes` and :func:`gather_shares` return this process's own (already whole) results.
    """
    global _LOCKSTEP
    _LOCKSTEP = bool(on)


def lockstep() -> bool:
    return _LOCKSTEP and world_size() > 1


def world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def launched_processes() -> int:
    """The number of processes the launcher started (``WORLD_SIZE``), known before the process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        torch.distributed.barrier()


def _flat_collective(tensors: Sequence[Tensor], fn) -> None:
    if not tensors:
        return
    nccl = torch.distributed.get_backend() == "nccl"  # NCCL moves CUDA tensors only
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    for (device, _), group in groups.items():
        if nccl and device.type != "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        flat = torch.cat([t.detach().reshape(-1) for t in group]).to(device)
        fn(flat)
        offset = 0
        for t in group:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n


@torch.no_grad()
def all_reduce_(tensors: Sequence[Tensor], op: str = "sum") -> None:
    """Sum (``op="sum"``) or average (``"mean"``) each tensor over processes, in place."""
    n = world_size()
    if n == 1:
        return
    if op not in ("sum", "mean"):
        raise ValueError(f"op must be 'sum' or 'mean', got {op!r}")

    def reduce(flat: Tensor) -> None:
        torch.distributed.all_reduce(flat)
        if op == "mean":
            flat.div_(n)

    _flat_collective(list(tensors), reduce)


@torch.no_grad()
def broadcast_(tensors: Sequence[Tensor], src: int = 0) -> None:
    """Give every process process ``src``'s values of ``tensors``, in place."""
    if world_size() == 1:
        return
    _flat_collective(list(tensors), lambda flat: torch.distributed.broadcast(flat, src))


def all_gather_objects(value: Any) -> list[Any]:
    """Every process's ``value``, in process order (``[value]`` in a single process)."""
    if world_size() == 1:
        return [value]
    out: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, value)
    return out


def my_share(items: Iterable[T]) -> Iterator[T]:
    """Items ``rank, rank + N, rank + 2N, ...`` of ``items``: this process's share of an evaluation (every
    item in :func:`lockstep`)."""
    n, me = (1, 0) if lockstep() else (world_size(), rank())
    for i, item in enumerate(items):
        if i % n == me:
            yield item


def gather_shares(mine: list[T]) -> list[T]:
    """The items every process got from its :func:`my_share`, concatenated (``mine`` in one process or in
    :func:`lockstep`)."""
    if world_size() == 1 or lockstep():
        return list(mine)
    return [item for part in all_gather_objects(mine) for item in part]


def sum_over_processes(values: Sequence[float]) -> list[float]:
    """Each of ``values`` summed over processes (float64); unchanged in :func:`lockstep`, where every process
    computed the whole sums."""
    if world_size() == 1 or lockstep():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    all_reduce_([t], "sum")
    return t.tolist()


def broadcast_float(value: float, device: torch.device | str = "cpu", src: int = 0) -> float:
    """Process ``src``'s ``value`` on every process."""
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.broadcast(t, src)
    return float(t.item())


__all__ = [
    "all_gather_objects",
    "all_reduce_",
    "barrier",
    "broadcast_",
    "broadcast_float",
    "gather_shares",
    "is_main",
    "launched_processes",
    "lockstep",
    "my_share",
    "rank",
    "set_lockstep",
    "sum_over_processes",
    "world_size",
]
