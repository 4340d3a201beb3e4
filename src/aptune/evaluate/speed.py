"""Inference throughput and memory of a model at a fixed batch and length: warm-up, then timed runs, median."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass
class SpeedResult:
    batch_size: int
    length: int
    device: str
    dtype: str
    median_s: float
    throughput: float  # sequences per second
    peak_memory_mb: float | None  # CUDA max allocated during the timed runs; None on CPU

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def measure_throughput(
    model: nn.Module,
    batch_size: int = 32,
    length: int = 128,
    warmup: int = 3,
    runs: int = 10,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    vocab_size: int | None = None,
    seed: int = 0,
) -> SpeedResult:
    """Median forward latency of ``model`` on random token ids, and the throughput it implies.

    The model is used as it is (move, cast and compact it first). All tokens are attended to.
    """
    if batch_size < 1 or length < 1 or runs < 1:
        raise ValueError("batch_size, length and runs must be >= 1")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(device)
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    vocab = vocab_size or model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, length), generator=g).to(device)
    mask = torch.ones_like(ids)
    cuda = device.type == "cuda"

    def once() -> float:
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        model(input_ids=ids, attention_mask=mask)
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    for _ in range(warmup):
        once()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = [once() for _ in range(runs)]
    median = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    used_dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    return SpeedResult(batch_size, length, str(device), used_dtype, median, batch_size / median, peak)
