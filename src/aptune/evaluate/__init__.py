"""Task metrics and inference speed measurement."""

from .metrics import accuracy
from .speed import SpeedResult, measure_throughput

__all__ = ["SpeedResult", "accuracy", "measure_throughput"]
