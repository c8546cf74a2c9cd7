"""Tests of DistillationTrainer's automatic term balancing (``balance_iterations``, ``balance_ratio``).

The terms are built so that their gradient norms are known: a term equal to ``k`` times the supervised loss has
exactly ``k`` times its gradient norm, so balancing must give it the weight ``ratio · supervised_weight / k``.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events
from monai.losses import DiceLoss

from kd_components.distiller import Distiller
from kd_components.schedules import LinearWarmup
from kd_components.terms import DistillationTerm
from kd_components.trainer import BALANCED_WEIGHTS_KEY, SUPERVISED, DistillationTrainer, balanced_weight_key
from tests.test_adversarial_trainer import build as build_adversarial
from tests.test_semisupervised import build as build_semisupervised
from tests.test_trainer import loader, networks

DICE = DiceLoss(to_onehot_y=True, softmax=True)


def scaled(k: float, name: str, weight: float = 1.0, schedule=None) -> DistillationTerm:
    """A term whose value is ``k`` times the supervised loss (so its gradient is exactly ``k`` times as large)."""
    return DistillationTerm(
        name,
        lambda student, label: k * DICE(student, label),
        {"student": "student", "label": "label"},
        weight=weight,
        schedule=schedule,
    )


def build(terms, epochs: int = 1, n: int = 4, supervised_weight: float = 0.5, **kwargs) -> SimpleNamespace:
    student, teacher = networks()
    distiller = Distiller(terms)
    optimizer = torch.optim.SGD([*student.parameters(), *distiller.parameters()], lr=0.1)
    trainer = DistillationTrainer(
        device="cpu",
        max_epochs=epochs,
        train_data_loader=loader(n),
        network=student,
        optimizer=optimizer,
        loss_function=DICE,
        teacher=teacher,
        distiller=distiller,
        supervised_weight=supervised_weight,
        **kwargs,
    )
    kit = SimpleNamespace(trainer=trainer, student=student, outputs=[], weights=[])

    @trainer.on(Events.ITERATION_COMPLETED)
    def _record(engine):
        kit.outputs.append({k: float(v) for k, v in engine.state.output[0].items() if k.startswith("loss")})
        current = trainer.balanced_weights
        kit.weights.append(None if current is None else dict(current))

    return kit


@pytest.fixture()
def grad_calls(monkeypatch):
    """Every ``torch.autograd.grad`` call, recorded with the engine iteration it happened in (set ``.trainer``)."""
    calls = SimpleNamespace(iterations=[], trainer=None)
    original = torch.autograd.grad

    def spy(*args, **kwargs):
        calls.iterations.append(calls.trainer.state.iteration if calls.trainer is not None else None)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", spy)
    return calls


@pytest.mark.parametrize("balance_ratio", [None, 0.3])
def test_weights_follow_the_measured_gradient_ratios(balance_ratio):
    kit = build([scaled(4.0, "x4", weight=0.5), scaled(0.25, "quarter", weight=2.0)], balance_iterations=2)
    kit.trainer.balance_ratio = balance_ratio
    kit.trainer.run()
    ratios = {"x4": 0.5, "quarter": 2.0} if balance_ratio is None else {"x4": 0.3, "quarter": 0.3}
    expected = {"x4": ratios["x4"] * 0.5 / 4.0, "quarter": ratios["quarter"] * 0.5 / 0.25}
    weights = kit.trainer.balanced_weights
    assert weights == pytest.approx(expected, rel=1e-5)
    norms = kit.trainer.balance_norms
    assert norms["x4"] == pytest.approx(4.0 * norms[SUPERVISED], rel=1e-5)
    assert norms["quarter"] == pytest.approx(0.25 * norms[SUPERVISED], rel=1e-5)
    for name, weight in weights.items():
        assert kit.trainer.state.metrics[balanced_weight_key(name)] == weight


def test_norms_are_averaged_over_the_measuring_iterations():
    """A term worth 1× then 3× the supervised loss: weight = s · mean(g) / mean(c·g), g measured independently."""
    student_params: list[torch.Tensor] = []
    record: list[tuple[float, float]] = []

    def varying(student, label):
        supervised = DICE(student, label)
        grads = torch.autograd.grad(supervised, student_params, retain_graph=True)
        norm = float(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
        factor = 1.0 if not record else 3.0
        record.append((norm, factor))
        return factor * supervised

    term = DistillationTerm("varying", varying, {"student": "student", "label": "label"}, weight=1.0)
    kit = build([term], epochs=2, balance_iterations=2)
    student_params.extend(kit.student.parameters())
    kit.trainer.run()
    (g1, c1), (g2, c2) = record[:2]
    assert abs(g1 - g2) > 1e-3 * g1, "the student should change between the measuring iterations"
    expected = 0.5 * (g1 + g2) / (c1 * g1 + c2 * g2)
    assert kit.trainer.balanced_weights["varying"] == pytest.approx(expected, rel=1e-4)
    for other in (0.5 * (1 / c1 + 1 / c2) / 2, 0.5 / c2):  # mean of per-iteration ratios; last iteration only
        assert other != pytest.approx(expected, rel=1e-3)


def test_weights_are_zero_while_measuring_then_frozen(grad_calls):
    warmup = LinearWarmup(4)
    kit = build([scaled(4.0, "x4"), scaled(2.0, "ramped", schedule=warmup)], epochs=3, balance_iterations=2)
    grad_calls.trainer = kit.trainer
    kit.trainer.run()
    assert len(kit.outputs) == 6
    assert grad_calls.iterations == [1, 1, 1, 2, 2, 2], "supervised + 2 terms measured in iterations 1 and 2 only"
    assert kit.weights[0] is None
    frozen = kit.weights[1]
    assert frozen == pytest.approx({"x4": 0.5 / 4.0, "ramped": 0.5 / 2.0}, rel=1e-5)
    assert all(w == frozen for w in kit.weights[1:]), "the weights changed after they were frozen"
    for iteration, out in enumerate(kit.outputs, start=1):
        supervised = 0.5 * out["loss_supervised"]
        if iteration <= 2:
            expected = supervised  # distillation terms weigh 0 while measuring
        else:
            expected = (
                supervised
                + frozen["x4"] * out["loss_x4"]
                + frozen["ramped"] * warmup(iteration, 1) * (out["loss_ramped"])
            )
        assert out["loss"] == pytest.approx(expected, rel=1e-5), iteration
    assert out["loss"] != pytest.approx(0.5 * out["loss_supervised"], rel=1e-3)


def test_off_by_default_leaves_weights_unchanged(grad_calls):
    kit = build([scaled(4.0, "x4", weight=0.5, schedule=LinearWarmup(2))], epochs=2)
    grad_calls.trainer = kit.trainer
    assert kit.trainer.balance_iterations == 0 and kit.trainer.balance_ratio is None
    kit.trainer.run()
    assert grad_calls.iterations == []
    assert kit.trainer.balanced_weights is None and kit.weights == [None] * 4
    for iteration, out in enumerate(kit.outputs, start=1):
        factor = LinearWarmup(2)(iteration, 1)
        assert out["loss"] == pytest.approx(0.5 * out["loss_supervised"] + 0.5 * factor * out["loss_x4"], rel=1e-5)
    assert BALANCED_WEIGHTS_KEY not in kit.trainer.state_dict()
    assert not any(k.startswith("kd.") for k in kit.trainer.state.metrics)
    assert "kd.balance_iterations" not in kit.trainer.distillation_settings()


def test_resumed_run_restores_the_weights_without_measuring(grad_calls, tmp_path):
    first = build([scaled(4.0, "x4")], epochs=1, balance_iterations=2)
    first.trainer.run()
    state = first.trainer.state_dict()
    assert state[BALANCED_WEIGHTS_KEY] == pytest.approx({"x4": 0.125}, rel=1e-5)
    torch.save(state, tmp_path / "trainer.pt")

    resumed = build([scaled(4.0, "x4")], epochs=2, balance_iterations=2)
    resumed.trainer.load_state_dict(torch.load(tmp_path / "trainer.pt", weights_only=True))
    assert resumed.trainer.balanced_weights == state[BALANCED_WEIGHTS_KEY]
    grad_calls.trainer = resumed.trainer
    grad_calls.iterations.clear()  # the first run's measurements
    resumed.trainer.run()
    assert grad_calls.iterations == [], "a resumed run must not measure again"
    assert len(resumed.outputs) == 2
    for out in resumed.outputs:
        expected = 0.5 * out["loss_supervised"] + state[BALANCED_WEIGHTS_KEY]["x4"] * out["loss_x4"]
        assert out["loss"] == pytest.approx(expected, rel=1e-5)


def test_term_without_gradient_keeps_its_weight_with_a_warning(caplog):
    teacher_only = DistillationTerm(
        "teacher_only",
        lambda teacher, label: F.mse_loss(teacher[:, 1:], label),
        {"teacher": "teacher", "label": "label"},
        weight=0.7,
    )
    kit = build([scaled(4.0, "x4"), teacher_only], balance_iterations=1, balance_ratio=2.0)
    with caplog.at_level(logging.INFO, logger="kd_components.trainer"):
        kit.trainer.run()
    assert kit.trainer.balanced_weights == pytest.approx({"x4": 2.0 * 0.5 / 4.0, "teacher_only": 0.7}, rel=1e-5)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("'teacher_only'" in m and "zero gradient" in m for m in warnings), warnings
    assert any("balanced weights" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    settings = kit.trainer.distillation_settings()
    assert settings["kd.balance_iterations"] == 1 and settings["kd.balance_ratio"] == 2.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"balance_iterations": -1}, "balance_iterations must be an integer >= 0"),
        ({"balance_iterations": 2.5}, "balance_iterations must be an integer >= 0"),
        ({"balance_iterations": 2, "balance_ratio": 0.0}, "balance_ratio must be a positive number"),
        ({"balance_iterations": 2, "supervised_weight": 0.0}, r"supervised_weight=0"),
    ],
)
def test_invalid_balancing_arguments_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build([scaled(4.0, "x4")], **kwargs)


def test_balancing_with_the_adversarial_trainer():
    kit = build_adversarial(balance_iterations=2, epochs=2)
    kit.trainer.run()
    weights, norms = kit.trainer.balanced_weights, kit.trainer.balance_norms
    assert set(weights) == {"adv", "logit"}
    for name, ratio in {"adv": 1.0, "logit": 0.1}.items():  # the configured weights are the target ratios
        assert norms[name] > 0 and weights[name] == pytest.approx(ratio * norms[SUPERVISED] / norms[name], rel=1e-5)
        assert kit.trainer.state.metrics[balanced_weight_key(name)] == weights[name]
    assert "loss_adv_discriminator" in kit.trainer.state.output[0], "the discriminator still trains"


def test_balancing_with_the_semisupervised_trainer():
    # batches: [labelled, labelled], [unlabelled, unlabelled], [labelled, unlabelled]
    kit = build_semisupervised([True, True, False, False, True, False], label_term=True, balance_iterations=2)
    kit.trainer.run()
    assert kit.trainer._norm_counts == {SUPERVISED: 1, "logit": 2, "region": 1}, "values without a graph are skipped"
    norms, weights = kit.trainer.balance_norms, kit.trainer.balanced_weights
    assert weights["logit"] == pytest.approx(1.0 * norms[SUPERVISED] / norms["logit"], rel=1e-5)
    assert weights["region"] == pytest.approx(0.5 * norms[SUPERVISED] / norms["region"], rel=1e-5)
    third = kit.outputs[2]
    expected = (
        third["loss_supervised"] + weights["logit"] * third["loss_logit"] + weights["region"] * third["loss_region"]
    )
    assert float(third["loss"]) == pytest.approx(float(expected), rel=1e-5)
