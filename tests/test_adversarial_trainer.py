"""Tests of kd_components.adversarial_trainer on tiny UNets, a tiny discriminator and a list-of-dicts loader."""

from __future__ import annotations

import functools
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
from kd_components.adversarial_trainer import AdversarialDistillationTrainer, discriminator_value_name
from kd_components.distiller import Distiller
from kd_components.engines import DistillationTrainer
from kd_components.handlers import DiscriminatorCheckpointSaver
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
    bank = distiller.discriminators()
    optimizer = torch.optim.Adam([*student.parameters(), *distiller.student_parameters()], lr=lr)
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


def test_discriminators_are_registered_submodules_with_their_own_parameter_group():
    """.to(), .train()/.eval() and state_dict() of the distiller reach the discriminator; the student's optimizer
    never holds a discriminator parameter, the discriminator optimizer holds exactly them."""
    kit = build(steps=1)
    distiller = kit.trainer.distiller
    d_params = {id(p) for p in kit.discriminator.parameters()}
    assert d_params <= {id(p) for p in distiller.parameters()}
    assert not d_params & {id(p) for p in distiller.student_parameters()}
    student_opt = {id(p) for g in kit.trainer.optimizer.param_groups for p in g["params"]}
    assert not d_params & student_opt
    assert {id(p) for g in kit.trainer.discriminator_optimizer.param_groups for p in g["params"]} == d_params
    assert kit.trainer.discriminators["adv"] is kit.discriminator
    keys = {f"terms.0.loss.discriminator.{k}" for k in kit.discriminator.state_dict()}
    assert keys <= set(distiller.state_dict())
    distiller.eval()
    assert not kit.discriminator.training
    distiller.train()
    assert kit.discriminator.training
    distiller.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in kit.discriminator.parameters())


def test_a_student_optimizer_holding_a_discriminator_is_refused_saying_what_to_build():
    student, teacher, discriminator = networks()
    distiller = Distiller([DistillationTerm("adv", AdversarialDistillationLoss(discriminator, "hinge"))])
    with pytest.raises(ValueError, match=r"discriminator parameters are in the student optimizer.*student_parameters"):
        DistillationTrainer(
            device="cpu",
            max_epochs=1,
            train_data_loader=DataLoader(data(), batch_size=2),
            network=student,
            optimizer=torch.optim.SGD([*student.parameters(), *distiller.parameters()], lr=0.1),
            loss_function=DiceLoss(to_onehot_y=True, softmax=True),
            teacher=teacher,
            distiller=distiller,
            discriminator_optimizer=functools.partial(torch.optim.Adam, lr=1e-3),
        )


def test_discriminator_checkpoint_keeps_its_format(tmp_path):
    """``{"discriminators": {"<term>.<parameter>": ...}, "discriminator_optimizer": ...}``, the keys written before
    the discriminators were registered in their losses; it loads into a fresh trainer's discriminators, and a file
    of another discriminator is refused naming the mismatch."""
    kit = build(steps=1)
    DiscriminatorCheckpointSaver(str(tmp_path), "discriminator.pt").attach(kit.trainer)
    kit.trainer.run()
    saved = torch.load(tmp_path / "discriminator.pt", weights_only=True)
    assert set(saved["discriminators"]) == {f"adv.{k}" for k in kit.discriminator.state_dict()}
    fresh = build(steps=1, seed=3)
    trainer = fresh.trainer
    objects = {"discriminators": trainer.discriminators, "discriminator_optimizer": trainer.discriminator_optimizer}
    CheckpointLoader(str(tmp_path / "discriminator.pt"), objects)(trainer)
    for k, v in kit.discriminator.state_dict().items():
        assert torch.equal(fresh.discriminator.state_dict()[k], v), k
    saved["discriminators"] = {k.replace("adv.", "other.", 1): v for k, v in saved["discriminators"].items()}
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*adv\."):
        fresh.trainer.discriminators.load_state_dict(saved["discriminators"])


@pytest.fixture
def process_group():
    store = tempfile.NamedTemporaryFile(delete=False)
    dist.init_process_group("gloo", init_method=f"file://{store.name}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ddp_wrapped_discriminator(process_group):
    kit = build(objective="wgan-gp", steps=1, ddp=True)
    assert isinstance(kit.adv.discriminator, torch.nn.parallel.DistributedDataParallel)
    assert kit.trainer.discriminators["adv"] is kit.discriminator
    before = snapshot(kit.discriminator)
    kit.trainer.run()
    assert any(not torch.equal(v, before[k]) for k, v in kit.discriminator.state_dict().items())
    assert not any(k.startswith("module.") or ".module." in k for k in kit.trainer.discriminators.state_dict())


def test_ddp_distiller_syncs_the_adapters_and_leaves_the_discriminators_to_their_own_step(process_group):
    """A DDP distiller holding a trainable adapter and a discriminator: DDP ignores the discriminator's parameters
    and buffers (the student step gives them no gradient; their own DDP wrapper syncs their step)."""
    student, teacher, discriminator = networks()
    terms = [
        DistillationTerm("adv", AdversarialDistillationLoss(wrap_ddp_if_trainable(discriminator, "cpu"), "wgan-gp")),
        DistillationTerm("fitnet", F.mse_loss, {"input": "student", "target": "teacher"}, align={"input": "target"}),
    ]
    distiller = Distiller(terms, student, teacher, (1, 3, 16, 16))
    wrapped = wrap_ddp_if_trainable(distiller, "cpu")
    assert isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)
    ignored = set(wrapped.parameters_to_ignore)
    assert {f"terms.0.loss.discriminator.module.{n}" for n, _ in discriminator.named_parameters()} <= ignored
    assert not any(n.startswith("terms.1.") for n in ignored)
    adapter_before = snapshot(terms[1].adapters)
    d_before = snapshot(discriminator)
    trainer = factory_trainer(student, teacher, wrapped, epochs=2)
    trainer.run()  # 4 iterations: a discriminator in DDP's buckets would fail ("expected to finish reduction")
    assert any(not torch.equal(v, adapter_before[k]) for k, v in terms[1].adapters.state_dict().items())
    assert any(not torch.equal(v, d_before[k]) for k, v in discriminator.state_dict().items())
    only_discriminators = Distiller([DistillationTerm("adv", AdversarialDistillationLoss(networks()[2], "hinge"))])
    assert wrap_ddp_if_trainable(only_discriminators, "cpu") is only_discriminators  # nothing for DDP to sync


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


# one trainer: the discriminator step belongs to the adversarial terms, its cost levers, the optimizer factory


def factory_trainer(
    student: torch.nn.Module, teacher: torch.nn.Module, distiller: torch.nn.Module, epochs: int = 1, **kwargs
) -> DistillationTrainer:
    """A ``DistillationTrainer`` on the test data, the student's optimizer taking ``student_parameters()`` and the
    discriminator optimizer built by the trainer from a factory."""
    own = distiller.module if isinstance(distiller, torch.nn.parallel.DistributedDataParallel) else distiller
    return DistillationTrainer(
        device="cpu",
        max_epochs=epochs,
        train_data_loader=DataLoader(data(), batch_size=2),
        network=student,
        optimizer=torch.optim.Adam([*student.parameters(), *own.student_parameters()], lr=1e-3),
        loss_function=DiceLoss(to_onehot_y=True, softmax=True),
        teacher=teacher,
        distiller=distiller,
        discriminator_optimizer=functools.partial(torch.optim.Adam, lr=1e-3, betas=(0.5, 0.9)),
        **kwargs,
    )


def _one_trainer(kit_args: dict | None = None, **trainer_kwargs) -> SimpleNamespace:
    """``build``'s setup through ``DistillationTrainer`` itself, the discriminator optimizer from a factory."""
    kit_args = kit_args or {}
    student, teacher, discriminator = networks(kit_args.get("seed", 0))
    adv = AdversarialDistillationLoss(discriminator, kit_args.get("objective", "hinge"))
    terms = [
        DistillationTerm("adv", adv, weight=1.0),
        DistillationTerm("logit", F.mse_loss, {"input": "student", "target": "teacher"}, weight=0.1),
    ]
    distiller = Distiller(terms)
    epochs, steps = kit_args.get("epochs", 1), kit_args.get("steps", 1)
    trainer = factory_trainer(student, teacher, distiller, epochs, discriminator_steps=steps, **trainer_kwargs)
    return SimpleNamespace(trainer=trainer, student=student, discriminator=discriminator, adv=adv)


def test_the_one_trainer_builds_the_discriminator_optimizer_and_matches_the_old_entry_point():
    """A factory gives the same run, to the bit, as the deprecated AdversarialDistillationTrainer with an optimizer."""
    old, new = build(objective="wgan-gp", steps=2), _one_trainer({"objective": "wgan-gp", "steps": 2})
    assert type(old.trainer) is DistillationTrainer and isinstance(
        new.trainer.discriminator_optimizer, torch.optim.Adam
    )
    assert [p for g in new.trainer.discriminator_optimizer.param_groups for p in g["params"]] == list(
        new.trainer.discriminators.parameters()
    )
    for kit in (old, new):
        torch.manual_seed(7)  # WGAN-GP's interpolation draws
        kit.trainer.run()
    for (name, a), b in zip(old.student.state_dict().items(), new.student.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for (name, a), b in zip(old.discriminator.state_dict().items(), new.discriminator.state_dict().values()):
        assert torch.equal(a, b), name


def test_critic_every_updates_the_discriminators_one_iteration_in_n():
    kit = _one_trainer({"epochs": 2}, critic_every=2)  # 2 iterations per epoch: D steps at iterations 1 and 3
    events, outputs = [], []
    kit.trainer.discriminator_optimizer.register_step_post_hook(lambda *_: events.append("D"))
    kit.trainer.optimizer.register_step_post_hook(lambda *_: events.append("S"))
    kit.trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(dict(e.state.output[0])))
    kit.trainer.run()
    assert events == ["D", "S", "S", "D", "S", "S"]
    reported = ["loss_adv_discriminator" in o for o in outputs]
    assert reported == [True, False, True, False]
    assert kit.trainer.state.metrics["train_adv_discriminator"] == pytest.approx(
        float(outputs[2]["loss_adv_discriminator"]), rel=1e-6
    )  # the mean of the epoch's updating iterations only
    assert kit.trainer.distillation_settings()["kd.critic_every"] == 2


def test_gp_every_computes_the_penalty_lazily_and_scaled(monkeypatch):
    kit = _one_trainer({"objective": "wgan-gp", "steps": 3}, gp_every=2)  # 2 iterations x 3 critic steps
    calls = []
    penalty = kit.adv.objective.gradient_penalty

    def spy(discriminator, real, fake):
        value = penalty(discriminator, real, fake)
        calls.append(value.detach())
        return value

    monkeypatch.setattr(kit.adv.objective, "gradient_penalty", spy)
    scales = []
    original = WGANGPObjective.discriminator_loss

    def record(self, discriminator, real, fake, gp_scale=1.0, batched=False):
        scales.append(gp_scale)
        return original(self, discriminator, real, fake, gp_scale=gp_scale, batched=batched)

    monkeypatch.setattr(WGANGPObjective, "discriminator_loss", record)
    kit.trainer.run()
    assert scales == [2.0, 0.0, 2.0, 0.0, 2.0, 0.0]  # the critic steps 0, 2, 4 of the term carry the penalty, x2
    assert len(calls) == 3
    # the loss of a lazy step is the Wasserstein estimate plus gp_weight * k * penalty
    real, fake = torch.randn(2, 2, 16, 16), torch.randn(2, 2, 16, 16)
    kit.discriminator.eval()
    objective = WGANGPObjective(gp_weight=10.0, rng=torch.Generator().manual_seed(0))
    lazy = objective.discriminator_loss(kit.discriminator, real, fake, gp_scale=2.0)
    objective.rng.manual_seed(0)
    plain = objective.discriminator_loss(kit.discriminator, real, fake)
    skipped = objective.discriminator_loss(kit.discriminator, real, fake, gp_scale=0.0)
    assert float(lazy - skipped) == pytest.approx(2.0 * float(plain - skipped), rel=1e-4)


@pytest.mark.parametrize("objective", ["hinge", "wgan-gp"])
def test_batched_critic_pass_equals_two_passes_for_a_per_sample_discriminator(objective):
    """One pass on cat([real, fake]) gives the loss of two passes when samples do not interact (no BatchNorm, no
    spectral-norm update): the lever only changes the cost."""
    torch.manual_seed(0)
    discriminator = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.LeakyReLU(0.2), torch.nn.Conv2d(4, 1, 3))
    loss = AdversarialDistillationLoss(discriminator, objective)
    if objective == "wgan-gp":
        loss.objective.gp_weight = 0.0  # the penalty draws random interpolates; compared separately above
    student, teacher = torch.randn(3, 2, 8, 8), torch.randn(3, 2, 8, 8)
    two = loss.discriminator_step_loss(student, teacher)
    one = loss.discriminator_step_loss(student, teacher, batched=True)
    assert float(one) == pytest.approx(float(two), rel=1e-6)


def test_cost_levers_are_checked():
    with pytest.raises(ValueError, match="critic_every"):
        _one_trainer(critic_every=0)
    with pytest.raises(ValueError, match="gp_every"):
        _one_trainer(gp_every=0)
    with pytest.raises(ValueError, match="discriminator_steps"):
        _one_trainer({"steps": -1})


def test_adversarial_terms_without_a_discriminator_optimizer_say_what_to_give():
    student, teacher, discriminator = networks()
    distiller = Distiller([DistillationTerm("adv", AdversarialDistillationLoss(discriminator, "hinge"))])
    with pytest.raises(ValueError, match="give the trainer a discriminator_optimizer"):
        DistillationTrainer(
            device="cpu",
            max_epochs=1,
            train_data_loader=DataLoader(data(), batch_size=2),
            network=student,
            optimizer=torch.optim.SGD(student.parameters(), lr=0.1),
            loss_function=DiceLoss(to_onehot_y=True, softmax=True),
            teacher=teacher,
            distiller=distiller,
        )


def test_discriminator_checkpoint_saver_writes_only_when_there_are_discriminators(tmp_path):
    kit = _one_trainer()
    saver = DiscriminatorCheckpointSaver(str(tmp_path / "adv"), "discriminator.pt")
    saver.attach(kit.trainer)
    kit.trainer.run()
    saved = torch.load(tmp_path / "adv" / "discriminator.pt", weights_only=True)
    assert set(saved) == {"discriminators", "discriminator_optimizer"} and set(saved["discriminators"])

    student, teacher, _ = networks()
    plain = DistillationTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=DataLoader(data(), batch_size=2),
        network=student,
        optimizer=torch.optim.SGD(student.parameters(), lr=0.1),
        loss_function=DiceLoss(to_onehot_y=True, softmax=True),
        teacher=teacher,
        distiller=Distiller([DistillationTerm("logit", F.mse_loss, {"input": "student", "target": "teacher"})]),
        discriminator_optimizer=functools.partial(torch.optim.Adam, lr=1e-3),  # a bundle default: unused here
    )
    idle = DiscriminatorCheckpointSaver(str(tmp_path / "none"), "discriminator.pt")
    idle.attach(plain)
    plain.run()
    assert idle.saver is None and plain.adversarial is None and not (tmp_path / "none").exists()


def test_old_trainer_names_warn_and_build_the_one_trainer():
    from kd_components.semisupervised import SemiSupervisedAdversarialDistillationTrainer

    with pytest.warns(DeprecationWarning, match="use kd_components.DistillationTrainer"):
        kit = build()
    assert type(kit.trainer) is DistillationTrainer and kit.trainer.adversarial is not None
    student, teacher, discriminator = networks()
    distiller = Distiller([DistillationTerm("adv", AdversarialDistillationLoss(discriminator, "hinge"))])
    with pytest.warns(DeprecationWarning, match="semi_supervised=True"):
        trainer = SemiSupervisedAdversarialDistillationTrainer(
            device="cpu",
            max_epochs=1,
            train_data_loader=DataLoader(data(), batch_size=2),
            network=student,
            optimizer=torch.optim.SGD(student.parameters(), lr=0.1),
            loss_function=DiceLoss(to_onehot_y=True, softmax=True),
            teacher=teacher,
            distiller=distiller,
            discriminator_optimizer=functools.partial(torch.optim.Adam, lr=1e-3),
        )
    assert type(trainer) is DistillationTrainer and trainer.semi_supervised
