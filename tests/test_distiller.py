"""Tests of kd_components.distiller: term bookkeeping, automatic adapters found by probing, owned parameters."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import UNet

from kd_components.adapters import FeatureAdapter
from kd_components.distiller import Distiller
from kd_components.taps import FeatureTaps, TapNotFoundError
from kd_components.terms import DistillationTerm

TAP = "model.1.submodule.0"  # 8 channels in the student, 32 in the teacher


def nets(spatial_dims: int = 2):
    torch.manual_seed(0)
    in_channels = 3 if spatial_dims == 2 else 1
    student = UNet(spatial_dims, in_channels, 2, (4, 8, 16), (2, 2), num_res_units=1)
    teacher = UNet(spatial_dims, in_channels, 2, (16, 32, 64), (2, 2), num_res_units=1)
    shape = (1, 3, 16, 16) if spatial_dims == 2 else (1, 1, 8, 8, 8)
    return student, teacher, shape


def feature_term(name: str = "fitnet", student_tap: str = TAP, teacher_tap: str = TAP) -> DistillationTerm:
    return DistillationTerm(
        name,
        F.mse_loss,
        {"input": f"student:{student_tap}", "target": f"teacher:{teacher_tap}"},
        align={"input": "target"},
    )


LOGITS = {"input": "student", "target": "teacher"}


def test_duplicate_names_are_rejected():
    terms = [
        DistillationTerm(name, loss, LOGITS) for name, loss in [("kd", F.mse_loss), ("kd", F.l1_loss), ("x", F.l1_loss)]
    ]
    with pytest.raises(ValueError, match=r"unique; repeated: \['kd'\]"):
        Distiller(terms)


def test_taps_are_deduplicated_in_order():
    terms = [
        DistillationTerm("a", F.mse_loss, {"input": "student:model.0", "target": "teacher:model.2"}),
        DistillationTerm("b", F.mse_loss, {"input": "student:model.1", "target": "teacher:model.2"}),
        DistillationTerm("c", F.mse_loss, {"input": "student:model.0", "target": "label"}),
    ]
    distiller = Distiller(terms)
    assert distiller.taps("student") == ["model.0", "model.1"]
    assert distiller.taps("teacher") == ["model.2"]
    assert distiller.uses("teacher") and distiller.uses("label") and not distiller.uses("image")
    assert not Distiller(terms[2:]).uses("teacher")


def test_without_align_no_network_is_needed_and_nothing_is_trainable():
    distiller = Distiller([DistillationTerm("kd", F.mse_loss, LOGITS)])
    assert list(distiller.parameters()) == []


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_align_builds_adapter_with_probed_channels(spatial_dims):
    student, teacher, shape = nets(spatial_dims)
    distiller = Distiller([feature_term()], student, teacher, shape)
    adapter = distiller.terms[0].adapters["input"]
    assert isinstance(adapter, FeatureAdapter)
    assert (adapter.proj.in_channels, adapter.proj.out_channels) == (8, 32)
    assert adapter.spatial_dims == spatial_dims

    # the distiller then computes the term on the real taps
    with FeatureTaps(student, [TAP]) as s_taps, FeatureTaps(teacher, [TAP]) as t_taps:
        x = torch.randn(2, *shape[1:])
        student(x)
        with torch.no_grad():
            teacher(x)
        values = distiller({f"student:{TAP}": s_taps[TAP], f"teacher:{TAP}": t_taps[TAP]})
    assert set(values) == {"fitnet"} and values["fitnet"].dim() == 0
    values["fitnet"].backward()
    assert adapter.proj.weight.grad is not None


def test_align_across_resolutions_and_on_outputs():
    student, teacher, shape = nets(2)
    terms = [
        feature_term("up", student_tap=TAP, teacher_tap="model.0"),  # 8ch 4x4 -> 16ch 8x8
        DistillationTerm("logits", F.mse_loss, {"input": "teacher", "target": "student"}, align={"input": "target"}),
    ]
    distiller = Distiller(terms, student, teacher, shape)
    up = distiller.terms[0].adapters["input"].proj
    logits = distiller.terms[1].adapters["input"].proj
    assert (up.in_channels, up.out_channels) == (8, 16)
    assert (logits.in_channels, logits.out_channels) == (2, 2)
    sources = {
        f"student:{TAP}": torch.randn(2, 8, 4, 4),
        "teacher:model.0": torch.randn(2, 16, 8, 8),
        "student": torch.randn(2, 2, 16, 16),
        "teacher": torch.randn(2, 2, 16, 16),
    }
    values = distiller(sources)
    assert set(values) == {"up", "logits"} and all(torch.isfinite(v) for v in values.values())


@pytest.mark.parametrize("missing", ["student", "teacher", "example_input_shape"])
def test_align_without_networks_or_shape_errors_clearly(missing):
    student, teacher, shape = nets(2)
    kwargs = {"student": student, "teacher": teacher, "example_input_shape": shape}
    kwargs[missing] = None
    with pytest.raises(ValueError) as info:
        Distiller([feature_term()], **kwargs)
    message = str(info.value)
    assert "'align'" in message and "`student`, `teacher` and `example_input_shape`" in message


@pytest.mark.parametrize("align", [{"input": "target"}, {"target": "input"}])
def test_align_to_a_label_is_rejected_naming_it(align):
    student, teacher, shape = nets(2)
    term = DistillationTerm("bad", F.mse_loss, {"input": f"student:{TAP}", "target": "label"}, align=align)
    with pytest.raises(ValueError, match="term 'bad': align works between network outputs and taps, not 'label'"):
        Distiller([term], student, teacher, shape)


def test_unknown_tap_is_reported_when_probing():
    student, teacher, shape = nets(2)
    with pytest.raises(TapNotFoundError, match="teacher"):
        Distiller([feature_term(teacher_tap="model.1.submodle")], student, teacher, shape)


def test_probing_leaves_modes_and_gradients_as_they_were():
    student, teacher, shape = nets(2)
    student.train()
    student.model[0].eval()  # a block deliberately kept in eval mode
    teacher.eval()
    teacher.model[2].train()
    before = {
        net_name: {n: m.training for n, m in net.named_modules()}
        for net_name, net in (("student", student), ("teacher", teacher))
    }
    Distiller([feature_term()], student, teacher, shape)
    after = {
        net_name: {n: m.training for n, m in net.named_modules()}
        for net_name, net in (("student", student), ("teacher", teacher))
    }
    assert after == before
    assert all(p.grad is None for p in [*student.parameters(), *teacher.parameters()])
    assert all(len(m._forward_hooks) == 0 for m in [*student.modules(), *teacher.modules()])


def test_parameters_hold_adapters_never_networks():
    student, teacher, shape = nets(2)
    distiller = Distiller([feature_term()], student, teacher, shape)
    own = {id(p) for p in distiller.parameters()}
    adapter = distiller.terms[0].adapters["input"]
    assert own == {id(p) for p in adapter.parameters()}
    assert sum(p.numel() for p in distiller.parameters()) == 8 * 32 + 32
    assert own.isdisjoint(id(p) for p in student.parameters())
    assert own.isdisjoint(id(p) for p in teacher.parameters())
    assert not any(isinstance(m, UNet) for m in distiller.modules())


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_mgd_without_channels_is_sized_by_the_probe(spatial_dims):
    """A method config never hard-codes widths: MGD's channels and dimensions come from the probed taps."""
    from kd_components.losses import MGDLoss

    student, teacher, shape = nets(spatial_dims)
    loss = MGDLoss(mask_ratio=0.5)
    assert loss.needs_shapes and not list(loss.parameters())
    inputs = {"student": f"student:{TAP}", "teacher": f"teacher:{TAP}"}
    distiller = Distiller([DistillationTerm("mgd", loss, inputs)], student, teacher, shape)
    assert not loss.needs_shapes
    assert (loss.align.in_channels, loss.align.out_channels) == (8, 32)
    assert loss.spatial_dims == spatial_dims and loss.generation[0].conv.in_channels == 32
    assert {id(p) for p in loss.parameters()} <= {id(p) for p in distiller.parameters()}
    x = torch.randn(2, *shape[1:])
    with FeatureTaps(student, [TAP]) as s_taps, FeatureTaps(teacher, [TAP]) as t_taps:
        student(x)
        teacher(x)
        value = distiller({inputs["student"]: s_taps[TAP], inputs["teacher"]: t_taps[TAP]})["mgd"]
    assert value.dim() == 0 and torch.isfinite(value)
    with pytest.raises(RuntimeError, match="no channel counts"):
        MGDLoss()(torch.zeros(1, 8, 4, 4), torch.zeros(1, 32, 4, 4))
    with pytest.raises(ValueError, match="or neither"):
        MGDLoss(student_channels=8)
