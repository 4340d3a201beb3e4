"""Flat state dicts for anything kept per attention site, per FFN site and per hidden channel.

Masks and salience scores both hold one tensor per attention site (heads), one per FFN site (neurons) and one
for the hidden channels; this is their common serialised form: ``heads.0 ... neurons.0 ... hidden``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor


def site_state(heads: Sequence[Tensor], neurons: Sequence[Tensor], hidden: Tensor) -> dict[str, Tensor]:
    """``{"heads.i": ..., "neurons.i": ..., "hidden": ...}`` with cloned tensors."""
    out = {f"heads.{i}": t.clone() for i, t in enumerate(heads)}
    out.update({f"neurons.{i}": t.clone() for i, t in enumerate(neurons)})
    out["hidden"] = hidden.clone()
    return out


def split_site_state(state: dict[str, Tensor]) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """The inverse of :func:`site_state`."""
    n_heads = sum(k.startswith("heads.") for k in state)
    n_ffn = sum(k.startswith("neurons.") for k in state)
    return (
        [state[f"heads.{i}"] for i in range(n_heads)],
        [state[f"neurons.{i}"] for i in range(n_ffn)],
        state["hidden"],
    )
