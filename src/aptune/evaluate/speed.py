"""Inference throughput and memory of a model at a fixed batch and length: warm-up, then timed runs, median.

:func:`measure_throughput` times one model. :func:`compare_throughput` compares two (a dense reference and a
pruned candidate) the way a shared machine allows: both are warmed up, then run alternately (reference,
candidate, reference, candidate, ...) on the same inputs, and the speed-up is the median of the per-pair
ratios, with their spread. A change in machine load then lands on both sides of each ratio, where timing one
model after the other puts it on one side only.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

Timer = Callable[[], float]


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


def _check_sizes(batch_size: int, length: int, runs: int, warmup: int) -> None:
    for name, value, least in (("batch_size", batch_size, 1), ("length", length, 1), ("runs", runs, 1)):
        if value < least:
            raise ValueError(f"{name} must be >= {least}, got {value}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")


def _random_inputs(
    batch_size: int, length: int, vocab: int, seed: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids drawn from ``seed`` (the same on every device) and an all-ones attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, length), generator=g).to(device)
    return ids, torch.ones_like(ids)


def _dtype_name(model: nn.Module) -> str:
    return str(next(model.parameters()).dtype).replace("torch.", "")


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
    timer: Timer = time.perf_counter,
) -> SpeedResult:
    """Median forward latency of ``model`` on random token ids, and the throughput it implies.

    The model is used as it is (move, cast and compact it first). All tokens are attended to. ``timer`` is
    the clock read around each timed call (a test may pass a fake one). To compare two models, use
    :func:`compare_throughput`, which interleaves them.
    """
    _check_sizes(batch_size, length, runs, warmup)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(device)
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    ids, mask = _random_inputs(batch_size, length, vocab_size or model.config.vocab_size, seed, device)
    cuda = device.type == "cuda"

    def once() -> float:
        if cuda:
            torch.cuda.synchronize(device)
        start = timer()
        model(input_ids=ids, attention_mask=mask)
        if cuda:
            torch.cuda.synchronize(device)
        return timer() - start

    for _ in range(warmup):
        once()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = [once() for _ in range(runs)]
    median = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    return SpeedResult(batch_size, length, str(device), _dtype_name(model), median, batch_size / median, peak)


@dataclass
class RatioSpread:
    """The spread of the per-pair ratios: extremes and quartiles (``iqr`` = ``q3 - q1``)."""

    min: float
    q1: float
    q3: float
    max: float
    iqr: float

    @classmethod
    def of(cls, values: list[float]) -> RatioSpread:
        if not values:
            raise ValueError("no ratios to summarize")
        if len(values) == 1:
            q1 = q3 = values[0]
        else:
            q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
        return cls(min(values), q1, q3, max(values), q3 - q1)


@dataclass
class ComparisonResult:
    """Two models timed alternately on the same inputs (see :func:`compare_throughput`).

    ``reference`` and ``candidate`` hold each model's median over its own timed calls. ``ratios`` are the
    per-pair throughput ratios candidate / reference (reference time / candidate time of one adjacent
    pair), ``speedup`` is their median and ``spread`` their extremes and quartiles. On CUDA a model's
    ``peak_memory_mb`` is its weights and buffers plus the most any of its calls allocated above what was
    allocated before the call (raw max-allocated would also count the other model, which stays resident).
    """

    batch_size: int
    length: int
    device: str
    dtype: str
    warmup: int
    runs: int
    reference: SpeedResult
    candidate: SpeedResult
    ratios: list[float]
    speedup: float
    spread: RatioSpread
    order: str = field(default="interleaved")

    def to_dict(self) -> dict:
        return asdict(self)

    def report(self) -> dict:
        """The form training reports use: each model's median, the speed-up, its spread and the ratios."""
        return {
            "dense": self.reference.to_dict(),
            "final": self.candidate.to_dict(),
            "speedup": self.speedup,
            "speedup_spread": asdict(self.spread),
            "ratios": self.ratios,
            "order": self.order,
            "warmup": self.warmup,
            "runs": self.runs,
        }


def _tensor_mb(model: nn.Module) -> float:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 2**20


@torch.no_grad()
def compare_throughput(
    reference: nn.Module,
    candidate: nn.Module,
    batch_size: int = 32,
    length: int = 128,
    warmup: int = 3,
    runs: int = 10,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    vocab_size: int | None = None,
    timer: Timer = time.perf_counter,
    call: Callable[[nn.Module, torch.Tensor, torch.Tensor], object] | None = None,
) -> ComparisonResult:
    """Time ``reference`` and ``candidate`` alternately and return the median of the per-pair speed-ups.

    Both models are moved to ``device`` (default: the candidate's) and cast to ``dtype`` (default: the
    candidate's), and run
    on the same random token ids (drawn once from ``seed``, every token attended to). ``warmup`` untimed
    passes of each come first, alternating, then ``runs`` timed pairs: reference, candidate, reference,
    candidate, ... Each pair gives a ratio candidate throughput / reference throughput; the result holds the
    median ratio (``speedup``), its spread, and each model's median throughput. On CUDA the device is
    synchronized around every timed call. ``timer`` is the clock read around each timed call (a test may
    pass a fake one). ``call(model, input_ids, attention_mask)`` replaces the forward pass that is timed
    (e.g. a ``generate`` for decoding speed); throughputs stay in sequences per second.
    """
    _check_sizes(batch_size, length, runs, warmup)
    device = torch.device(device) if device is not None else next(candidate.parameters()).device
    if dtype is None:  # like with like: a dense reference loaded in fp32 runs in the candidate's dtype
        dtype = next(candidate.parameters()).dtype
    models = {"reference": reference, "candidate": candidate}
    for model in models.values():
        model.to(device)
        if dtype is not None:
            model.to(dtype)
        model.eval()
    if vocab_size is None:
        vocab_size = min(reference.config.vocab_size, candidate.config.vocab_size)
    ids, mask = _random_inputs(batch_size, length, vocab_size, seed, device)
    cuda = device.type == "cuda"
    extra_mb = dict.fromkeys(models, 0.0)

    def once(name: str) -> float:
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        start = timer()
        if call is None:
            models[name](input_ids=ids, attention_mask=mask)
        else:
            call(models[name], ids, mask)
        if cuda:
            torch.cuda.synchronize(device)
        elapsed = timer() - start
        if cuda:
            extra = (torch.cuda.max_memory_allocated(device) - before) / 2**20
            extra_mb[name] = max(extra_mb[name], extra)
        return elapsed

    times: dict[str, list[float]] = {name: [] for name in models}
    with _as_loaded(models.values()):
        for _ in range(warmup):
            once("reference")
            once("candidate")
        extra_mb.update(dict.fromkeys(models, 0.0))  # memory counts the timed calls only
        for _ in range(runs):
            for name in models:
                times[name].append(once(name))
    ratios = [r / c for r, c in zip(times["reference"], times["candidate"], strict=True)]

    def summary(name: str) -> SpeedResult:
        model, median = models[name], statistics.median(times[name])
        peak = extra_mb[name] + _tensor_mb(model) if cuda else None
        return SpeedResult(
            batch_size, length, str(device), _dtype_name(model), median, batch_size / median, peak
        )

    return ComparisonResult(
        batch_size=batch_size,
        length=length,
        device=str(device),
        dtype=_dtype_name(candidate),
        warmup=warmup,
        runs=runs,
        reference=summary("reference"),
        candidate=summary("candidate"),
        ratios=ratios,
        speedup=statistics.median(ratios),
        spread=RatioSpread.of(ratios),
    )


@contextmanager
def _as_loaded(models: Iterable[nn.Module]) -> Iterator[None]:
    """Within the block every floating parameter requires grad, as in a model fresh from ``from_pretrained``;
    the flags are restored after.

    Timing runs without autograd, yet the flag still changes the kernels: PyTorch folds a strided 3-D input of
    a linear layer into one matrix product only when the weight requires grad. A frozen model (what training
    leaves) therefore applies a causal LM's head to the last position (``logits_to_keep=1``, a strided slice)
    as a batched product over a copy of the whole vocabulary matrix per row: 4x slower prefill for a tiny model
    on the CPU, against a dense reference loaded fresh. Both models run in the loaded state, as users run them.
    """
    params = [p for m in models for p in m.parameters() if p.is_floating_point()]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


def format_speedup(speedup: float, spread: dict | RatioSpread, pairs: int) -> str:
    """The median per-pair speed-up with its spread, for a summary line: ``2.45x (median of 10 interleaved
    pairs, IQR 2.40-2.50x, range 2.31-2.60x)``. ``spread`` is a :class:`RatioSpread` or its dict."""
    s = asdict(spread) if isinstance(spread, RatioSpread) else spread
    return (
        f"{speedup:.2f}x (median of {pairs} interleaved pairs, IQR {s['q1']:.2f}-{s['q3']:.2f}x, "
        f"range {s['min']:.2f}-{s['max']:.2f}x)"
    )


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Within the block, transformers logs errors only and shows no progress bars; both restored after.

    Loading a dense reference for a speed comparison prints transformers' load report (``classifier.weight |
    MISSING ... Consider training on your downstream task``), which reads like a problem with the user's
    model; errors still show.
    """
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
