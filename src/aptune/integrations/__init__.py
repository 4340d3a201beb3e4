"""Integrations of :class:`aptune.APTController` with training frameworks.

* :mod:`aptune.integrations.hf_trainer`: :class:`APTCallback`, APT for the Hugging Face ``Trainer``.
"""

from .hf_trainer import APTCallback, UnsupportedTrainerSetup, training_steps

__all__ = ["APTCallback", "UnsupportedTrainerSetup", "training_steps"]
