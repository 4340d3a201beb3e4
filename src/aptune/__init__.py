"""aptune: Adaptive Pruning and Tuning (APT) for Hugging Face transformers.

The public API. Each name lives in one small module, and data flows one way through them:
``arch`` (model-family specs) -> ``masks`` and ``adapter`` -> ``salience`` -> ``budget``, ``schedule`` and
``selection`` -> ``tuner`` -> ``controller`` (the per-step glue) -> ``compact`` (physical pruning, save, load).
"""

from .adapter import APTLinear, merge_adapters
from .arch import UnsupportedModelError, describe, get_spec
from .budget import StructureShape, count_prunable, head_cost, hidden_cost, neuron_cost, param_report
from .compact import PrunedModelError, compact, load_pruned, read_structure, save_pruned
from .config import APTConfig, ConfigError
from .controller import APTController
from .masks import MaskError, StructuralMasks, apply_masks
from .tasks.lm_loss import use_chunked_loss, use_model_loss
from .train import TrainConfig, train

__version__ = "0.1.0.dev0"

__all__ = [
    "APTConfig",
    "APTController",
    "APTLinear",
    "ConfigError",
    "merge_adapters",
    "MaskError",
    "PrunedModelError",
    "StructuralMasks",
    "StructureShape",
    "TrainConfig",
    "UnsupportedModelError",
    "apply_masks",
    "compact",
    "count_prunable",
    "describe",
    "get_spec",
    "head_cost",
    "hidden_cost",
    "load_pruned",
    "neuron_cost",
    "param_report",
    "read_structure",
    "save_pruned",
    "train",
    "use_chunked_loss",
    "use_model_loss",
]
