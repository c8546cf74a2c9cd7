"""Tests of kd_components.adversarial_trainer on tiny UNets, a tiny discriminator and a list-of-dicts loader."""

from __future__ import annotations

import tempfile
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ignite.engine import Events
from monai.engines import IterationEvents
from monai.handlers import CheckpointLoader, CheckpointSaver
from monai.losses import DiceLoss
from monai.networks.nets import UNet
from torch.utils.data import DataLoader

from kd_components import wrap_ddp_if_trainable
from kd_components.adversarial_trainer import (
    AdversarialDistillationTrainer,
    DiscriminatorBank,
    discriminator_value_name,
)
from kd_components.distiller import Distiller
from kd_components.losses import AdversarialDistillationLoss, WGANGPObjective
from kd_components.modules import SelfAttentionDiscriminator
from kd_components.terms import DistillationTerm


def networks(seed: int = 0):
    torch.manual_seed(seed)
    student = UNet(2, 3, 2, (4, 8), (2,), num_res_units=0)
    teacher = UNet(2, 3, 2, (8, 16), (2,), num_res_units=0)
    discriminator = SelfAttentionDiscriminator(2, 2, channels=(8, 16), attention_blocks=(1,), tanh_inputs=True)
    return student, teacher, discriminator


def data(n: int = 4) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    return [
        {"image": torch.randn(3, 16, 16, generator=gen), "label": (torch.rand(1, 16, 16, generator=gen) > 0.5).float()}
        for _ in range(n)
    ]


def build(
    objective="hinge",
    steps: int = 1,
    epochs: int = 1,
    lr: float = 1e-3,
    lr_d: float = 1e-3,
    supervised_weight: float = 1.0,
    logit_weight: float = 0.1,
    seed: int = 0,
    ddp: bool = False,
    **kwargs,
) -> SimpleNamespace:
    student, teacher, discriminator = networks(seed)
    held = wrap_ddp_if_trainable(discriminator, "cpu") if ddp else discriminator
    adv = AdversarialDistillationLoss(held, objective)
    terms = [
        DistillationTerm("adv", adv, weight=1.0),
        DistillationTerm("logit", F.mse_loss, {"input": "student", "target": "teacher"}, weight=logit_weight),
    ]
    distiller = Distiller(terms)
    bank = DiscriminatorBank(distiller)
    optimizer = torch.optim.Adam([*student.parameters(), *distiller.parameters()], lr=lr)
    d_optimizer = torch.optim.Adam(bank.parameters(), lr=lr_d, betas=(0.5, 0.9))
    trainer = AdversarialDistillationTrainer(
        device="cpu",
        max_epochs=epochs,
        train_data_loader=DataLoader(data(), batch_size=2),
        network=student,
        optimizer=optimizer,
        loss_function=DiceLoss(to_onehot_y=True, softmax=True),
        teacher=teacher,
        distiller=distiller,
        discriminator_optimizer=d_optimizer,
        discriminator_steps=steps,
        discriminators=bank,
        supervised_weight=supervised_weight,
        **kwargs,
    )
    return SimpleNamespace(
        trainer=trainer, student=student, teacher=teacher, discriminator=discriminator, adv=adv, bank=bank
    )


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def fixed_outputs(kit: SimpleNamespace) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher logits on the whole (fixed) training set."""
    images = torch.stack([d["image"] for d in data()])
    with torch.no_grad():
        return kit.student(images), kit.teacher(images)


def discriminator_loss(kit: SimpleNamespace) -> float:
    student, teacher = fixed_outputs(kit)
    kit.discriminator.eval()  # no spectral-norm power iteration during the measurement
    return float(kit.adv.discriminator_step_loss(student, teacher).detach())


def generator_loss(kit: SimpleNamespace) -> float:
    student, teacher = fixed_outputs(kit)
    kit.discriminator.eval()
    with torch.no_grad():
        return float(kit.adv(student, teacher))


@pytest.fixture(scope="module")
def run():
    """Two iterations with two discriminator steps each, every optimizer step and gradient recorded."""
    kit = build(objective="hinge", steps=2)
    trainer = kit.trainer
    kit.events, kit.outputs, kit.metrics = [], [], {}
    kit.teacher_before, kit.d_before = snapshot(kit.teacher), snapshot(kit.discriminator)
    kit.d_grads_in_student_step, kit.d_grads_at_end = [], []
    phase = {"now": "discriminator"}
    trainer.discriminator_optimizer.register_step_post_hook(lambda *_: kit.events.append("D"))
    trainer.optimizer.register_step_post_hook(lambda *_: kit.events.append("S"))
    for p in kit.discriminator.parameters():
        p.register_hook(lambda g: kit.d_grads_in_student_step.append(phase["now"] == "student"))

    @trainer.on(IterationEvents.LOSS_COMPLETED)
    def _student_phase(engine):
        phase["now"] = "student"

    @trainer.on(Events.ITERATION_COMPLETED)
    def _record(engine):
        phase["now"] = "discriminator"
        kit.outputs.append(dict(engine.state.output[0]))
        kit.d_grads_at_end.append([p.grad for p in kit.discriminator.parameters()])

    @trainer.on(Events.EPOCH_COMPLETED)
    def _metrics(engine):
        kit.metrics = dict(engine.state.metrics)

    trainer.run()
    return kit


def test_discriminator_and_student_steps_alternate(run):
    assert run.events == ["D", "D", "S", "D", "D", "S"]


def test_discriminator_loss_reported_and_averaged(run):
    key = "loss_" + discriminator_value_name("adv")
    assert key == "loss_adv_discriminator"
    values = [float(o[key]) for o in run.outputs]
    assert len(values) == 2 and all(torch.isfinite(torch.tensor(values)))
    assert run.metrics["train_adv_discriminator"] == pytest.approx(sum(values) / 2, rel=1e-5)
    assert "train_adv" in run.metrics and "loss_adv" in run.outputs[0]


def test_teacher_frozen_and_unchanged(run):
    after = run.teacher.state_dict()
    for name, before in run.teacher_before.items():
        assert torch.equal(after[name], before), name
    assert all(p.grad is None and not p.requires_grad for p in run.teacher.parameters())


def test_discriminator_learns_but_never_from_the_student_step(run):
    changed = [k for k, v in run.discriminator.state_dict().items() if not torch.equal(v, run.d_before[k])]
    assert any("head" in k for k in changed), "the discriminator did not learn"
    assert run.d_grads_in_student_step, "the hooks recorded no discriminator gradient at all"
    assert not any(run.d_grads_in_student_step), "the student step wrote a discriminator gradient"
    for grads in run.d_grads_at_end:
        assert all(g is None for g in grads)


def test_discriminator_improves_when_the_student_is_frozen():
    kit = build(objective="hinge", steps=1, epochs=6, lr=0.0, lr_d=2e-3)
    student_before = snapshot(kit.student)
    before = discriminator_loss(kit)
    kit.trainer.run()
    after = discriminator_loss(kit)
    assert all(torch.equal(v, student_before[k]) for k, v in kit.student.state_dict().items())
    assert after < before - 0.2, (before, after)  # measured: 2.05 -> 1.49


def test_student_improves_against_a_fixed_discriminator():
    # only the adversarial term trains the student: no supervised loss, no logit term
    kit = build(objective="wgan-gp", steps=0, epochs=4, lr=1e-2, supervised_weight=0.0, logit_weight=0.0)
    d_before = snapshot(kit.discriminator)
    before = generator_loss(kit)
    kit.trainer.run()
    after = generator_loss(kit)
    assert all(torch.equal(v, d_before[k]) for k, v in kit.discriminator.state_dict().items())
    assert after < before - 0.05, (before, after)  # measured: -0.25 -> -0.40
    assert "loss_adv_discriminator" not in kit.trainer.state.output[0]


@pytest.mark.parametrize("objective", ["hinge", "wgan-gp"])
def test_objectives_run(objective):
    kit = build(objective=objective, steps=1)
    before = snapshot(kit.discriminator)
    kit.trainer.run()
    value = kit.trainer.state.metrics["train_adv_discriminator"]
    assert torch.isfinite(torch.tensor(value))
    assert any(not torch.equal(v, before[k]) for k, v in kit.discriminator.state_dict().items())
    if objective == "wgan-gp":
        assert isinstance(kit.adv.objective, WGANGPObjective)


def test_checkpoint_round_trip_with_monai_handlers(tmp_path):
    kit = build(steps=1)
    saver = CheckpointSaver(
        str(tmp_path),
        {"discriminators": kit.bank, "discriminator_optimizer": kit.trainer.discriminator_optimizer},
        save_final=True,
        final_filename="adversarial.pt",
    )
    saver.attach(kit.trainer)
    kit.trainer.run()
    path = tmp_path / "adversarial.pt"
    saved = torch.load(path, weights_only=True)
    assert not any(k.startswith("module.") for k in saved["discriminators"])

    fresh = build(steps=1, seed=5)
    head = "head.parametrizations.weight.original"
    assert not torch.equal(fresh.discriminator.state_dict()[head], kit.discriminator.state_dict()[head])
    assert not fresh.trainer.discriminator_optimizer.state
    loader = CheckpointLoader(
        str(path), {"discriminators": fresh.bank, "discriminator_optimizer": fresh.trainer.discriminator_optimizer}
    )
    loader(fresh.trainer)
    for k, v in kit.discriminator.state_dict().items():
        assert torch.equal(fresh.discriminator.state_dict()[k], v), k
    old, new = kit.trainer.discriminator_optimizer.state_dict(), fresh.trainer.discriminator_optimizer.state_dict()
    assert old["state"].keys() == new["state"].keys() and old["state"]
    for idx, state in old["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(new["state"][idx][name]), torch.as_tensor(value)), (idx, name)


def test_adversarial_state_round_trip(tmp_path):
    kit = build(steps=1)
    kit.trainer.run()
    torch.save(kit.trainer.adversarial_state.state_dict(), tmp_path / "adv.pt")
    fresh = build(steps=1, seed=3)
    fresh.trainer.adversarial_state.load_state_dict(torch.load(tmp_path / "adv.pt", weights_only=True))
    for k, v in kit.discriminator.state_dict().items():
        assert torch.equal(fresh.discriminator.state_dict()[k], v), k
    assert fresh.trainer.discriminator_optimizer.state_dict()["state"].keys() == {
        *kit.trainer.discriminator_optimizer.state_dict()["state"]
    }


def test_ddp_wrapped_discriminator():
    store = tempfile.NamedTemporaryFile(delete=False)
    dist.init_process_group("gloo", init_method=f"file://{store.name}", rank=0, world_size=1)
    try:
        kit = build(objective="wgan-gp", steps=1, ddp=True)
        assert isinstance(kit.adv.discriminator, torch.nn.parallel.DistributedDataParallel)
        assert kit.bank["adv"] is kit.discriminator
        before = snapshot(kit.discriminator)
        kit.trainer.run()
        assert any(not torch.equal(v, before[k]) for k, v in kit.discriminator.state_dict().items())
        assert not any(k.startswith("module.") for k in kit.trainer.adversarial_state.state_dict()["discriminators"])
    finally:
        dist.destroy_process_group()


def test_configuration_errors():
    kit = build()
    student, teacher, _ = networks()
    common = dict(
        device="cpu",
        max_epochs=1,
        train_data_loader=DataLoader(data(), batch_size=2),
        network=student,
        loss_function=DiceLoss(to_onehot_y=True, softmax=True),
        teacher=teacher,
    )
    plain = Distiller([DistillationTerm("logit", F.mse_loss, {"input": "student", "target": "teacher"})])
    with pytest.raises(ValueError, match="no distillation term has an AdversarialDistillationLoss"):
        AdversarialDistillationTrainer(
            **common,
            optimizer=torch.optim.SGD(student.parameters(), lr=0.1),
            distiller=plain,
            discriminator_optimizer=torch.optim.SGD(kit.bank.parameters(), lr=0.1),
        )
    distiller = kit.trainer.distiller
    with pytest.raises(ValueError, match="in the student optimizer"):
        AdversarialDistillationTrainer(
            **common,
            optimizer=torch.optim.SGD([*student.parameters(), *kit.bank.parameters()], lr=0.1),
            distiller=distiller,
            discriminator_optimizer=torch.optim.SGD(kit.bank.parameters(), lr=0.1),
        )
    with pytest.raises(ValueError, match="missing from discriminator_optimizer"):
        AdversarialDistillationTrainer(
            **common,
            optimizer=torch.optim.SGD(student.parameters(), lr=0.1),
            distiller=distiller,
            discriminator_optimizer=torch.optim.SGD(list(kit.bank.parameters())[:1], lr=0.1),
        )
    with pytest.raises(ValueError, match="discriminator_steps"):
        AdversarialDistillationTrainer(
            **common,
            optimizer=torch.optim.SGD(student.parameters(), lr=0.1),
            distiller=distiller,
            discriminator_optimizer=torch.optim.SGD(kit.bank.parameters(), lr=0.1),
            discriminator_steps=-1,
        )
