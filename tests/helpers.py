"""Shared checks of the mathematical properties every distillation loss must have."""

from __future__ import annotations

from collections.abc import Callable

import torch

LossCall = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def clone_inputs(inputs: dict[str, torch.Tensor], requires_grad: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Detached copies of ``inputs``; the keys in ``requires_grad`` become leaf tensors that record gradients."""
    out = {}
    for key, value in inputs.items():
        value = value.detach().clone()
        if key in requires_grad and value.is_floating_point():
            value.requires_grad_(True)
        out[key] = value
    return out


def assert_zero_at_identity(loss_fn: LossCall, inputs: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    """The loss is (numerically) zero when every student input equals its teacher counterpart."""
    value = loss_fn(clone_inputs(inputs))
    assert torch.isfinite(value), f"loss is not finite at identity: {value}"
    assert abs(float(value)) <= atol, f"loss should vanish when student equals teacher, got {float(value)}"


def assert_positive(loss_fn: LossCall, inputs: dict[str, torch.Tensor]) -> None:
    """The loss is strictly positive for distinct student and teacher inputs."""
    value = loss_fn(clone_inputs(inputs))
    assert torch.isfinite(value) and float(value) > 0, f"expected a positive loss, got {float(value)}"


def assert_student_only_gradients(
    loss_fn: LossCall, inputs: dict[str, torch.Tensor], student_keys: tuple[str, ...], teacher_keys: tuple[str, ...]
) -> None:
    """Backward reaches every student input with a finite, non-zero gradient and never a teacher input."""
    tensors = clone_inputs(inputs, requires_grad=student_keys + teacher_keys)
    loss_fn(tensors).backward()
    for key in student_keys:
        grad = tensors[key].grad
        assert grad is not None, f"no gradient reached student input {key!r}"
        assert torch.isfinite(grad).all(), f"non-finite gradient on student input {key!r}"
        assert grad.abs().sum() > 0, f"zero gradient on student input {key!r}"
    for key in teacher_keys:
        grad = tensors[key].grad
        assert grad is None or not grad.any(), f"gradient leaked into teacher input {key!r}"


def as_one_slice_3d(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Append a singleton depth axis to every (B, C, H, W) tensor: the same data as a one-slice 3D volume."""
    return {key: value.unsqueeze(-1) if value.dim() == 4 else value for key, value in inputs.items()}


def assert_2d_3d_consistent(loss_fn: LossCall, inputs: dict[str, torch.Tensor], rtol: float = 1e-4) -> None:
    """A 2D input and the same data as a one-slice 3D input give the same loss."""
    v2 = loss_fn(clone_inputs(inputs))
    v3 = loss_fn(clone_inputs(as_one_slice_3d(inputs)))
    assert torch.allclose(v2, v3, rtol=rtol, atol=1e-6), f"2D gives {float(v2)}, one-slice 3D gives {float(v3)}"


def assert_finite_under_autocast(loss_fn: LossCall, inputs: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Loss and gradients stay finite when computed under CPU autocast with ``dtype`` (bfloat16 or float16)."""
    keys = tuple(k for k, v in inputs.items() if v.is_floating_point())
    tensors = clone_inputs(inputs, requires_grad=keys)
    with torch.autocast("cpu", dtype=dtype):
        value = loss_fn(tensors)
    assert torch.isfinite(value), f"loss is not finite under {dtype} autocast: {value}"
    value.float().backward()
    for key in keys:
        grad = tensors[key].grad
        assert grad is None or torch.isfinite(grad).all(), f"non-finite gradient on {key!r} under {dtype} autocast"
