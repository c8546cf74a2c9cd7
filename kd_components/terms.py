"""A distillation term: one loss, the tensors it reads, its weight and the modules that prepare its inputs."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping

import torch
from torch import nn

__all__ = ["DistillationTerm", "loss_arguments", "parse_source", "SOURCE_HELP"]

SOURCE_HELP = (
    "a source is 'student' or 'teacher' (the network output), 'student:<module name>' or "
    "'teacher:<module name>' (a feature tap, names as in named_modules()), 'label' or 'image'"
)


def parse_source(source: str) -> tuple[str, str | None]:
    """Split a source string into ``(kind, tap name)``.

    Args:
        source: ``"student"``, ``"teacher"``, ``"student:<module name>"``, ``"teacher:<module name>"``,
            ``"label"`` or ``"image"``.

    Returns:
        ``("student" | "teacher" | "label" | "image", tap name or None)``.
    """
    kind, sep, tap = source.partition(":")
    if kind in ("label", "image") and not sep:
        return kind, None
    if kind in ("student", "teacher"):
        if sep and not tap:
            raise ValueError(f"source {source!r} names no module after ':'; {SOURCE_HELP}")
        return kind, (tap or None)
    raise ValueError(f"unknown source {source!r}; {SOURCE_HELP}")


def loss_arguments(loss: Callable[..., torch.Tensor]) -> tuple[list[str], list[str], bool] | None:
    """The keyword arguments a loss takes: ``(all, required, takes **kwargs)``, or ``None`` if it cannot be read.

    Read from the signature of ``loss.forward`` for a module and of ``loss`` itself for any other callable.
    Positional-only parameters are left out: ``DistillationTerm`` passes every input by name.
    """
    try:
        params = inspect.signature(loss.forward if isinstance(loss, nn.Module) else loss).parameters.values()
    except (TypeError, ValueError):  # some builtins and C extensions have no readable signature
        return None
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    required = [p.name for p in named if p.default is p.empty]
    return [p.name for p in named], required, any(p.kind is p.VAR_KEYWORD for p in params)


class DistillationTerm(nn.Module):
    """One weighted distillation loss and the tensors it reads.

    ``inputs`` maps the loss's argument names to sources, so any loss with any signature can be plugged in from
    a config without touching a trainer. For example, a FitNet term on one tap pair::

        {
            "_target_": "kd_components.DistillationTerm",
            "name": "fitnet",
            "loss": {"_target_": "kd_components.losses.FitNetLoss"},
            "inputs": {"student": "student:model.1.submodule", "teacher": "teacher:model.1.submodule"},
            "align": {"student": "teacher"},
            "weight": 1.0
        }

    Args:
        name: a short unique name; the engine output and MLflow report the term under it.
        loss: a module or callable returning a scalar; it is called as ``loss(**{arg: tensor})``.
        inputs: ``{argument name: source}``; see :func:`parse_source`. Default
            ``{"student": "student", "teacher": "teacher"}`` (the two networks' outputs). The names are checked
            against the loss's ``forward`` (or call) signature here, when the term is built: an argument the loss
            does not take, or a required one left out, raises at once (a loss taking ``**kwargs`` takes any name).
        weight: the term's weight in the total loss.
        schedule: optional callable ``(iteration, epoch) -> factor`` multiplying ``weight``, e.g.
            :class:`kd_components.schedules.LinearWarmup`.
        align: ``{argument: reference argument}``: give ``argument`` an automatic :class:`FeatureAdapter` so its
            channels and spatial size match those of ``reference`` (channels found by a probe forward pass when
            the :class:`Distiller` is built).
        transforms: ``{argument: module}``: modules applied to an argument before the loss, e.g. a translator on
            the student side or a frozen paraphraser encoder on the teacher side. Trainable ones train with the
            student.
    """

    def __init__(
        self,
        name: str,
        loss: Callable[..., torch.Tensor],
        inputs: Mapping[str, str] | None = None,
        weight: float = 1.0,
        schedule: Callable[[int, int], float] | None = None,
        align: Mapping[str, str] | None = None,
        transforms: Mapping[str, nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if not name or not isinstance(name, str):
            raise ValueError(f"a distillation term needs a non-empty string name, got {name!r}")
        self.name = name
        self.loss = loss
        self.inputs: dict[str, str] = (
            dict(inputs) if inputs is not None else {"student": "student", "teacher": "teacher"}
        )
        if not self.inputs:
            raise ValueError(f"term {name!r}: 'inputs' is empty; {SOURCE_HELP}")
        self.parsed = {arg: parse_source(src) for arg, src in self.inputs.items()}
        accepts = self._check_arguments()
        self.weight = float(weight)
        self.schedule = schedule
        self.align: dict[str, str] = dict(align or {})
        for arg, ref in self.align.items():
            for key in (arg, ref):
                if key not in self.inputs:
                    raise ValueError(
                        f"term {name!r}: align names {key!r}, which is not in inputs {list(self.inputs)}{accepts}"
                    )
        self.transforms = nn.ModuleDict(dict(transforms or {}))
        for arg in self.transforms:
            if arg not in self.inputs:
                raise ValueError(
                    f"term {name!r}: transforms names {arg!r}, which is not in inputs {list(self.inputs)}{accepts}"
                )
        self.adapters = nn.ModuleDict()

    def _check_arguments(self) -> str:
        """Check ``inputs`` against the loss's signature; return a note on what the loss accepts, for messages."""
        signature = loss_arguments(self.loss)
        if signature is None:
            return ""
        names, required, var_keyword = signature
        if isinstance(self.loss, nn.Module):
            loss_name = f"{type(self.loss).__qualname__}.forward"
        else:
            loss_name = getattr(self.loss, "__qualname__", None) or type(self.loss).__qualname__
        accepts = f"{loss_name} accepts {names}" + (" and any other name (**kwargs)" if var_keyword else "")
        if not var_keyword:
            for arg in self.inputs:
                if arg not in names:
                    close = difflib.get_close_matches(arg, names, n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    raise ValueError(
                        f"term {self.name!r}: inputs names {arg!r}{hint}, which the loss does not take; {accepts}"
                    )
        missing = [arg for arg in required if arg not in self.inputs]
        if missing:
            raise ValueError(
                f"term {self.name!r}: inputs give no source for {missing}, which the loss needs: {accepts}"
            )
        return f"; {accepts}"

    def taps(self, kind: str) -> list[str]:
        """The tap names this term reads from ``kind`` (``"student"`` or ``"teacher"``)."""
        return [tap for k, tap in self.parsed.values() if k == kind and tap is not None]

    def uses(self, kind: str) -> bool:
        """Whether the term reads anything (output or tap) of ``kind``."""
        return any(k == kind for k, _ in self.parsed.values())

    def weight_at(self, iteration: int, epoch: int) -> float:
        """The effective weight at an engine step (``weight`` times the schedule's factor)."""
        return self.weight * (self.schedule(iteration, epoch) if self.schedule is not None else 1.0)

    def forward(self, sources: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Compute the unweighted loss.

        Args:
            sources: ``{source string: tensor}`` holding at least every source in ``inputs``.

        Returns:
            the loss, a scalar tensor.
        """
        kwargs = {}
        for arg, src in self.inputs.items():
            value = sources[src]
            if arg in self.transforms:
                value = self.transforms[arg](value)
            kwargs[arg] = value
        for arg, ref in self.align.items():
            kwargs[arg] = self.adapters[arg](kwargs[arg], kwargs[ref].shape[2:])
        try:
            value = self.loss(**kwargs)
        except (RuntimeError, ValueError, TypeError) as err:
            shapes = ", ".join(f"{a}={src!r} {tuple(kwargs[a].shape)}" for a, src in self.inputs.items())
            raise ValueError(
                f"distillation term {self.name!r} ({type(self.loss).__name__}) failed on inputs [{shapes}]: {err}. "
                'If the student and teacher shapes differ, add "align": {"<student arg>": "<teacher arg>"} '
                "to the term, or choose taps of matching shape (python -m kd_components.list_taps)."
            ) from err
        if value.dim() != 0:
            value = value.mean()
        return value
