"""Deprecated module path: adversarial terms are trained by :class:`kd_components.DistillationTrainer` itself.

``AdversarialDistillationTrainer`` is kept as a deprecated alias that builds a ``DistillationTrainer``; the
discriminator pieces live in :mod:`kd_components.engines.adversarial`.
"""

from __future__ import annotations

from kd_components.engines.adversarial import (  # noqa: F401
    AdversarialState,
    DiscriminatorBank,
    DiscriminatorStep,
    adversarial_terms,
    discriminator_value_name,
)
from kd_components.engines.distillation import deprecated_trainer_alias

__all__ = ["AdversarialDistillationTrainer", "AdversarialState", "DiscriminatorBank", "discriminator_value_name"]


AdversarialDistillationTrainer = deprecated_trainer_alias("AdversarialDistillationTrainer")
