"""Deprecated module path: adversarial terms are trained by :class:`kd_components.DistillationTrainer` itself.

``AdversarialDistillationTrainer`` is kept as a deprecated alias that builds a ``DistillationTrainer``; the
discriminator step lives in :mod:`kd_components.engines.adversarial`, the discriminators in their terms' losses
(``distiller.discriminators()``).
"""

from __future__ import annotations

from kd_components.engines.adversarial import (  # noqa: F401
    DiscriminatorStep,
    adversarial_terms,
    discriminator_value_name,
)
from kd_components.engines.distillation import deprecated_trainer_alias

__all__ = ["AdversarialDistillationTrainer", "discriminator_value_name"]


AdversarialDistillationTrainer = deprecated_trainer_alias("AdversarialDistillationTrainer")
