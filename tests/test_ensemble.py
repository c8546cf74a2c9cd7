"""Tests of kd_components.ensemble: the frozen ensemble teacher, its averaged logits and its one member's taps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events
from monai.bundle import ConfigParser
from monai.losses import DiceLoss
from monai.networks.nets import UNet

from kd_components import count_parameters
from kd_components.distiller import Distiller
from kd_components.ensemble import EnsembleTeacher, load_ensemble_teacher
from kd_components.taps import FeatureTaps, resolve_module
from kd_components.terms import DistillationTerm
from kd_components.trainer import DistillationTrainer
from tests.test_trainer import TAP, loader

SHAPES = {2: (2, 3, 16, 16), 3: (1, 3, 16, 16, 16)}


def teacher_net(dims: int = 2, out_channels: int = 2) -> UNet:
    return UNet(dims, 3, out_channels, (8, 16, 32), (2, 2), num_res_units=1, norm="batch")


def members(n: int = 3, dims: int = 2, out_channels: int = 2) -> list[UNet]:
    """``n`` differently initialised teachers, each with non-trivial batch-norm running statistics."""
    nets = []
    for seed in range(n):
        torch.manual_seed(seed)
        net = teacher_net(dims, out_channels)
        net.train()
        with torch.no_grad():
            net(torch.randn(*SHAPES[dims]) * (seed + 1))
        nets.append(net.eval())
    return nets


def own_output(network: torch.nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """The output of ``network``'s submodule ``name`` on ``x``, recorded on that network alone."""
    with FeatureTaps(network, [name]) as taps, torch.no_grad():
        network(x)
        return taps[name].clone()


@pytest.mark.parametrize("dims", [2, 3])
def test_output_is_the_mean_of_the_members_logits(dims):
    nets = members(3, dims)
    x = torch.randn(*SHAPES[dims])
    with torch.no_grad():
        expected = torch.stack([net(x) for net in nets]).mean(0)
        out = EnsembleTeacher(nets)(x)
    assert out.shape == expected.shape == (x.shape[0], 2, *x.shape[2:])
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, nets[0](x).detach(), atol=1e-3), "the members should differ"


@pytest.mark.parametrize("out_channels", [1, 2])
def test_probability_average_is_the_mean_posterior(out_channels):
    nets = members(3, out_channels=out_channels)
    x = torch.randn(*SHAPES[2])
    with torch.no_grad():
        out = EnsembleTeacher(nets, average="probabilities")(x)
        if out_channels == 1:
            expected, got = torch.stack([net(x).sigmoid() for net in nets]).mean(0), out.sigmoid()
        else:
            expected, got = torch.stack([net(x).softmax(1) for net in nets]).mean(0), out.softmax(1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_every_member_is_frozen_in_eval_mode():
    nets = members(3)
    for net in nets:
        net.train()
    ensemble = EnsembleTeacher(nets)
    assert not any(m.training for m in ensemble.modules())
    for net in nets:
        assert not any(m.training for m in net.modules())
        assert not any(p.requires_grad for p in net.parameters())


@pytest.mark.parametrize("tap_member", [0, 1, 2])
@pytest.mark.parametrize("dims", [2, 3])
def test_taps_come_from_the_chosen_member(tap_member, dims):
    nets = members(3, dims)
    ensemble = EnsembleTeacher(nets, tap_member=tap_member)
    assert resolve_module(ensemble, TAP, "teacher") is resolve_module(nets[tap_member], TAP)
    x = torch.randn(*SHAPES[dims])
    with FeatureTaps(ensemble, [TAP, "model.1.submodule"], owner="teacher") as taps, torch.no_grad():
        ensemble(x)
        tapped = {name: taps[name].clone() for name in taps.names}
    for name, value in tapped.items():
        torch.testing.assert_close(value, own_output(nets[tap_member], name, x))
        for other in set(range(3)) - {tap_member}:
            assert not torch.allclose(value, own_output(nets[other], name, x), atol=1e-3), (name, other)
    other = (tap_member + 1) % 3  # the other members stay reachable under members.<i>
    assert resolve_module(ensemble, f"members.{other}.{TAP}") is resolve_module(nets[other], TAP)


def test_gradients_never_reach_the_members():
    nets = members(2)
    ensemble = EnsembleTeacher(nets)
    x = torch.randn(*SHAPES[2], requires_grad=True)
    ensemble(x).pow(2).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0, "gradients should still flow to the input"
    for net in nets:
        assert all(p.grad is None for p in net.parameters())


def test_parameters_to_and_state_dict_round_trip(tmp_path):
    nets = members(3)
    ensemble = EnsembleTeacher(nets, tap_member=1)
    assert count_parameters(ensemble) == 3 * count_parameters(nets[0])
    assert len(list(ensemble.parameters())) == 3 * len(list(nets[0].parameters()))
    x = torch.randn(*SHAPES[2])
    with torch.no_grad():
        expected = ensemble(x)
    torch.save(ensemble.state_dict(), tmp_path / "ensemble.pt")
    fresh = EnsembleTeacher([teacher_net() for _ in range(3)], tap_member=1)
    fresh.load_state_dict(torch.load(tmp_path / "ensemble.pt", weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected)
    ensemble.to(torch.float64)
    assert all(p.dtype == torch.float64 for net in nets for p in net.parameters())
    assert all(b.dtype == torch.float64 for net in nets for b in net.buffers() if b.is_floating_point())
    with torch.no_grad():
        torch.testing.assert_close(ensemble(x.double()).float(), expected, atol=1e-5, rtol=1e-4)


@pytest.fixture()
def checkpoints(tmp_path):
    nets = members(3)
    paths = []
    for i, net in enumerate(nets):
        paths.append(tmp_path / f"teacher_{i}.pt")
        torch.save(net.state_dict(), paths[-1])
    return nets, paths


def test_load_ensemble_teacher_loads_each_checkpoint(checkpoints):
    nets, paths = checkpoints
    architecture = teacher_net()
    before = {k: v.clone() for k, v in architecture.state_dict().items()}
    ensemble = load_ensemble_teacher(architecture, [str(p) for p in paths], "cpu", tap_member=2)
    assert all(torch.equal(v, before[k]) for k, v in architecture.state_dict().items()), "the template was modified"
    assert ensemble.num_members == 3 and ensemble.tap_member == 2
    x = torch.randn(*SHAPES[2])
    with torch.no_grad():
        torch.testing.assert_close(ensemble(x), torch.stack([net(x) for net in nets]).mean(0))
        torch.testing.assert_close(own_output(ensemble, TAP, x), own_output(nets[2], TAP, x))
    assert not any(p.requires_grad for p in ensemble.parameters())


def test_load_errors_name_the_file(checkpoints, tmp_path):
    _, paths = checkpoints
    missing = tmp_path / "teacher_missing.pt"
    with pytest.raises(FileNotFoundError, match=r"member 1 of 3: teacher checkpoint not found: .*teacher_missing\.pt"):
        load_ensemble_teacher(teacher_net(), [paths[0], missing, paths[2]], hint="train the teachers")
    wide = UNet(2, 3, 2, (16, 32, 64), (2, 2), num_res_units=1, norm="batch")
    torch.save(wide.state_dict(), tmp_path / "wide.pt")
    with pytest.raises(ValueError, match=r"member 2 of 3: teacher checkpoint .*wide\.pt does not fit UNet"):
        load_ensemble_teacher(teacher_net(), [paths[0], paths[1], tmp_path / "wide.pt"])
    with pytest.raises(ValueError, match="at least one"):
        load_ensemble_teacher(teacher_net(), [])
    with pytest.raises(ValueError, match="out of range"):
        load_ensemble_teacher(teacher_net(), paths, tap_member=3)


def test_bundle_config_switches_teacher_by_overriding_it(checkpoints):
    nets, paths = checkpoints
    config = {
        "imports": ["$import kd_components"],
        "device": "cpu",
        "teacher_hint": "train the teachers",
        "teacher_def": {
            "_target_": "UNet",
            "spatial_dims": 2,
            "in_channels": 3,
            "out_channels": 2,
            "channels": [8, 16, 32],
            "strides": [2, 2],
            "num_res_units": 1,
            "norm": "batch",
        },
        "teacher_ckpts": [str(p) for p in paths],
        "teacher": "$kd_components.load_ensemble_teacher(@teacher_def, @teacher_ckpts, @device, "
        "tap_member=1, hint=@teacher_hint)",
        "teacher_target": {
            "_target_": "kd_components.load_ensemble_teacher",
            "network": "@teacher_def",
            "checkpoints": "@teacher_ckpts",
            "device": "@device",
            "tap_member": 1,
        },
    }
    parser = ConfigParser(config)
    x = torch.randn(*SHAPES[2])
    for key in ("teacher", "teacher_target"):
        ensemble = parser.get_parsed_content(key, instantiate=True)
        assert isinstance(ensemble, EnsembleTeacher)
        with torch.no_grad():
            torch.testing.assert_close(ensemble(x), torch.stack([net(x) for net in nets]).mean(0))
        torch.testing.assert_close(own_output(ensemble, TAP, x), own_output(nets[1], TAP, x))


def test_ensemble_is_a_teacher_in_the_distillation_trainer():
    """One iteration: the aligned feature term probes and reads the tap member, no member receives a gradient."""
    nets = members(2)
    ensemble = EnsembleTeacher(nets, tap_member=1)
    before = {k: v.clone() for k, v in ensemble.state_dict().items()}
    torch.manual_seed(0)
    student = UNet(2, 3, 2, (4, 8, 16), (2, 2), num_res_units=1)
    terms = [
        DistillationTerm("logit", F.mse_loss, {"input": "student", "target": "teacher"}),
        DistillationTerm(
            "feat", F.mse_loss, {"input": f"student:{TAP}", "target": f"teacher:{TAP}"}, align={"input": "target"}
        ),
    ]
    distiller = Distiller(terms, student, ensemble, (1, 3, 16, 16))
    optimizer = torch.optim.SGD([*student.parameters(), *distiller.parameters()], lr=0.1)
    trainer = DistillationTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=loader(2, batch_size=2),
        network=student,
        optimizer=optimizer,
        loss_function=DiceLoss(to_onehot_y=True, softmax=True),
        teacher=ensemble,
        distiller=distiller,
    )
    seen = {}

    @trainer.on(Events.ITERATION_COMPLETED)
    def _record(engine):
        seen.update(engine.state.output[0])

    tapped = []
    resolve_module(nets[1], TAP).register_forward_hook(lambda _m, _i, out: tapped.append(out))
    trainer.run()
    assert trainer.state.iteration == 1
    assert seen["loss_logit"] > 0 and seen["loss_feat"] > 0
    assert len(tapped) == 1, "the tap member runs once per iteration"
    assert distiller.terms[1].adapters["input"].proj.out_channels == 16, "adapter sized from the member's tap"
    assert trainer.distillation_settings()["kd.teacher_ensemble"] == "2 x UNet, mean of logits, taps of member 1"
    for name, value in ensemble.state_dict().items():
        assert torch.equal(value, before[name]), f"teacher {name} changed"
    assert all(p.grad is None for p in ensemble.parameters())
    assert not any(m.training for m in ensemble.modules())
