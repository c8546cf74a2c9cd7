"""Tests of the comparison statistics: bootstrap intervals, verdicts, the teacher–student gap closed."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kd_components.stats import (
    BETTER,
    NO_EVIDENCE,
    WORSE,
    bootstrap_mean_ci,
    gap_closed,
    higher_is_better,
    mean_sd,
    paired_bootstrap_ci,
    seed_average,
    verdict,
)


def _cases(seed: int, n: int = 80) -> np.ndarray:
    """Per-case Dice-like values of a reference model."""
    return np.random.default_rng(seed).uniform(0.5, 0.9, n)


def test_paired_bootstrap_covers_a_known_difference():
    base = _cases(0)
    noise = np.random.default_rng(1).normal(0.0, 0.02, base.size)
    better = base + 0.05 + noise
    diff = paired_bootstrap_ci(better, base, n_resamples=5000, seed=0)
    assert diff.n == base.size
    assert diff.estimate == pytest.approx(float(np.mean(better - base)))
    assert diff.low < 0.05 < diff.high  # the true difference is covered
    assert diff.low > 0  # and the interval excludes 0: a real effect
    assert verdict(diff.low, diff.high) == BETTER


def test_paired_bootstrap_of_a_zero_difference_covers_zero():
    base = _cases(2)
    same = base + np.random.default_rng(3).normal(0.0, 0.03, base.size)
    same -= np.mean(same - base)  # exactly zero mean difference
    diff = paired_bootstrap_ci(same, base, n_resamples=5000, seed=0)
    assert diff.estimate == pytest.approx(0.0, abs=1e-12)
    assert diff.low < 0 < diff.high
    assert verdict(diff.low, diff.high) == NO_EVIDENCE


def test_paired_bootstrap_is_seeded_and_pairs_only_finite_cases():
    a, b = _cases(4, 30), _cases(5, 30)
    assert paired_bootstrap_ci(a, b, 2000, seed=7) == paired_bootstrap_ci(a, b, 2000, seed=7)
    assert paired_bootstrap_ci(a, b, 2000, seed=7) != paired_bootstrap_ci(a, b, 2000, seed=8)
    a[3], b[5] = np.nan, np.inf
    diff = paired_bootstrap_ci(a, b, 2000)
    keep = np.isfinite(a) & np.isfinite(b)
    assert diff.n == 28 and diff.estimate == pytest.approx(float(np.mean(a[keep] - b[keep])))


def test_paired_bootstrap_needs_the_same_cases_and_two_pairs():
    with pytest.raises(ValueError, match="same cases"):
        paired_bootstrap_ci([1.0, 2.0], [1.0])
    one = paired_bootstrap_ci([0.9, np.nan], [0.8, 0.7])
    assert one.n == 1 and one.estimate == pytest.approx(0.1) and math.isnan(one.low) and math.isnan(one.high)
    assert verdict(one.low, one.high) == NO_EVIDENCE
    none = paired_bootstrap_ci([np.nan], [0.5])
    assert none.n == 0 and math.isnan(none.estimate)


def test_bootstrap_mean_ci_brackets_the_mean():
    values = _cases(6)
    ci = bootstrap_mean_ci(values, 3000)
    assert ci.estimate == pytest.approx(values.mean()) and ci.n == values.size
    assert ci.low < ci.estimate < ci.high


@pytest.mark.parametrize(
    "low, high, higher, expected",
    [
        (0.01, 0.05, True, BETTER),
        (-0.05, -0.01, True, WORSE),
        (-0.01, 0.02, True, NO_EVIDENCE),
        (0.0, 0.02, True, NO_EVIDENCE),  # touching 0 is not excluding it
        (-3.0, -1.0, False, BETTER),  # HD95 went down
        (1.0, 3.0, False, WORSE),
        (-1.0, 1.0, False, NO_EVIDENCE),
        (float("nan"), float("nan"), True, NO_EVIDENCE),
    ],
)
def test_verdicts_follow_the_interval_and_the_metric_direction(low, high, higher, expected):
    assert verdict(low, high, higher) == expected


def test_gap_closed():
    assert gap_closed(0.85, 0.80, 0.90) == pytest.approx(0.5)
    assert gap_closed(0.80, 0.80, 0.90) == pytest.approx(0.0)
    assert gap_closed(0.78, 0.80, 0.90) == pytest.approx(-0.2)  # distillation hurt
    assert gap_closed(0.95, 0.80, 0.90) == pytest.approx(1.5)  # overtook the teacher
    assert math.isnan(gap_closed(0.85, 0.80, 0.80))  # teacher not better: nothing to close
    assert math.isnan(gap_closed(0.85, 0.80, 0.75))
    assert gap_closed(8.0, 10.0, 6.0, higher_is_better=False) == pytest.approx(0.5)  # HD95: lower is better
    assert math.isnan(gap_closed(8.0, 10.0, 12.0, higher_is_better=False))
    assert math.isnan(gap_closed(float("nan"), 0.8, 0.9))


def test_metric_directions():
    assert higher_is_better("mean_dice") and higher_is_better("dice_polyp") and higher_is_better("cldice")
    assert higher_is_better("mean_iou")
    assert not higher_is_better("hd95") and not higher_is_better("hd95_LV") and not higher_is_better("HD95")
    assert not higher_is_better("surface_distance")


def test_mean_sd_and_seed_average_ignore_non_finite_values():
    assert mean_sd([0.8, 0.9, float("nan")]) == pytest.approx((0.85, float(np.std([0.8, 0.9], ddof=1))))
    mean, sd = mean_sd([0.7])
    assert mean == pytest.approx(0.7) and math.isnan(sd)
    averaged = seed_average([[0.5, np.nan, np.nan], [0.7, 0.4, np.inf]])
    assert averaged[:2] == pytest.approx([0.6, 0.4]) and math.isnan(averaged[2])
    with pytest.raises(ValueError, match="n_seeds, n_cases"):
        seed_average([0.5, 0.6])
