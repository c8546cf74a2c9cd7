"""Tests of kd_components.paraphraser_trainer: pre-training on real teacher features, checkpoint, frozen encoder."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events
from monai.handlers import CheckpointSaver
from monai.losses import DiceLoss
from monai.networks.nets import UNet
from torch.utils.data import DataLoader

from kd_components.distiller import Distiller
from kd_components.losses import FactorTransferLoss
from kd_components.modules import Paraphraser, Translator
from kd_components.paraphraser_trainer import FrozenEncoder, ParaphraserTrainer, load_paraphraser_encoder
from kd_components.taps import FeatureTaps
from kd_components.terms import DistillationTerm
from kd_components.trainer import DistillationTrainer

TAP = "model.0"  # teacher: 8 channels at 8×8; student: 4 channels at 8×8
FACTOR = 4


def teacher_net() -> UNet:
    torch.manual_seed(0)
    return UNet(2, 3, 2, (8, 16), (2,), num_res_units=0)


def data(n: int = 8) -> list[dict]:
    """Smooth random images (upsampled 4×4 noise): teacher features with spatial structure to compress."""
    gen = torch.Generator().manual_seed(1)
    return [
        {
            "image": F.interpolate(torch.randn(1, 3, 4, 4, generator=gen), size=(16, 16), mode="bilinear")[0],
            "label": (torch.rand(1, 16, 16, generator=gen) > 0.5).float(),
        }
        for _ in range(n)
    ]


def teacher_features(teacher: UNet) -> torch.Tensor:
    images = torch.stack([d["image"] for d in data()])
    with FeatureTaps(teacher, [TAP]) as taps, torch.no_grad():
        teacher(images)
        return taps[TAP].clone()


def reconstruction_error(paraphraser: Paraphraser, features: torch.Tensor) -> float:
    with torch.no_grad():
        return float(paraphraser.reconstruction_loss(features))


class EpochMetricRecorder:
    """A train handler that records ``train_reconstruction`` as the handlers attached after it see it."""

    def __init__(self) -> None:
        self.seen: list[float | None] = []

    def attach(self, engine) -> None:
        engine.add_event_handler(
            Events.EPOCH_COMPLETED, lambda e: self.seen.append(e.state.metrics.get("train_reconstruction"))
        )


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Twenty epochs (40 iterations) of paraphraser pre-training, saved by a MONAI CheckpointSaver as paraphraser.pt."""
    teacher = teacher_net()
    torch.manual_seed(2)
    paraphraser = Paraphraser(2, 8, factor_channels=FACTOR)
    features = teacher_features(teacher)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    before = reconstruction_error(paraphraser, features)
    out = tmp_path_factory.mktemp("ckpt")
    recorder = EpochMetricRecorder()
    trainer = ParaphraserTrainer(
        device="cpu",
        max_epochs=20,
        train_data_loader=DataLoader(data(), batch_size=4),
        network=paraphraser,
        optimizer=torch.optim.Adam(paraphraser.parameters(), lr=1e-2),
        teacher=teacher,
        tap=TAP,
        train_handlers=[
            CheckpointSaver(str(out), {"paraphraser": paraphraser}, save_final=True, final_filename="paraphraser.pt"),
            recorder,
        ],
    )
    trainer.run()
    return SimpleNamespace(
        teacher=teacher,
        paraphraser=paraphraser,
        features=features,
        before=before,
        after=reconstruction_error(paraphraser, features),
        teacher_before=teacher_before,
        trainer=trainer,
        recorder=recorder,
        path=out / "paraphraser.pt",
    )


def test_pretraining_reduces_reconstruction_error(pretrained):
    # measured: 0.52 -> 0.24; predicting each channel's mean would give the feature variance (0.43)
    assert pretrained.after < 0.6 * pretrained.before, (pretrained.before, pretrained.after)
    variance = float(pretrained.features.var(dim=(0, 2, 3)).mean())
    assert pretrained.after < 0.8 * variance, "the paraphraser learned little more than the mean feature"
    metric = pretrained.trainer.state.metrics["train_reconstruction"]
    assert 0 < metric < pretrained.before


def test_train_handlers_see_the_epoch_mean(pretrained):
    seen = pretrained.recorder.seen
    assert len(seen) == 20 and all(v is not None for v in seen), seen
    assert seen[-1] == pretrained.trainer.state.metrics["train_reconstruction"] and seen[-1] < seen[0]


def test_teacher_frozen_and_unchanged(pretrained):
    for name, value in pretrained.teacher.state_dict().items():
        assert torch.equal(value, pretrained.teacher_before[name]), name
    assert all(p.grad is None and not p.requires_grad for p in pretrained.teacher.parameters())
    assert not any(m.training for m in pretrained.teacher.modules())


def test_checkpoint_is_a_plain_state_dict(pretrained):
    state = torch.load(pretrained.path, weights_only=True)
    assert state.keys() == pretrained.paraphraser.state_dict().keys()


def test_loaded_encoder_is_frozen_and_identical(pretrained):
    torch.manual_seed(9)
    encoder = load_paraphraser_encoder(Paraphraser(2, 8, factor_channels=FACTOR), pretrained.path)
    assert isinstance(encoder, FrozenEncoder)
    encoder.train()  # e.g. a distiller switched to training mode: the encoder must stay in eval mode
    assert not any(m.training for m in encoder.modules())
    assert all(not p.requires_grad for p in encoder.parameters())
    trained = pretrained.paraphraser.encoder.state_dict()
    for name, value in encoder.encoder.state_dict().items():
        assert torch.equal(value, trained[name]), name
    with torch.no_grad():
        assert torch.equal(encoder(pretrained.features), pretrained.paraphraser.encode(pretrained.features))


def test_missing_or_mismatched_checkpoint(pretrained, tmp_path):
    with pytest.raises(FileNotFoundError, match="paraphraser pre-training stage"):
        load_paraphraser_encoder(Paraphraser(2, 8, factor_channels=FACTOR), tmp_path / "paraphraser.pt")
    with pytest.raises(ValueError, match="does not fit"):
        load_paraphraser_encoder(Paraphraser(2, 8, factor_channels=2), pretrained.path)


def test_wrong_paraphraser_width_is_reported():
    teacher = teacher_net()
    paraphraser = Paraphraser(2, 5, factor_channels=FACTOR)
    trainer = ParaphraserTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=DataLoader(data(2), batch_size=2),
        network=paraphraser,
        optimizer=torch.optim.Adam(paraphraser.parameters()),
        teacher=teacher,
        tap=TAP,
    )
    with pytest.raises(ValueError, match="set the paraphraser's in_channels to 8"):
        trainer.run()


def test_factor_transfer_trains_translator_never_paraphraser(pretrained):
    teacher = pretrained.teacher
    torch.manual_seed(3)
    student = UNet(2, 3, 2, (4, 8), (2,), num_res_units=0)
    encoder = load_paraphraser_encoder(Paraphraser(2, 8, factor_channels=FACTOR), pretrained.path)
    translator = Translator(2, 4, FACTOR)
    term = DistillationTerm(
        "factor",
        FactorTransferLoss(),
        {"student": f"student:{TAP}", "teacher": f"teacher:{TAP}"},
        weight=100.0,
        transforms={"student": translator, "teacher": encoder},
    )
    distiller = Distiller([term])
    distiller.train()
    encoder_before = {k: v.clone() for k, v in encoder.state_dict().items()}
    translator_before = {k: v.clone() for k, v in translator.state_dict().items()}
    params = [p for p in [*student.parameters(), *distiller.parameters()] if p.requires_grad]
    trainer = DistillationTrainer(
        device="cpu",
        max_epochs=2,
        train_data_loader=DataLoader(data(4), batch_size=2),
        network=student,
        optimizer=torch.optim.Adam(params, lr=1e-2),
        loss_function=DiceLoss(to_onehot_y=True, softmax=True),
        teacher=teacher,
        distiller=distiller,
    )
    trainer.run()
    assert trainer.state.metrics["train_factor"] > 0
    for name, value in encoder.state_dict().items():
        assert torch.equal(value, encoder_before[name]), f"paraphraser encoder {name} changed"
    assert all(p.grad is None for p in encoder.parameters())
    assert not any(m.training for m in encoder.modules())
    changed = [k for k, v in translator.state_dict().items() if not torch.equal(v, translator_before[k])]
    assert len(changed) == len(translator_before), f"only {changed} of the translator learned"


def test_tap_may_be_a_teacher_source_as_in_the_bundles_taps_section():
    """``tap`` takes a bundle's ``@taps#<name>#teacher`` ("teacher:<module>") as well as a bare module name."""
    teacher = teacher_net()
    paraphraser = Paraphraser(2, 8, factor_channels=FACTOR)
    common = dict(device="cpu", max_epochs=1, train_data_loader=DataLoader(data(2), batch_size=2), teacher=teacher)
    trainer = ParaphraserTrainer(
        network=paraphraser, optimizer=torch.optim.Adam(paraphraser.parameters()), tap=f"teacher:{TAP}", **common
    )
    assert trainer.tap == TAP
    with pytest.raises(ValueError, match="reads a teacher tap"):
        ParaphraserTrainer(
            network=paraphraser, optimizer=torch.optim.Adam(paraphraser.parameters()), tap=f"student:{TAP}", **common
        )
