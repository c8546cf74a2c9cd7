"""Tests of the cross-architecture stage-space loss (CNN student projected into a transformer teacher's stages)."""

from __future__ import annotations

import pytest
import torch

from kd_components import DistillationTerm, Distiller
from kd_components.losses import StageSpaceLoss
from kd_components.losses.cross_arch import token_layer_norm
from tests.helpers import (
    assert_2d_3d_consistent,
    assert_finite_under_autocast,
    assert_positive,
    assert_student_only_gradients,
    assert_zero_at_identity,
)

SPATIAL = [(12,), (8, 10), (6, 5, 4)]


def _pair(shape: tuple[int, ...], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"student": torch.randn(shape, generator=g), "teacher": torch.randn(shape, generator=g)}


def _call(loss):
    return lambda t: loss(**t)


@pytest.mark.parametrize("spatial", SPATIAL)
def test_zero_when_student_equals_teacher_and_positive_otherwise(spatial):
    loss = StageSpaceLoss()
    x = torch.randn(2, 6, *spatial, generator=torch.Generator().manual_seed(1))
    assert_zero_at_identity(_call(loss), {"student": x, "teacher": x.clone()})
    assert_positive(_call(loss), _pair((2, 6, *spatial)))


@pytest.mark.parametrize("spatial", SPATIAL)
def test_gradients_reach_the_student_never_the_teacher(spatial):
    assert_student_only_gradients(_call(StageSpaceLoss()), _pair((2, 6, *spatial)), ("student",), ("teacher",))


def test_2d_equals_one_slice_3d_and_constant_depth_3d():
    loss = StageSpaceLoss()
    inputs = _pair((2, 6, 8, 10))
    assert_2d_3d_consistent(_call(loss), inputs)
    stacked = {k: v.unsqueeze(-1).expand(-1, -1, -1, -1, 4).contiguous() for k, v in inputs.items()}
    torch.testing.assert_close(loss(**stacked), loss(**inputs), rtol=1e-5, atol=1e-6)


def test_invariant_to_per_token_scale_and_shift():
    """Layer norm over channels: a positive factor and an offset per position, on either side, change nothing."""
    loss = StageSpaceLoss()
    inputs = _pair((2, 8, 6, 5, 4))
    scale = torch.rand(2, 1, 6, 5, 4) * 3 + 0.5
    shift = torch.randn(2, 1, 6, 5, 4)
    moved = {"student": inputs["student"] * scale + shift, "teacher": inputs["teacher"] * 2.0 - 1.0}
    torch.testing.assert_close(loss(**moved), loss(**inputs), rtol=1e-3, atol=1e-5)


def test_formula_by_hand():
    """Full grid and one pooled level: the weighted mean of the two MSEs of the token-normalised features."""
    s, t = _pair((1, 4, 4, 4)).values()
    z_s, z_t = token_layer_norm(s), token_layer_norm(t)
    full = (z_s - z_t).pow(2).mean()
    pooled = (z_s.mean((2, 3)) - z_t.mean((2, 3))).pow(2).mean()
    expected = (1.0 * full + 0.25 * pooled) / 1.25
    torch.testing.assert_close(StageSpaceLoss(grids=[None, 1], level_weights=[1.0, 0.25])(s, t), expected)
    reference = torch.nn.functional.layer_norm(s.movedim(1, -1), (4,)).movedim(-1, 1)
    torch.testing.assert_close(token_layer_norm(s), reference)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_finite_under_autocast(dtype):
    assert_finite_under_autocast(_call(StageSpaceLoss()), _pair((2, 6, 6, 5, 4)), dtype)


def test_refuses_an_unprojected_student_and_bad_arguments():
    with pytest.raises(ValueError, match="align"):
        StageSpaceLoss()(torch.randn(1, 4, 8, 8), torch.randn(1, 6, 8, 8))
    with pytest.raises(ValueError, match="grids"):
        StageSpaceLoss(grids=[])
    with pytest.raises(ValueError, match="level_weights"):
        StageSpaceLoss(grids=[None, 2], level_weights=[1.0])


def test_term_projects_a_cnn_feature_into_a_transformer_stage():
    """Through a term with ``align``, a narrower, finer student feature is projected (1x1x1 conv + resize) to the
    teacher stage's width and grid; the projector trains (gets gradients), the teacher gets none."""
    student_net = torch.nn.Conv3d(1, 5, 3, stride=2, padding=1)
    teacher_net = torch.nn.Conv3d(1, 12, 4, stride=4)
    term = DistillationTerm(
        "stage", StageSpaceLoss(), inputs={"student": "student", "teacher": "teacher"}, align={"student": "teacher"}
    )
    distiller = Distiller([term], student_net, teacher_net, example_input_shape=[1, 1, 16, 16, 8])
    x = torch.rand(2, 1, 16, 16, 8)
    value = distiller({"student": student_net(x), "teacher": teacher_net(x)})["stage"]
    value.backward()
    assert term.adapters["student"].proj.weight.grad.abs().sum() > 0
    assert student_net.weight.grad.abs().sum() > 0
    assert teacher_net.weight.grad is None
