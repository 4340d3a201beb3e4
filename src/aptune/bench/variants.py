"""The registry of benchmark variants: a name -> the ``aptune train`` flags that select it.

Every method that ``aptune train --method`` accepts (:data:`aptune.train.METHODS`) is a variant of the same
name, so a method registered there is runnable here without a change. Extra variants (the same method with
other settings) are listed in :data:`EXTRA_VARIANTS`; among them ``NAME-uniform`` and ``NAME-per-layer``
variants of every method that honours ``--shape`` (:data:`SHAPED_METHODS`): the same method pruning to one
shape for every layer (the same heads and FFN width everywhere, loadable by stock transformers) or to per-layer
widths, whatever the model kind's default (uniform for decoders, per-layer for encoders).
"""

from __future__ import annotations

# Methods whose pruning follows `aptune train --shape` (per-layer or uniform; the default depends on the model).
SHAPED_METHODS: tuple[str, ...] = ("apt", "llm-pruner", "loraprune")
SHAPES: tuple[str, ...] = ("uniform", "per-layer")

# Variants beyond one-per-method: name -> the flags of `aptune train` that make it.
EXTRA_VARIANTS: dict[str, tuple[str, ...]] = {
    "apt-nodistill": ("--method", "apt", "--no-distill"),
    "apt-distill": ("--method", "apt", "--distill"),
    # APT at another density than the bench's, so one bench compares two densities against one reference
    **{f"apt-density-{d}": ("--method", "apt", "--target-density", d) for d in ("0.5", "0.6", "0.7")},
    **{
        f"{method}-{shape}": ("--method", method, "--shape", shape)
        for method in SHAPED_METHODS
        for shape in SHAPES
    },
}

# The side-by-side comparison run when no --methods are given (those not registered yet are left out).
DEFAULT_METHODS: tuple[str, ...] = (
    "full",
    "lora",
    "lora-prune",
    "loraprune",
    "llm-pruner",
    "apt",  # no self-distillation (the default since issue 11)
    "apt-distill",
)

REFERENCE = "full"  # classification: time to accuracy and speed-ups are relative to this variant
# the reference per task when none is configured: causal-LM ratios (perplexity, memory) are to dense LoRA
REFERENCES: dict[str, str] = {"classification": REFERENCE, "causal-lm": "lora", "qa": REFERENCE}


def variants() -> dict[str, tuple[str, ...]]:
    """All runnable variants: one per registered training method, then the extra ones."""
    from ..train import METHODS

    registry = {name: ("--method", name) for name in METHODS}
    for name, flags in EXTRA_VARIANTS.items():
        if base_method(name, flags) in METHODS:
            registry.setdefault(name, flags)
    return registry


def base_method(name: str, flags: tuple[str, ...] | None = None) -> str:
    """The ``--method`` a variant trains with (``apt`` for ``apt-nodistill``)."""
    if flags is None:
        flags = EXTRA_VARIANTS.get(name, ("--method", name))
    for i, flag in enumerate(flags[:-1]):
        if flag == "--method":
            return flags[i + 1]
    return name


def default_methods() -> tuple[str, ...]:
    """:data:`DEFAULT_METHODS` restricted to the variants registered in this version."""
    known = variants()
    return tuple(name for name in DEFAULT_METHODS if name in known)
