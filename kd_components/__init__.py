"""Knowledge-distillation components for MONAI segmentation bundles.

The pieces a bundle config instantiates:

- :class:`FeatureTaps`: record the outputs of named submodules of any network;
- :class:`FeatureAdapter`: align a student feature to a teacher feature (channels and size, 2D/3D);
- :class:`DistillationTerm` and :class:`Distiller`: a distillation setup as a list of weighted loss terms, with
  two parameter groups: ``student_parameters()`` (adapters, trained with the student) and ``discriminators()``
  (the adversarial terms' discriminators, trained in their own step);
- :class:`DistillationTrainer` (:mod:`kd_components.engines`): MONAI's ``SupervisedTrainer`` with a frozen teacher
  and those terms, the one trainer of every method: adversarial terms bring their discriminator step, a per-sample
  labelled mask handles semi-supervised batches, no terms trains the student alone (optionally balancing the
  terms' weights from their gradient norms);
- :class:`EnsembleTeacher` and :func:`load_ensemble_teacher`: several teacher checkpoints averaged into one teacher;
- :func:`load_bundle_teacher`: any MONAI bundle (e.g. from the model zoo) as the teacher, checked against the
  student's task;
- :class:`ParaphraserTrainer` and :func:`load_paraphraser_encoder`: Factor Transfer's paraphraser stage;
- :func:`split_labelled`, :class:`PlaceholderLabeld`: KD on unlabelled samples, supervision on the labelled ones
  (``DistillationTrainer(..., semi_supervised=True)``); ``AdversarialDistillationTrainer``,
  ``SemiSupervisedDistillationTrainer`` and ``SemiSupervisedAdversarialDistillationTrainer`` are deprecated aliases;
- never losing a model: :class:`AtomicCheckpointSaver` (atomic checkpoints), :class:`TrainingStateCheckpoint`
  (resume), :class:`FiniteLossGuard` (NaN/Inf), :class:`BackupOnStart`, :func:`acquire_run_lock` (one run per
  folder), :func:`check_overrides` and :func:`check_input` (typos and misfits caught in ``initialize``);
- :mod:`kd_components.losses`: the distillation losses.
"""

from kd_components.adapters import FeatureAdapter, match_spatial_size
from kd_components.adversarial_trainer import AdversarialDistillationTrainer
from kd_components.bundle_teacher import BundleTeacherError, load_bundle_teacher
from kd_components.checkpoint import (
    AtomicCheckpointSaver,
    CheckpointWriteError,
    TrainingStateCheckpoint,
    atomic_save,
    check_writable_dir,
    save_state_dict,
)
from kd_components.checks import check_input, network_stride, require_validation_data
from kd_components.distiller import Distiller
from kd_components.engines import (
    BALANCED_WEIGHTS_KEY,
    SUPERVISED,
    DistillationTrainer,
    EpochMeans,
    FrozenEncoder,
    ParaphraserTrainer,
    balanced_weight_key,
    load_paraphraser_encoder,
    term_output_key,
)
from kd_components.ensemble import EnsembleTeacher, load_ensemble_teacher
from kd_components.handlers import BackupOnStart, FiniteLossGuard
from kd_components.overrides import OverrideError, check_overrides, validate_overrides
from kd_components.run_lock import RunLockError, acquire_run_lock, release_run_lock
from kd_components.schedules import LinearWarmup
from kd_components.semisupervised import (
    PlaceholderLabeld,
    SemiSupervisedAdversarialDistillationTrainer,
    SemiSupervisedDistillationTrainer,
    split_labelled,
)
from kd_components.taps import FeatureTaps, TapNotFoundError, list_tap_candidates, resolve_module, unwrap_network
from kd_components.terms import DistillationTerm
from kd_components.utils import (
    backup_existing,
    count_parameters,
    freeze,
    load_state_dict_file,
    load_teacher,
    require_file,
    wrap_ddp_if_trainable,
)

__version__ = "0.1.0"

__all__ = [
    "FeatureTaps",
    "TapNotFoundError",
    "list_tap_candidates",
    "resolve_module",
    "unwrap_network",
    "FeatureAdapter",
    "match_spatial_size",
    "DistillationTerm",
    "Distiller",
    "LinearWarmup",
    "DistillationTrainer",
    "EpochMeans",
    "SUPERVISED",
    "term_output_key",
    "BALANCED_WEIGHTS_KEY",
    "balanced_weight_key",
    "EnsembleTeacher",
    "load_ensemble_teacher",
    "load_bundle_teacher",
    "BundleTeacherError",
    "AdversarialDistillationTrainer",
    "ParaphraserTrainer",
    "FrozenEncoder",
    "load_paraphraser_encoder",
    "SemiSupervisedDistillationTrainer",
    "SemiSupervisedAdversarialDistillationTrainer",
    "PlaceholderLabeld",
    "split_labelled",
    "backup_existing",
    "count_parameters",
    "freeze",
    "load_state_dict_file",
    "load_teacher",
    "require_file",
    "wrap_ddp_if_trainable",
    "AtomicCheckpointSaver",
    "CheckpointWriteError",
    "TrainingStateCheckpoint",
    "atomic_save",
    "check_writable_dir",
    "save_state_dict",
    "check_input",
    "network_stride",
    "require_validation_data",
    "BackupOnStart",
    "FiniteLossGuard",
    "OverrideError",
    "check_overrides",
    "validate_overrides",
    "RunLockError",
    "acquire_run_lock",
    "release_run_lock",
]
