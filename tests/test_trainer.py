"""Tests of kd_components.trainer: DistillationTrainer on tiny UNets and a list-of-dicts loader.

One shared two-epoch run (4 iterations) is recorded by hooks and event handlers; most tests check properties of
that record: the frozen teacher, what learns, the engine output and its arithmetic, the epoch means.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events
from monai.handlers import MLFlowHandler, from_engine
from monai.losses import DiceLoss
from monai.networks.nets import UNet
from torch import nn
from torch.utils.data import DataLoader

from kd_components.distiller import Distiller
from kd_components.schedules import LinearWarmup
from kd_components.terms import DistillationTerm
from kd_components.trainer import SUPERVISED, DistillationTrainer, term_output_key

TAP = "model.1.submodule.0"  # 8 channels in the student, 32 in the teacher
SHAPE = (1, 3, 16, 16)
SUPERVISED_WEIGHT = 0.7
LOGIT_WEIGHT, FEAT_WEIGHT = 0.5, 2.0
WARMUP_FACTORS = [0.0, 0.5, 1.0, 1.0]  # LinearWarmup(2) at iterations 1..4, written out independently


def networks():
    torch.manual_seed(0)
    student = UNet(2, 3, 2, (4, 8, 16), (2, 2), num_res_units=1)
    teacher = UNet(2, 3, 2, (16, 32, 64), (2, 2), num_res_units=1, norm="batch")  # batch norm: running stats
    return student, teacher


def loader(n: int = 4, batch_size: int = 2) -> DataLoader:
    gen = torch.Generator().manual_seed(1)
    data = [
        {"image": torch.randn(3, 16, 16, generator=gen), "label": (torch.rand(1, 16, 16, generator=gen) > 0.5).float()}
        for _ in range(n)
    ]
    return DataLoader(data, batch_size=batch_size)


def default_terms():
    return [
        DistillationTerm(
            "logit",
            F.mse_loss,
            {"input": "student", "target": "teacher"},
            weight=LOGIT_WEIGHT,
            schedule=LinearWarmup(2),
        ),
        DistillationTerm(
            "feat",
            F.mse_loss,
            {"input": f"student:{TAP}", "target": f"teacher:{TAP}"},
            weight=FEAT_WEIGHT,
            align={"input": "target"},
        ),
    ]


def build(terms=None, epochs: int = 2, n: int = 4, optimizer_params=None, **kwargs) -> SimpleNamespace:
    student, teacher = networks()
    distiller = Distiller(default_terms() if terms is None else terms, student, teacher, SHAPE)
    params = optimizer_params(student, teacher, distiller) if optimizer_params else None
    params = params or [*student.parameters(), *distiller.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.1)
    kwargs.setdefault("supervised_weight", SUPERVISED_WEIGHT)
    trainer = DistillationTrainer(
        device="cpu",
        max_epochs=epochs,
        train_data_loader=loader(n),
        network=student,
        optimizer=optimizer,
        loss_function=DiceLoss(to_onehot_y=True, softmax=True),
        teacher=teacher,
        distiller=distiller,
        **kwargs,
    )
    return SimpleNamespace(trainer=trainer, student=student, teacher=teacher, distiller=distiller)


def clone_tensors(named) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in named}


def teacher_calls(teacher: nn.Module) -> list[dict]:
    """Record, for every teacher forward, whether autograd was on and the teacher's modes."""
    calls = []

    def pre_hook(module, _inputs):
        calls.append(
            {
                "grad_enabled": torch.is_grad_enabled(),
                "training": any(m.training for m in module.modules()),
            }
        )

    def hook(_module, _inputs, output):
        calls[-1]["output_requires_grad"] = output.requires_grad

    teacher.register_forward_pre_hook(pre_hook)
    teacher.register_forward_hook(hook)
    return calls


@pytest.fixture(scope="module")
def run():
    """Two epochs of two iterations, with everything the tests check recorded."""
    kit = build()
    trainer, student, teacher, distiller = kit.trainer, kit.student, kit.teacher, kit.distiller
    teacher.train()  # something flipped the teacher to train mode after the trainer froze it
    kit.calls = teacher_calls(teacher)
    kit.teacher_before = clone_tensors(teacher.state_dict().items())
    kit.student_before = clone_tensors(student.named_parameters())
    kit.adapters_before = clone_tensors(distiller.named_parameters())
    kit.outputs, kit.epoch_metrics = [], {}

    @trainer.on(Events.ITERATION_COMPLETED)
    def _record_output(engine):
        kit.outputs.append({"iteration": engine.state.iteration, "epoch": engine.state.epoch, **engine.state.output[0]})

    @trainer.on(Events.EPOCH_COMPLETED)
    def _record_metrics(engine):
        kit.epoch_metrics[engine.state.epoch] = dict(engine.state.metrics)

    trainer.run()
    return kit


def test_teacher_weights_and_buffers_unchanged(run):
    after = run.teacher.state_dict()
    assert any("running_mean" in k for k in after), "the test teacher should have norm running statistics"
    assert after.keys() == run.teacher_before.keys()
    for name, before in run.teacher_before.items():
        assert torch.equal(after[name], before), f"teacher {name} changed during training"


def test_teacher_stays_frozen_in_eval_mode_without_grads(run):
    assert not any(m.training for m in run.teacher.modules())
    for name, p in run.teacher.named_parameters():
        assert not p.requires_grad, name
        assert p.grad is None, f"teacher {name} received a gradient"


def test_teacher_runs_once_per_step_without_autograd_in_eval_mode(run):
    assert len(run.calls) == len(run.outputs) == 4
    for call in run.calls:
        assert call == {"grad_enabled": False, "training": False, "output_requires_grad": False}


def test_student_and_adapters_learn(run):
    changed = [n for n, p in run.student.named_parameters() if not torch.equal(p, run.student_before[n])]
    assert len(changed) >= len(run.student_before) // 2, f"only {changed} of the student changed"
    assert "model.0.conv.unit0.conv.weight" in changed
    assert run.adapters_before, "the align term should have built an adapter"
    for name, p in run.distiller.named_parameters():
        assert not torch.equal(p, run.adapters_before[name]), f"adapter {name} did not learn"
        assert p.grad is not None


def test_every_term_is_in_the_engine_output(run):
    for output in run.outputs:
        for key in ("loss", "loss_supervised", "loss_logit", "loss_feat"):
            assert key in output, key
    assert term_output_key("feat") == "loss_feat" and SUPERVISED == "supervised"


def test_total_is_weighted_sum_with_scheduled_weight(run):
    assert [o["iteration"] for o in run.outputs] == [1, 2, 3, 4]
    for output, factor in zip(run.outputs, WARMUP_FACTORS):
        expected = (
            SUPERVISED_WEIGHT * output["loss_supervised"]
            + LOGIT_WEIGHT * factor * output["loss_logit"]
            + FEAT_WEIGHT * output["loss_feat"]
        )
        assert output["loss"] == pytest.approx(expected, rel=1e-5), output
        # the check can fail: the scheduled logit term is large enough to matter at every iteration
        assert LOGIT_WEIGHT * 0.5 * output["loss_logit"] > 1e-3 * abs(output["loss"])
    first = run.outputs[0]
    full_weight = SUPERVISED_WEIGHT * first["loss_supervised"] + LOGIT_WEIGHT * first["loss_logit"]
    assert first["loss"] != pytest.approx(full_weight + FEAT_WEIGHT * first["loss_feat"], rel=1e-5)


def test_epoch_means_land_in_metrics(run):
    assert set(run.epoch_metrics) == {1, 2}
    for epoch, metrics in run.epoch_metrics.items():
        rows = [o for o in run.outputs if o["epoch"] == epoch]
        assert len(rows) == 2
        for name in ("supervised", "logit", "feat"):
            mean = sum(o[f"loss_{name}"] for o in rows) / len(rows)
            assert metrics[f"train_{name}"] == pytest.approx(mean, rel=1e-5), (epoch, name)
    assert run.epoch_metrics[1]["train_logit"] != run.epoch_metrics[2]["train_logit"]


def test_taps_are_released_after_each_step(run):
    assert run.trainer.student_taps.names == (TAP,)
    assert run.trainer.teacher_taps.names == (TAP,)
    assert run.trainer.student_taps.outputs == {}
    assert run.trainer.teacher_taps.outputs == {}


def test_teacher_is_not_run_when_no_term_reads_it():
    terms = [
        DistillationTerm(
            "self", lambda student, label: (student[:, 1:] - label).abs(), {"student": "student", "label": "label"}
        )
    ]
    kit = build(terms=terms, epochs=1, n=2)
    calls = teacher_calls(kit.teacher)
    kit.trainer.run()
    assert calls == []
    assert kit.trainer.state.metrics["train_self"] > 0


def test_teacher_parameters_in_optimizer_are_rejected():
    with pytest.raises(ValueError, match="teacher's parameters are in the optimizer"):
        build(optimizer_params=lambda s, t, d: [*s.parameters(), *d.parameters(), *t.parameters()])


def test_adapters_missing_from_optimizer_are_rejected():
    with pytest.raises(ValueError, match=r"not in the optimizer \(e\.g\. \['terms\.1\.adapters\.input\.proj"):
        build(optimizer_params=lambda s, t, d: list(s.parameters()))


def test_supervised_is_a_reserved_term_name():
    with pytest.raises(ValueError, match="'supervised' is reserved"):
        build(terms=[DistillationTerm("supervised", F.mse_loss, {"input": "student", "target": "teacher"})])


def test_distiller_must_be_a_distiller():
    student, teacher = networks()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="must be a kd_components.Distiller"):
        DistillationTrainer("cpu", 1, loader(), student, optimizer, DiceLoss(), teacher, nn.Identity())


def test_nan_term_raises_naming_the_term():
    def nan_loss(student, teacher):
        return F.mse_loss(student, teacher) * float("nan")

    kit = build(terms=[*default_terms(), DistillationTerm("broken", nan_loss)], epochs=1, n=2)
    with pytest.raises(FloatingPointError) as info:
        kit.trainer.run()
    message = str(info.value)
    assert "broken=nan" in message and "iteration 1" in message
    assert "feat=" not in message.split("(all terms")[0], "finite terms should not be named as failing"
    assert kit.trainer.student_taps.outputs == {} and kit.trainer.teacher_taps.outputs == {}


def test_distillation_settings_describe_terms():
    class TemperedKL(nn.Module):
        def __init__(self, temperature: float = 4.0):
            super().__init__()
            self.temperature = temperature

        def forward(self, student, teacher):
            return F.mse_loss(student / self.temperature, teacher / self.temperature)

    terms = [
        *default_terms(),
        DistillationTerm("kl", TemperedKL()),
        DistillationTerm("dist", torch.dist, {"input": "student", "other": "teacher"}),  # a builtin callable
    ]
    settings = build(terms=terms).trainer.distillation_settings()
    assert settings["kd.teacher"] == settings["kd.student"] == "UNet"
    assert settings["kd.teacher_params"] > settings["kd.student_params"] > 0
    assert settings["kd.supervised_weight"] == SUPERVISED_WEIGHT
    assert settings["kd.terms"] == "logit,feat,kl,dist"
    assert settings["kd.logit.weight"] == LOGIT_WEIGHT
    assert settings["kd.logit.schedule"] == "LinearWarmup(length=2, unit='iteration', start=0.0)"
    assert settings["kd.feat.align"] == "input->target"
    assert settings["kd.feat.inputs"] == f"input=student:{TAP}, target=teacher:{TAP}"
    assert settings["kd.kl.loss"] == "TemperedKL(temperature=4.0)"
    assert "kd.dist.loss" in settings


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    """One sqlite tracking store for the module (creating its tables takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlruns.db"


def test_mlflow_handler_gets_distillation_settings(mlflow_uri, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    handler = MLFlowHandler(tracking_uri=mlflow_uri, experiment_param={"lr": 0.1})
    build(train_handlers=[handler])
    params = handler.experiment_param
    assert params["lr"] == 0.1, "the user's own parameters are kept"
    assert params["kd.terms"] == "logit,feat"
    assert params["kd.supervised_weight"] == SUPERVISED_WEIGHT
    assert params["kd.feat.align"] == "input->target"


def test_mlflow_run_records_term_metrics_and_settings(mlflow_uri, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = mlflow_uri
    handler = MLFlowHandler(
        tracking_uri=uri,
        experiment_name="kd_test",
        run_name="kd_run",
        output_transform=from_engine(["loss"], first=True),
    )
    kit = build(epochs=1, n=2, train_handlers=[handler])
    kit.trainer.run()
    handler.close()

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("kd_test")
    (mlflow_run,) = client.search_runs([experiment.experiment_id])
    metrics, params = mlflow_run.data.metrics, mlflow_run.data.params
    for name in ("supervised", "logit", "feat"):
        assert metrics[f"train_{name}"] == pytest.approx(kit.trainer.state.metrics[f"train_{name}"], rel=1e-6)
    assert params["kd.terms"] == "logit,feat"
    assert params["kd.teacher"] == "UNet"
    assert params["kd.logit.schedule"].startswith("LinearWarmup(")
    assert float(params["kd.supervised_weight"]) == SUPERVISED_WEIGHT
