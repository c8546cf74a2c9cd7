"""The distiller: a set of distillation terms and the trainable modules they own (adapters, translators)."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import torch
from torch import nn

from kd_components.adapters import FeatureAdapter
from kd_components.losses.adversarial import AdversarialDistillationLoss
from kd_components.taps import FeatureTaps, eval_mode, unwrap_network
from kd_components.terms import DistillationTerm

__all__ = ["Distiller"]


class Distiller(nn.Module):
    """Hold the distillation terms of a run and compute them from the student's and teacher's tensors.

    The distiller owns every trainable module of the distillation (automatic adapters, translators, generators
    inside losses, the discriminators of adversarial terms) but never the student or the teacher. Its parameters
    form two groups: :meth:`student_parameters` (everything but the discriminators) is what must be added to the
    student's optimizer; :meth:`discriminators` are trained in their own step, by their own optimizer, so a
    ``DistributedDataParallel`` wrapper of the distiller leaves their parameters and buffers alone (their own DDP
    wrapper syncs their step). It does not run the networks either; :class:`DistillationTrainer` does, once per
    step, and hands the outputs and taps to :meth:`forward`.

    Automatic adapters (a term's ``align``) need the channel counts of the tensors they connect. They are found
    by one forward pass of each network on zeros of ``example_input_shape`` when the distiller is built. The same
    probe sizes a loss that needs its inputs' shapes (one whose ``needs_shapes`` is true, e.g.
    :class:`~kd_components.losses.MGDLoss` built without channel counts): its ``build({argument: shape})`` is called
    with the shape of every input that is a network output or a tap, so method configs never hard-code widths.

    Args:
        terms: the distillation terms; names must be unique.
        student: the student network; needed only when a term has ``align``.
        teacher: the teacher network; needed only when a term has ``align``.
        example_input_shape: input shape (with batch and channel) of the probe pass, e.g. ``(1, 3, 64, 64)``.
    """

    def __init__(
        self,
        terms: Sequence[DistillationTerm],
        student: nn.Module | None = None,
        teacher: nn.Module | None = None,
        example_input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        names = [t.name for t in terms]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"distillation term names must be unique; repeated: {duplicates}")
        self.terms = nn.ModuleList(terms)
        if any(t.align or _needs_shapes(t) for t in self.terms):
            self._build_adapters(student, teacher, example_input_shape)
        own_step = self.discriminators()
        held = {id(t) for t in (*own_step.parameters(), *own_step.buffers())}
        ignored = [n for n, t in (*self.named_parameters(), *self.named_buffers()) if id(t) in held]
        if ignored:  # torch's way for a module to name what a DDP wrapper of it leaves alone
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, ignored)

    def taps(self, kind: str) -> list[str]:
        """Every tap name the terms read from ``kind`` (``"student"`` or ``"teacher"``), without repeats."""
        return list(dict.fromkeys(tap for term in self.terms for tap in term.taps(kind)))

    def uses(self, kind: str) -> bool:
        """Whether any term reads the output or a tap of ``kind``."""
        return any(term.uses(kind) for term in self.terms)

    def adversarial_terms(self) -> list[DistillationTerm]:
        """The terms whose loss is an :class:`~kd_components.losses.AdversarialDistillationLoss`."""
        return [t for t in self.terms if isinstance(t.loss, AdversarialDistillationLoss)]

    def discriminators(self) -> nn.ModuleDict:
        """The discriminators of the adversarial terms, ``{term name: discriminator}``, for their own step.

        A view, not a copy: the modules are the terms' own (any ``DistributedDataParallel`` wrapper removed, so the
        state dict keys are ``"<term>.<parameter>"`` with or without DDP). Its ``parameters()`` are the
        discriminators' parameter group and its ``state_dict()`` is the discriminator checkpoint's
        ``"discriminators"`` entry.
        """
        return nn.ModuleDict({t.name: unwrap_network(t.loss.discriminator) for t in self.adversarial_terms()})

    def named_student_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The trainable parameters the student's optimizer trains, with their names: the distiller's, less the
        discriminators' (see :meth:`student_parameters`)."""
        held = {id(p) for p in self.discriminators().parameters()}
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad and id(p) not in held]

    def student_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters to add to the student's optimizer: adapters, translators, generators inside
        losses; never a discriminator (trained by its own optimizer) nor a frozen module.

        Config: ``"params": "$list(@network.parameters()) + @distill#distiller.student_parameters()"``.
        """
        return [p for _, p in self.named_student_parameters()]

    def _build_adapters(
        self, student: nn.Module | None, teacher: nn.Module | None, example_input_shape: Sequence[int] | None
    ) -> None:
        if student is None or teacher is None or example_input_shape is None:
            raise ValueError(
                "a distillation term uses 'align' (automatic adapters) or a loss whose channels are probed: give the "
                "Distiller `student`, `teacher` and `example_input_shape` (e.g. [1, 3, 64, 64]) so it can find the "
                "channel counts to connect."
            )
        shapes = {
            **probe_shapes(student, "student", self.taps("student"), example_input_shape),
            **probe_shapes(teacher, "teacher", self.taps("teacher"), example_input_shape),
        }
        for term in self.terms:
            if _needs_shapes(term):
                term.loss.build({arg: shapes[src] for arg, src in term.inputs.items() if src in shapes})
            for arg, ref in term.align.items():
                src, ref_src = term.inputs[arg], term.inputs[ref]
                if src not in shapes or ref_src not in shapes:
                    bad = src if src not in shapes else ref_src
                    raise ValueError(f"term {term.name!r}: align works between network outputs and taps, not {bad!r}")
                in_shape, out_shape = shapes[src], shapes[ref_src]
                if len(in_shape) != len(out_shape):
                    raise ValueError(
                        f"term {term.name!r}: cannot align {src!r} of shape {in_shape} to {ref_src!r} of shape "
                        f"{out_shape}: they differ in the number of dimensions"
                    )
                term.adapters[arg] = FeatureAdapter(in_shape[1], out_shape[1], spatial_dims=len(in_shape) - 2)

    def forward(
        self, sources: Mapping[str, torch.Tensor], names: Collection[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Compute every term (or the terms in ``names``), unweighted.

        Args:
            sources: ``{source string: tensor}``, e.g. ``{"student": logits, "teacher:model.2": feature, ...}``.
            names: compute only the terms with these names (e.g. a subset computed on part of the batch);
                ``None``: all terms.

        Returns:
            ``{term name: scalar loss}``.
        """
        return {term.name: term(sources) for term in self.terms if names is None or term.name in names}


def _needs_shapes(term: DistillationTerm) -> bool:
    """Whether the term's loss waits for the probed shapes of its inputs (``loss.needs_shapes``)."""
    return bool(getattr(term.loss, "needs_shapes", False))


def probe_shapes(
    network: nn.Module, kind: str, taps: Sequence[str], example_input_shape: Sequence[int]
) -> dict[str, tuple[int, ...]]:
    """Shapes of a network's output and of its taps for one input of ``example_input_shape``.

    Args:
        network: the network to probe; it is run once in eval mode without gradients.
        kind: ``"student"`` or ``"teacher"``; the keys of the result are source strings of this kind.
        taps: the tap names to measure.
        example_input_shape: the probe input's shape, e.g. ``(1, 3, 64, 64)``.
    """
    net = unwrap_network(network)
    param = next(net.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    with FeatureTaps(net, taps, owner=kind) as recorder, torch.no_grad():
        with eval_mode(net):
            out = net(torch.zeros(*example_input_shape, device=device))
        shapes = {f"{kind}:{name}": tuple(recorder[name].shape) for name in taps}
    if isinstance(out, (tuple, list)):
        out = out[0]
    shapes[kind] = tuple(out.shape)
    return shapes
