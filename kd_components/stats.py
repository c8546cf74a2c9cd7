"""Statistics that say whether a difference between two segmentation models is real (pure numpy, no torch).

Models are compared on the *same* test cases, so the comparison is paired: for each case the difference of the two
models' metric, then a bootstrap over cases of the mean difference. When a model was trained with several seeds,
its per-case metric is first averaged over the seeds (:func:`seed_average`), so that the interval is over test
cases (the population a clinic cares about), with the seed noise averaged out rather than counted as cases.

- :func:`mean_sd`: mean and sample standard deviation of the finite values (e.g. a metric over seeds);
- :func:`seed_average`: per-case mean over seeds, ignoring NaN (cases a seed could not score);
- :func:`paired_bootstrap_ci`: mean paired difference with its percentile bootstrap confidence interval;
- :func:`bootstrap_mean_ci`: mean with its percentile bootstrap confidence interval (e.g. for plot error bars);
- :func:`verdict`: ``"better"``, ``"worse"`` or ``"no evidence"`` from an interval and the metric's direction;
- :func:`gap_closed`: the fraction of the teacher–student gap that a distilled student closes;
- :func:`higher_is_better`: the direction of a metric from its name (distances are lower-is-better).

Example::

    diff = paired_bootstrap_ci(kdas_per_case, none_per_case, n_resamples=10000, seed=0)
    verdict(diff.low, diff.high, higher_is_better=True)  # "better" when the whole interval is above 0
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

__all__ = [
    "BETTER",
    "NO_EVIDENCE",
    "WORSE",
    "Interval",
    "bootstrap_mean_ci",
    "gap_closed",
    "higher_is_better",
    "mean_sd",
    "paired_bootstrap_ci",
    "seed_average",
    "verdict",
]

BETTER, WORSE, NO_EVIDENCE = "better", "worse", "no evidence"
_CHUNK = 1000
"""Bootstrap resamples drawn at a time (bounds the memory to ``_CHUNK * n`` indices)."""
_LOWER_IS_BETTER_PREFIXES = ("hd", "asd", "assd", "nsd_distance")
_LOWER_IS_BETTER_WORDS = ("distance", "hausdorff", "error", "loss")


class Interval(NamedTuple):
    """An estimate with its confidence interval.

    Attributes:
        estimate: the point estimate (a mean, or a mean difference).
        low: the interval's lower bound (NaN when it cannot be computed).
        high: the interval's upper bound (NaN when it cannot be computed).
        n: the number of cases it rests on (finite values, or finite pairs).
    """

    estimate: float
    low: float
    high: float
    n: int


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` is better: False for distances (``hd95``, ``hd95_<class>``, ASD, any name
    with ``distance`` / ``hausdorff`` / ``error`` / ``loss``), True otherwise (Dice, IoU, clDice...).

    Args:
        metric: the metric's name, case-insensitive.
    """
    name = metric.lower()
    return not (name.startswith(_LOWER_IS_BETTER_PREFIXES) or any(w in name for w in _LOWER_IS_BETTER_WORDS))


def _finite(values: Sequence[float] | np.ndarray) -> np.ndarray:
    array = np.asarray(values, dtype=float).ravel()
    return array[np.isfinite(array)]


def mean_sd(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``) of the finite values.

    Args:
        values: e.g. one metric's test mean per seed.

    Returns:
        ``(mean, sd)``; the mean is NaN without finite values, the sd NaN with fewer than two.
    """
    finite = _finite(values)
    mean = float(finite.mean()) if finite.size else float("nan")
    sd = float(finite.std(ddof=1)) if finite.size > 1 else float("nan")
    return mean, sd


def seed_average(per_seed: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """Per-case mean over seeds, ignoring non-finite values; NaN for a case no seed could score.

    Args:
        per_seed: ``(n_seeds, n_cases)`` values of one model on the same cases in the same order.

    Returns:
        ``(n_cases,)`` float array.
    """
    array = np.asarray(per_seed, dtype=float)
    if array.ndim != 2:
        raise ValueError(f"per_seed must be (n_seeds, n_cases), got shape {array.shape}")
    finite = np.isfinite(array)
    counts = finite.sum(axis=0)
    sums = np.where(finite, array, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def _bootstrap_means(values: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """Means of ``n_resamples`` resamples (with replacement, same size) of ``values``, drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    n = values.size
    means = np.empty(n_resamples)
    for start in range(0, n_resamples, _CHUNK):
        stop = min(start + _CHUNK, n_resamples)
        means[start:stop] = values[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    return means


def _interval(values: np.ndarray, n_resamples: int, confidence: float, seed: int) -> Interval:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be positive, got {n_resamples}")
    n = int(values.size)
    if n == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0)
    estimate = float(values.mean())
    if n < 2:  # one case says nothing about the spread
        return Interval(estimate, float("nan"), float("nan"), n)
    means = _bootstrap_means(values, n_resamples, seed)
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return Interval(estimate, float(low), float(high), n)


def paired_bootstrap_ci(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    n_resamples: int = 10000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Mean of the paired differences ``a - b`` over cases, with a percentile bootstrap confidence interval.

    Cases where either value is not finite are left out (``Interval.n`` says how many pairs remain). The resampling
    is seeded, so the same inputs give the same interval.

    Args:
        a: per-case values of the model of interest (e.g. seed-averaged Dice of the distilled student).
        b: per-case values of the reference on the same cases in the same order (e.g. the student alone).
        n_resamples: bootstrap resamples of the cases.
        confidence: the interval's coverage, e.g. 0.95.
        seed: seed of the resampling.

    Returns:
        the mean difference and its interval; NaN bounds with fewer than two pairs.
    """
    a, b = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same cases, got {a.size} and {b.size} values")
    keep = np.isfinite(a) & np.isfinite(b)
    return _interval(a[keep] - b[keep], n_resamples, confidence, seed)


def bootstrap_mean_ci(
    values: Sequence[float] | np.ndarray, n_resamples: int = 10000, confidence: float = 0.95, seed: int = 0
) -> Interval:
    """Mean of the finite values with a percentile bootstrap confidence interval (e.g. a model's mean Dice).

    Args:
        values: per-case values.
        n_resamples: bootstrap resamples of the cases.
        confidence: the interval's coverage, e.g. 0.95.
        seed: seed of the resampling.
    """
    return _interval(_finite(values), n_resamples, confidence, seed)


def verdict(low: float, high: float, higher_is_better: bool = True) -> str:
    """Whether an interval of differences (model − reference) shows the model better, worse, or neither.

    Args:
        low: the interval's lower bound.
        high: the interval's upper bound.
        higher_is_better: the metric's direction (False for distances such as HD95, where a negative difference
            is an improvement).

    Returns:
        ``"better"`` when the whole interval lies on the improving side of 0, ``"worse"`` when it lies on the other
        side, ``"no evidence"`` when it contains 0 or is undefined (NaN).
    """
    if not (math.isfinite(low) and math.isfinite(high)):
        return NO_EVIDENCE
    if low > 0:
        return BETTER if higher_is_better else WORSE
    if high < 0:
        return WORSE if higher_is_better else BETTER
    return NO_EVIDENCE


def gap_closed(distilled: float, baseline: float, teacher: float, higher_is_better: bool = True) -> float:
    """The fraction of the teacher–student gap closed: ``(distilled − baseline) / (teacher − baseline)``.

    1 means the distilled student matches the teacher, 0 the student alone; negative values mean distillation
    made the student worse, values above 1 that it overtook the teacher.

    Args:
        distilled: the distilled student's metric.
        baseline: the student alone's metric.
        teacher: the teacher's metric.
        higher_is_better: the metric's direction.

    Returns:
        the fraction, or NaN when the teacher is not better than the student alone (no gap to close) or a value
        is not finite.
    """
    values = (distilled, baseline, teacher)
    if not all(math.isfinite(v) for v in values):
        return float("nan")
    gap = teacher - baseline
    if (gap <= 0) if higher_is_better else (gap >= 0):
        return float("nan")
    return (distilled - baseline) / gap
