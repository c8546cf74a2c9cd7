"""Weight schedules for distillation terms: a factor in [0, 1] that multiplies a term's weight."""

from __future__ import annotations

__all__ = ["LinearWarmup"]


class LinearWarmup:
    """Ramp a term's weight linearly from ``start`` to 1 over the first ``length`` iterations (or epochs).

    Useful when the adapters or the student are still random and a strong distillation signal would swamp the
    supervised loss. The factor for step ``s`` (1-based, as Ignite counts) is
    ``start + (1 - start) * min(1, (s - 1) / length)``.

    Args:
        length: number of iterations (or epochs) the ramp lasts; 0 means no warm-up.
        unit: ``"iteration"`` or ``"epoch"``: which engine counter drives the ramp.
        start: the factor at the first step.
    """

    def __init__(self, length: int, unit: str = "iteration", start: float = 0.0) -> None:
        if length < 0:
            raise ValueError(f"LinearWarmup length must be >= 0, got {length}")
        if unit not in ("iteration", "epoch"):
            raise ValueError(f"LinearWarmup unit must be 'iteration' or 'epoch', got {unit!r}")
        if not 0.0 <= start <= 1.0:
            raise ValueError(f"LinearWarmup start must be in [0, 1], got {start}")
        self.length = length
        self.unit = unit
        self.start = start

    def __call__(self, iteration: int, epoch: int) -> float:
        """
        Args:
            iteration: the engine's 1-based global iteration counter.
            epoch: the engine's 1-based epoch counter.
        """
        step = iteration if self.unit == "iteration" else epoch
        if self.length == 0:
            return 1.0
        return self.start + (1.0 - self.start) * min(1.0, max(0, step - 1) / self.length)

    def __repr__(self) -> str:
        return f"LinearWarmup(length={self.length}, unit={self.unit!r}, start={self.start})"
