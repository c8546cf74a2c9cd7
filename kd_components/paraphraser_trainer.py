"""Deprecated module path: the paraphraser stage lives in :mod:`kd_components.engines.paraphraser`."""

from kd_components.engines.paraphraser import (  # noqa: F401
    PARAPHRASER_HINT,
    RECONSTRUCTION,
    FrozenEncoder,
    ParaphraserTrainer,
    load_paraphraser_encoder,
    reconstruction_l2,
)

__all__ = ["FrozenEncoder", "ParaphraserTrainer", "load_paraphraser_encoder", "reconstruction_l2"]
