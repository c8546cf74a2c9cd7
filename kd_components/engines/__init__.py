"""The training engines, in one place: the distillation trainer, its discriminator step, the paraphraser stage.

- :class:`DistillationTrainer`: every distillation (plain, adversarial, semi-supervised, none), MONAI's
  ``SupervisedTrainer`` iteration with the distillation steps inside; the terms decide what runs;
- :class:`DiscriminatorStep`: the discriminator updates of adversarial terms (the discriminators are the
  distiller's, ``distiller.discriminators()``), with the cost levers ``discriminator_steps``, ``critic_every``,
  ``gp_every`` and ``batched_critic``;
- :class:`ParaphraserTrainer`: Factor Transfer's paraphraser pre-training stage (its own network and loss);
- :class:`EpochMeans`: the epoch means every trainer reports as ``train_<name>``.
"""

from kd_components.engines.adversarial import (
    DiscriminatorStep,
    adversarial_terms,
    discriminator_value_name,
)
from kd_components.engines.distillation import (
    BALANCED_WEIGHTS_KEY,
    LABELLED,
    SUPERVISED,
    DistillationTrainer,
    balanced_weight_key,
    term_output_key,
)
from kd_components.engines.epoch_means import EpochMeans
from kd_components.engines.paraphraser import FrozenEncoder, ParaphraserTrainer, load_paraphraser_encoder

__all__ = [
    "BALANCED_WEIGHTS_KEY",
    "DiscriminatorStep",
    "DistillationTrainer",
    "EpochMeans",
    "FrozenEncoder",
    "LABELLED",
    "ParaphraserTrainer",
    "SUPERVISED",
    "adversarial_terms",
    "balanced_weight_key",
    "discriminator_value_name",
    "load_paraphraser_encoder",
    "term_output_key",
]
