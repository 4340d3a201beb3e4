"""Task metrics, language-model evaluation (perplexity, multiple choice) and inference speed measurement."""

from .lm import (
    DEFAULT_TEMPLATE,
    MultipleChoiceResult,
    PerplexityResult,
    Window,
    encode_choice,
    evaluate_lm,
    lm_eval_multiple_choice,
    load_multiple_choice,
    load_texts,
    multiple_choice,
    perplexity,
    sliding_windows,
)
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
    "DEFAULT_TEMPLATE",
    "ComparisonResult",
    "MultipleChoiceResult",
    "PerplexityResult",
    "RatioSpread",
    "SpeedResult",
    "Window",
    "accuracy",
    "compare_throughput",
    "encode_choice",
    "evaluate_lm",
    "format_speedup",
    "lm_eval_multiple_choice",
    "load_multiple_choice",
    "load_texts",
    "measure_throughput",
    "multiple_choice",
    "perplexity",
    "quiet_transformers",
    "sliding_windows",
]
