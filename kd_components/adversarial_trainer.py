"""Deprecated module path: adversarial terms are trained by :class:`kd_components.DistillationTrainer` itself.

``AdversarialDistillationTrainer`` is kept as a deprecated alias that builds a ``DistillationTrainer``; the
discriminator pieces live in :mod:`kd_components.engines.adversarial`.
"""

from __future__ import annotations

import warnings
from typing import Any

from kd_components.engines.adversarial import (  # noqa: F401
    AdversarialState,
    DiscriminatorBank,
    DiscriminatorStep,
    adversarial_terms,
    discriminator_value_name,
)
from kd_components.engines.distillation import DistillationTrainer

__all__ = ["AdversarialDistillationTrainer", "AdversarialState", "DiscriminatorBank", "discriminator_value_name"]


def AdversarialDistillationTrainer(*args: Any, **kwargs: Any) -> DistillationTrainer:  # noqa: N802 (the old class name)
    """Deprecated: use :class:`kd_components.DistillationTrainer`, which trains adversarial terms' discriminators.

    Args:
        args: the positional arguments of :class:`~kd_components.DistillationTrainer`.
        kwargs: its keyword arguments (``discriminator_optimizer``, ...).
    """
    warnings.warn(
        "AdversarialDistillationTrainer is deprecated: kd_components.DistillationTrainer trains the discriminators "
        "of adversarial terms itself",
        DeprecationWarning,
        stacklevel=2,
    )
    return DistillationTrainer(*args, **kwargs)
