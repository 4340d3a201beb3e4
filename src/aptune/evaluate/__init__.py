"""Task metrics and inference speed measurement."""

from .metrics import accuracy
from .speed import (
    ComparisonResult,
    RatioSpread,
    SpeedResult,
    compare_throughput,
    format_speedup,
    measure_throughput,
    quiet_transformers,
)

__all__ = [
    "ComparisonResult",
    "RatioSpread",
    "SpeedResult",
    "accuracy",
    "compare_throughput",
    "format_speedup",
    "measure_throughput",
    "quiet_transformers",
]
