"""The epoch means every trainer reports: one helper, so each value is averaged the same way."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping

import torch

__all__ = ["EpochMeans"]


class EpochMeans:
    """Sum per-iteration values without a host sync and write their epoch means to ``engine.state.metrics``.

    Each value is summed as a float32 tensor on its device (no ``.item()`` per iteration) and divided by the number
    of iterations that counted it, at the end of the epoch. An iteration may leave some names out of the count
    (``skip``), e.g. the supervised loss of a semi-supervised batch without any labelled sample; a name counted in
    no iteration of the epoch has the mean NaN.

    Example::

        means = EpochMeans()
        means.reset()                                   # at EPOCH_STARTED
        means.add({"supervised": loss.detach()})        # once per iteration
        means.write(engine.state.metrics)               # at EPOCH_COMPLETED: metrics["train_supervised"]

    Args:
        prefix: prepended to each name in ``engine.state.metrics`` (default ``"train_"``).
    """

    def __init__(self, prefix: str = "train_") -> None:
        self.prefix = prefix
        self.sums: dict[str, torch.Tensor | float] = {}
        self.counts: dict[str, int] = {}

    def reset(self) -> None:
        """Forget the sums (call at the start of every epoch)."""
        self.sums, self.counts = {}, {}

    def add(self, values: Mapping[str, torch.Tensor], skip: Collection[str] = ()) -> None:
        """Add one iteration's values.

        Args:
            values: ``{name: scalar tensor}`` (detached).
            skip: names of ``values`` that this iteration does not count (their mean ignores it).
        """
        for name, value in values.items():
            self.counts.setdefault(name, 0)
            if name in skip:
                continue
            self.sums[name] = self.sums.get(name, 0.0) + value.float()
            self.counts[name] += 1

    def means(self) -> dict[str, float]:
        """``{name: epoch mean}`` (NaN for a name no iteration counted)."""
        return {name: float(self.sums[name]) / count if count else math.nan for name, count in self.counts.items()}

    def write(self, metrics: dict[str, float]) -> None:
        """Write every mean to ``metrics`` as ``<prefix><name>``."""
        for name, mean in self.means().items():
            metrics[f"{self.prefix}{name}"] = mean
