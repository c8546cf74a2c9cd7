"""Tests of kd_components.terms: the source grammar, DistillationTerm validation, weights and loss calls."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd_components.adapters import FeatureAdapter
from kd_components.schedules import LinearWarmup
from kd_components.terms import SOURCE_HELP, DistillationTerm, loss_arguments, parse_source


def mse(student, teacher):
    """A loss taking the default inputs' names."""
    return F.mse_loss(student, teacher)


@pytest.mark.parametrize(
    "source, parsed",
    [
        ("student", ("student", None)),
        ("teacher", ("teacher", None)),
        ("student:model.1.submodule", ("student", "model.1.submodule")),
        ("teacher:model.0", ("teacher", "model.0")),
        ("label", ("label", None)),
        ("image", ("image", None)),
    ],
)
def test_parse_source_accepts_the_grammar(source, parsed):
    assert parse_source(source) == parsed


@pytest.mark.parametrize(
    "source, message",
    [
        ("student:", "names no module after ':'"),
        ("teacher:", "names no module after ':'"),
        ("label:model.0", "unknown source 'label:model.0'"),
        ("image:x", "unknown source"),
        ("logits", "unknown source 'logits'"),
        ("Teacher", "unknown source"),
        ("", "unknown source"),
    ],
)
def test_parse_source_rejects_with_clear_message(source, message):
    with pytest.raises(ValueError) as info:
        parse_source(source)
    assert message in str(info.value)
    assert SOURCE_HELP in str(info.value)


def test_default_inputs_are_the_two_network_outputs():
    term = DistillationTerm("kd", mse)
    assert term.inputs == {"student": "student", "teacher": "teacher"}
    assert term.uses("student") and term.uses("teacher") and not term.uses("label")
    assert term.taps("student") == [] and term.weight == 1.0


def test_taps_and_uses_read_the_sources():
    term = DistillationTerm(
        "mix",
        lambda a, b, c, d: F.mse_loss(a, b),
        {"a": "student:model.0", "b": "teacher:model.1", "c": "label", "d": "student"},
    )
    assert term.taps("student") == ["model.0"]
    assert term.taps("teacher") == ["model.1"]
    assert term.uses("label") and not term.uses("image")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": ""}, "non-empty string name"),
        ({"name": None}, "non-empty string name"),
        ({"inputs": {}}, "'inputs' is empty"),
        ({"inputs": {"student": "student", "teacher": "techer"}}, "unknown source 'techer'"),
        ({"align": {"input": "teacher"}}, "align names 'input', which is not in inputs"),
        ({"align": {"student": "target"}}, "align names 'target', which is not in inputs"),
        ({"transforms": {"target": nn.Identity()}}, "transforms names 'target', which is not in inputs"),
        ({"transforms": {"target": nn.Identity()}}, "mse accepts ['student', 'teacher']"),
    ],
)
def test_invalid_term_settings_raise(kwargs, message):
    settings = {"name": "kd", "loss": mse, **kwargs}
    with pytest.raises(ValueError) as info:
        DistillationTerm(**settings)
    assert message in str(info.value)


def test_weight_at_without_and_with_schedule():
    assert DistillationTerm("kd", mse, weight=2.5).weight_at(1, 1) == 2.5
    warm = DistillationTerm("kd", mse, weight=2.0, schedule=LinearWarmup(4))
    assert [warm.weight_at(i, 1) for i in (1, 2, 3, 5, 50)] == pytest.approx([0.0, 0.5, 1.0, 2.0, 2.0])
    by_epoch = DistillationTerm("kd", mse, weight=3.0, schedule=LinearWarmup(2, unit="epoch", start=0.5))
    assert [by_epoch.weight_at(100, e) for e in (1, 2, 3)] == pytest.approx([1.5, 2.25, 3.0])


def test_forward_passes_sources_by_argument_name():
    calls = {}

    def loss(pred, ref):
        calls["pred"], calls["ref"] = pred, ref
        return (pred - ref).abs().sum()

    term = DistillationTerm("kd", loss, {"pred": "student:model.0", "ref": "label"})
    s, lbl = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    value = term({"student:model.0": s, "label": lbl, "teacher": torch.zeros(1)})
    assert calls["pred"] is s and calls["ref"] is lbl
    torch.testing.assert_close(value, (s - lbl).abs().sum())


def test_transforms_apply_before_the_loss():
    class Double(nn.Module):
        def forward(self, x):
            return 2 * x

    term = DistillationTerm("kd", F.mse_loss, {"input": "student", "target": "teacher"}, transforms={"input": Double()})
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(term({"student": s, "teacher": t}), F.mse_loss(2 * s, t))


def test_align_adapter_maps_to_reference_shape():
    torch.manual_seed(0)
    term = DistillationTerm("kd", F.mse_loss, {"input": "student", "target": "teacher"}, align={"input": "target"})
    term.adapters["input"] = FeatureAdapter(4, 8)  # the Distiller normally builds it
    s, t = torch.randn(2, 4, 8, 8), torch.randn(2, 8, 4, 4)
    expected = F.mse_loss(term.adapters["input"](s, (4, 4)), t)
    torch.testing.assert_close(term({"student": s, "teacher": t}), expected)


def test_shape_mismatch_is_reraised_naming_term_sources_shapes_and_align():
    term = DistillationTerm("fitnet", F.mse_loss, {"input": "student:model.0", "target": "teacher:model.0"})
    sources = {"student:model.0": torch.randn(2, 4, 8, 8), "teacher:model.0": torch.randn(2, 16, 8, 8)}
    with pytest.warns(UserWarning), pytest.raises(ValueError) as info:  # mse_loss warns before broadcasting fails
        term(sources)
    message = str(info.value)
    for fragment in (
        "'fitnet'",
        "input='student:model.0' (2, 4, 8, 8)",
        "target='teacher:model.0' (2, 16, 8, 8)",
        '"align"',
        "kd_components.list_taps",
    ):
        assert fragment in message
    assert isinstance(info.value.__cause__, RuntimeError)


def test_loss_type_error_is_reraised_with_the_term_name():
    # a **kwargs loss takes any input name at build time, so a wrong one still fails only when called
    term = DistillationTerm(
        "bad", lambda **kwargs: F.mse_loss(**kwargs), {"prediction": "student", "target": "teacher"}
    )
    with pytest.raises(ValueError, match="distillation term 'bad'"):
        term({"student": torch.zeros(1, 1, 2, 2), "teacher": torch.zeros(1, 1, 2, 2)})


def test_non_scalar_loss_is_reduced_to_its_mean():
    term = DistillationTerm("kd", lambda student, teacher: (student - teacher) ** 2)
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    value = term({"student": s, "teacher": t})
    assert value.dim() == 0
    torch.testing.assert_close(value, ((s - t) ** 2).mean())


def test_term_registers_loss_transform_and_adapter_parameters():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, student, teacher):
            return self.scale * F.mse_loss(student, teacher)

    term = DistillationTerm("kd", Scaled(), transforms={"student": nn.Conv2d(2, 2, 1)}, align={"student": "teacher"})
    term.adapters["student"] = FeatureAdapter(2, 3)
    names = {n for n, _ in term.named_parameters()}
    assert names == {
        "loss.scale",
        "transforms.student.weight",
        "transforms.student.bias",
        "adapters.student.proj.weight",
        "adapters.student.proj.bias",
    }


class _Pair(nn.Module):
    def forward(self, student, teacher, weight=None):
        return F.mse_loss(student, teacher)


def test_inputs_are_checked_against_the_loss_forward_when_built():
    with pytest.raises(ValueError) as info:
        DistillationTerm("fitnet", _Pair(), {"student": "student", "techer": "teacher"})
    message = str(info.value)
    for fragment in ("'fitnet'", "'techer'", "did you mean 'teacher'?", "_Pair.forward accepts", "'weight'"):
        assert fragment in message


def test_inputs_must_cover_the_required_arguments():
    with pytest.raises(ValueError, match=r"'kd': inputs give no source for \['teacher'\].*_Pair.forward accepts"):
        DistillationTerm("kd", _Pair(), {"student": "student", "weight": "label"})
    with pytest.raises(ValueError, match=r"no source for \['input', 'target'\].*mse_loss accepts"):
        DistillationTerm("kd", F.mse_loss, {"reduction": "label"})
    with pytest.raises(ValueError, match=r"inputs names 'student', which the loss does not take; mse_loss accepts"):
        DistillationTerm("kd", F.mse_loss)  # (input, target), not the default (student, teacher)


def test_optional_keyword_only_and_var_keyword_arguments_are_accepted():
    DistillationTerm("kd", _Pair(), {"student": "student", "teacher": "teacher", "weight": "label"})
    DistillationTerm("kd", lambda student, *, teacher: (student - teacher).mean())
    DistillationTerm("kd", lambda student, **extra: student.mean(), {"student": "student", "anything": "label"})


def test_positional_only_arguments_cannot_be_named():
    with pytest.raises(ValueError, match="inputs names 'student'"):
        DistillationTerm("kd", lambda student, teacher, /: (student - teacher).mean())


def test_loss_arguments_reads_modules_and_callables():
    assert loss_arguments(_Pair()) == (["student", "teacher", "weight"], ["student", "teacher"], False)
    assert loss_arguments(mse) == (["student", "teacher"], ["student", "teacher"], False)
    assert loss_arguments(lambda **kwargs: 0)[2] is True


def test_every_packaged_loss_takes_its_documented_input_names():
    from kd_components import losses

    assert loss_arguments(losses.LogitKDLoss())[:2] == (["student", "teacher"], ["student", "teacher"])
    assert loss_arguments(losses.StructureLoss())[:2] == (["student", "label"], ["student", "label"])
    with pytest.raises(ValueError, match="did you mean 'label'"):
        DistillationTerm("sup", losses.StructureLoss(), {"student": "student", "labels": "label"})


def test_a_misspelled_config_key_fails_when_the_term_is_parsed():
    from monai.bundle import ConfigParser

    term = {
        "_target_": "kd_components.DistillationTerm",
        "name": "logit_kd",
        "loss": {"_target_": "kd_components.losses.LogitKDLoss"},
        "inputs": {"student": "student", "teachers": "teacher"},
    }
    with pytest.raises(RuntimeError) as info:
        ConfigParser({"term": term}).get_parsed_content("term")
    cause = info.value
    while cause.__cause__ is not None:
        cause = cause.__cause__
    assert isinstance(cause, ValueError)
    assert "'logit_kd': inputs names 'teachers' (did you mean 'teacher'?)" in str(cause)
    assert "LogitKDLoss.forward accepts ['student', 'teacher']" in str(cause)
