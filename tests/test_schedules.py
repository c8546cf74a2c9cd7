"""Tests of kd_components.schedules: the LinearWarmup weight factor."""

from __future__ import annotations

import pytest

from kd_components.schedules import LinearWarmup


def test_linear_ramp_from_zero_over_length_iterations():
    warm = LinearWarmup(4)
    assert [warm(i, 1) for i in range(1, 8)] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


def test_formula_with_start_value():
    warm = LinearWarmup(10, start=0.2)
    for step in range(1, 30):
        expected = 0.2 + 0.8 * min(1.0, (step - 1) / 10)
        assert warm(step, 1) == pytest.approx(expected)


def test_factor_is_monotone_and_bounded():
    warm = LinearWarmup(7, start=0.3)
    values = [warm(i, 1) for i in range(0, 20)]
    assert all(0.3 <= v <= 1.0 for v in values)
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert values[0] == pytest.approx(0.3)  # a step before the first one clamps to start
    assert values[-1] == 1.0


def test_epoch_unit_ignores_iterations():
    warm = LinearWarmup(2, unit="epoch")
    assert warm(1000, 1) == 0.0
    assert warm(1, 2) == pytest.approx(0.5)
    assert warm(1, 3) == 1.0


def test_iteration_unit_ignores_epochs():
    warm = LinearWarmup(2)
    assert warm(1, 50) == 0.0


def test_zero_length_means_no_warmup():
    assert LinearWarmup(0)(1, 1) == 1.0
    assert LinearWarmup(0, start=0.0)(1, 1) == 1.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"length": -1}, "length must be >= 0"),
        ({"length": 3, "unit": "step"}, "unit must be 'iteration' or 'epoch'"),
        ({"length": 3, "start": 1.5}, r"start must be in \[0, 1\]"),
        ({"length": 3, "start": -0.1}, r"start must be in \[0, 1\]"),
    ],
)
def test_invalid_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LinearWarmup(**kwargs)


def test_repr_names_settings():
    assert repr(LinearWarmup(5, unit="epoch", start=0.1)) == "LinearWarmup(length=5, unit='epoch', start=0.1)"
