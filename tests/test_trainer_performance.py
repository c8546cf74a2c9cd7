"""Performance invariants of DistillationTrainer: what runs, how often, in which mode (no timing assertions).

The teacher must run once per iteration, before the student's forward pass, in eval mode, under ``torch.no_grad``
(not ``inference_mode``: inference tensors cannot be saved for backward), inside the student's autocast, on a plain
tensor (no MetaTensor dispatch), and leave no autograd graph or gradient behind; taps are released after each step;
a non-finite loss is reported before the optimizer steps.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.networks.nets import UNet
from torch import nn

from kd_components.distiller import Distiller
from kd_components.losses import KDASAttentionLoss, KDASSGMLoss
from kd_components.terms import DistillationTerm
from kd_components.trainer import DistillationTrainer

TAP = "model.1.submodule.0"
SHAPE = (1, 3, 16, 16)


def _batches(n: int = 3, batch_size: int = 2) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        {
            "image": MetaTensor(torch.randn(batch_size, *SHAPE[1:], generator=g)),
            "label": (torch.rand(batch_size, 1, *SHAPE[2:], generator=g) > 0.5).float(),
        }
        for _ in range(n)
    ]


def _trainer(extra_terms: list[DistillationTerm] | None = None, iterations: int = 3) -> DistillationTrainer:
    torch.manual_seed(0)
    student = UNet(2, 3, 1, (4, 8, 16), (2, 2), num_res_units=1, norm="batch")
    teacher = UNet(2, 3, 1, (8, 16, 32), (2, 2), num_res_units=1, norm="batch")
    teacher.train()  # the trainer must put it in eval mode
    terms = [
        DistillationTerm("kdas_attention", KDASAttentionLoss(grid=8), weight=0.3),
        DistillationTerm("kdas_sgm", KDASSGMLoss(grid=8), weight=0.3),
        DistillationTerm(
            "feat", F.mse_loss, {"input": f"student:{TAP}", "target": f"teacher:{TAP}"}, align={"input": "target"}
        ),
        *(extra_terms or []),
    ]
    distiller = Distiller(terms, student, teacher, SHAPE)
    optimizer = torch.optim.SGD([*student.parameters(), *distiller.parameters()], lr=0.01)
    return DistillationTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=_batches(iterations),
        network=student,
        optimizer=optimizer,
        loss_function=F.binary_cross_entropy_with_logits,
        teacher=teacher,
        distiller=distiller,
        supervised_weight=0.7,
        decollate=False,
    )


def test_teacher_runs_once_per_iteration_without_autograd_in_eval_mode() -> None:
    trainer = _trainer()
    seen: list[dict] = []

    def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        assert not torch.is_grad_enabled(), "the teacher must run without autograd"
        seen.append(
            {
                "training": module.training,
                "inference_mode": torch.is_inference_mode_enabled(),
                "input_type": type(inputs[0]),
                "output": output,
            }
        )

    trainer.teacher.register_forward_hook(record)
    taps_during_step = []
    trainer.distiller.register_forward_pre_hook(
        lambda _m, _a: taps_during_step.append(len(trainer.teacher_taps.outputs))
    )
    trainer.run()
    assert len(seen) == 3, "one teacher forward pass per iteration"
    for call in seen:
        assert not call["training"] and not call["inference_mode"]
        assert call["input_type"] is torch.Tensor, "the teacher gets a plain tensor (no MetaTensor dispatch)"
        out = call["output"]
        assert not out.requires_grad and out.grad_fn is None and not out.is_inference()
    assert all(p.grad is None for p in trainer.teacher.parameters())
    assert not any(p.requires_grad for p in trainer.teacher.parameters())
    assert taps_during_step == [1, 1, 1]  # recorded during the step ...
    assert trainer.teacher_taps.outputs == {} and trainer.student_taps.outputs == {}  # ... released after it
    assert all(p.grad is not None for p in trainer.network.parameters())


def test_teacher_runs_inside_the_student_autocast() -> None:
    """The loss (with the teacher pass) runs inside SupervisedTrainer's autocast, whatever it is: here a CPU one."""
    trainer = _trainer(iterations=1)
    modes = {}

    def recorder(name: str):
        def hook(_module: nn.Module, _inputs: tuple) -> None:
            modes[name] = torch.is_autocast_enabled("cpu")

        return hook

    trainer.network.register_forward_pre_hook(recorder("student"))
    trainer.teacher.register_forward_pre_hook(recorder("teacher"))
    trainer.state.iteration, trainer.state.epoch = 1, 1
    trainer.student_taps.active = True  # as at ITERATION_STARTED
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trainer._iteration(trainer, _batches(1)[0])
    assert modes == {"student": True, "teacher": True}


def test_teacher_runs_before_the_student_so_its_activations_are_gone_when_the_student_graph_exists() -> None:
    """torchdistill's order: the teacher's pass (no graph) first, then the student's; peak memory is the larger of
    the two passes instead of the student's graph plus the teacher's transient activations."""
    trainer = _trainer(iterations=2)
    order: list[tuple[str, int]] = []
    trainer.teacher.register_forward_pre_hook(
        lambda _m, _a: order.append(("teacher", len(trainer.student_taps.outputs)))
    )
    trainer.network.register_forward_pre_hook(lambda _m, _a: order.append(("student", 0)))
    trainer.run()
    assert order == [("teacher", 0), ("student", 0)] * 2  # no student tap (graph) alive during the teacher's pass


def test_non_finite_loss_raises_before_the_optimizer_step() -> None:
    def nan_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(student, teacher) * float("nan")

    trainer = _trainer([DistillationTerm("broken", nan_loss)], iterations=2)
    before = [p.detach().clone() for p in trainer.network.parameters()]
    with pytest.raises(FloatingPointError, match="broken=nan"):
        trainer.run()
    assert trainer.state.iteration == 1
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.network.parameters())), "weights were updated"
