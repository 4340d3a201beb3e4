"""aptune: Adaptive Pruning and Tuning (APT) for Hugging Face transformers.

The public API. Each name lives in one small module: ``arch`` (model-family specs), ``masks`` (structural
masks), ``budget`` (parameter accounting), ``compact`` (physical pruning, save and load).
"""

from .arch import UnsupportedModelError, describe, get_spec
from .budget import StructureShape, count_prunable, head_cost, hidden_cost, neuron_cost, param_report
from .compact import PrunedModelError, compact, load_pruned, read_structure, save_pruned
from .masks import MaskError, StructuralMasks, apply_masks

__version__ = "0.1.0.dev0"

__all__ = [
    "MaskError",
    "PrunedModelError",
    "StructuralMasks",
    "StructureShape",
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
]
