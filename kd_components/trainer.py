"""Deprecated module path: the trainer lives in :mod:`kd_components.engines` (``kd_components.DistillationTrainer``)."""

from kd_components.engines.distillation import (  # noqa: F401
    BALANCED_WEIGHTS_KEY,
    SUPERVISED,
    DistillationTrainer,
    _gradient_norm,
    balanced_weight_key,
    term_output_key,
)

__all__ = ["DistillationTrainer", "SUPERVISED", "BALANCED_WEIGHTS_KEY", "balanced_weight_key", "term_output_key"]
