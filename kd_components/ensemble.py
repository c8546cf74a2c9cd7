"""Ensemble teacher: several trained teachers (seeds, folds) averaged into one frozen teacher."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kd_components.utils import freeze, load_teacher

__all__ = ["EnsembleTeacher", "load_ensemble_teacher"]

logger = logging.getLogger(__name__)

AVERAGES = ("logits", "probabilities")
_OWN_NAMES = frozenset({"members", "tap_member", "average"})  # attributes the ensemble sets itself


class EnsembleTeacher(nn.Module):
    """A frozen teacher made of several networks: the mean of their outputs, the taps of one of them.

    The output is, by default, the **mean of the members' logits** ``(1/M) Σ_m f_m(x)``, shape (B, C, *S) as each
    member's. It stays a logit map, so every term works unchanged: a softmax-based term (logit KD, CWD, KDAS) sees
    ``softmax(mean logits)``, a logit-space term (MSE on logits) the mean logits. The alternative,
    ``average="probabilities"``, averages the members' probabilities and returns their log,
    ``log((1/M) Σ_m softmax(f_m(x)))`` (``logit((1/M) Σ_m sigmoid(f_m(x)))`` for one channel): a softmax of it is
    exactly the mean probability (the classic ensemble posterior), but its values are log-probabilities (all <= 0),
    not on the members' logit scale, which matters to terms comparing raw logits (e.g. MSE on logits). The mean of
    logits is a geometric-mean-like posterior, usually somewhat sharper than the mean of probabilities.

    Feature taps (``"teacher:<module name>"`` in a term's inputs) come from **one member**, ``tap_member``: that
    member's top-level submodules are also registered under their own names directly on the ensemble, so the tap
    names of a plain teacher (e.g. ``"teacher:model.1.submodule"`` for a MONAI UNet) resolve unchanged to the
    chosen member's modules (via ``named_modules()``, as :class:`~kd_components.FeatureTaps` looks names up). The
    other members are reachable as ``members.<i>.<module name>``. Features are one member's while the logits are
    the ensemble's: a feature term teaches that member's representation.

    The chosen member's modules are registered twice (PyTorch's usual module sharing): ``parameters()`` and
    :func:`~kd_components.count_parameters` count them once, ``.to()`` moves them once, ``state_dict()`` lists
    them under both names (``torch.save`` stores the shared tensors once) and ``load_state_dict`` fills both.

    Every member is frozen (eval mode, ``requires_grad=False``) on construction. Members may differ in
    architecture as long as their outputs have the same shape; the tap names are the tap member's. 2D and 3D alike.
    Each forward pass runs every member: the teacher's cost per iteration grows ``M``-fold.

    Example (in a bundle config, in place of ``load_teacher``)::

        "teacher": "$kd_components.load_ensemble_teacher(@teacher_def, [os.path.join(@ckpt_dir, f'teacher_{s}.pt')
                    for s in range(3)], @device, tap_member=0, hint=@teacher_hint)"

    Args:
        members: the trained networks (at least one), e.g. the same architecture trained with different seeds
            or on different folds.
        tap_member: index in ``members`` of the member whose modules the feature taps read.
        average: ``"logits"`` (mean of logits, default) or ``"probabilities"`` (log of the mean probability).

    Raises:
        ValueError: when ``members`` is empty, ``tap_member`` is out of range, ``average`` is unknown, or a
            submodule name of the tap member clashes with the ensemble's own attributes.
    """

    def __init__(self, members: Sequence[nn.Module], tap_member: int = 0, average: str = "logits") -> None:
        super().__init__()
        members = list(members)
        if not members:
            raise ValueError("an EnsembleTeacher needs at least one member network")
        if not all(isinstance(m, nn.Module) for m in members):
            kinds = [type(m).__name__ for m in members]
            raise TypeError(f"ensemble members must be torch.nn.Module networks, got {kinds}")
        if not -len(members) <= int(tap_member) < len(members):
            raise ValueError(f"tap_member {tap_member} is out of range for an ensemble of {len(members)} members")
        if average not in AVERAGES:
            raise ValueError(f"average must be one of {AVERAGES}, got {average!r}")
        tap_member = int(tap_member) % len(members)
        # the tap member's children first, under their own names: named_modules() then lists e.g. "model.1.submodule"
        # before (and instead of) "members.<k>.model.1.submodule", so a plain teacher's tap names keep working
        for name, child in members[tap_member].named_children():
            if name in _OWN_NAMES or hasattr(self, name):
                raise ValueError(
                    f"ensemble member {tap_member} ({type(members[tap_member]).__name__}) has a submodule named "
                    f"{name!r}, which clashes with an EnsembleTeacher attribute: its taps cannot be exposed unchanged"
                )
            self.add_module(name, child)
        self.members = nn.ModuleList(members)
        self.tap_member = tap_member
        self.average = average
        freeze(self)

    @property
    def num_members(self) -> int:
        """The number of member networks."""
        return len(self.members)

    def describe(self) -> str:
        """A one-line description, e.g. ``"3 x UNet, mean of logits, taps of member 0"``."""
        kinds = sorted({type(m).__name__ for m in self.members})
        return f"{self.num_members} x {'/'.join(kinds)}, mean of {self.average}, taps of member {self.tap_member}"

    def member_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every member's output on ``x``.

        Args:
            x: the input, shape (B, C_in, *S) with ``S`` two or three spatial sizes.

        Returns:
            ``M`` tensors of shape (B, C, *S); a member returning a tuple or list (e.g. deep supervision heads)
            contributes its first element.
        """
        outputs = []
        for member in self.members:
            out = member(x)
            if isinstance(out, (tuple, list)):
                out = out[0]
            outputs.append(out)
        shapes = {tuple(o.shape) for o in outputs}
        if len(shapes) > 1:
            raise ValueError(f"ensemble members' outputs differ in shape: {[tuple(o.shape) for o in outputs]}")
        return outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The ensemble's logits.

        Args:
            x: the input, shape (B, C_in, *S).

        Returns:
            shape (B, C, *S): the mean of the members' logits, or with ``average="probabilities"`` the log of the
            mean of their softmax probabilities (the logit of the mean sigmoid probability when C is 1).
        """
        outputs = self.member_outputs(x)
        if len(outputs) == 1:
            return outputs[0]
        stacked = torch.stack(outputs)  # (M, B, C, *S)
        if self.average == "logits":
            return stacked.mean(dim=0)
        logits = stacked.float()
        if logits.shape[2] == 1:
            prob = torch.sigmoid(logits).mean(dim=0)
            return torch.logit(prob, eps=1e-6).to(stacked.dtype)
        log_prob = F.log_softmax(logits, dim=2)  # log of the mean probability, computed stably in log space
        mean = torch.logsumexp(log_prob, dim=0) - torch.log(torch.tensor(float(len(outputs)), device=logits.device))
        return mean.to(stacked.dtype)

    def extra_repr(self) -> str:
        return f"members={self.num_members}, tap_member={self.tap_member}, average={self.average!r}"


def load_ensemble_teacher(
    network: nn.Module,
    checkpoints: Sequence[str | Path] | str | Path,
    device: str | torch.device | None = None,
    tap_member: int = 0,
    hint: str = "",
    average: str = "logits",
) -> EnsembleTeacher:
    """Load several checkpoints of one teacher architecture into a frozen :class:`EnsembleTeacher`.

    Each checkpoint is loaded strictly into its own copy of ``network`` with :func:`kd_components.load_teacher`
    (same checks and messages: a missing file, or keys / shapes that do not fit, name the file).

    Args:
        network: the teacher architecture (e.g. the bundle's ``teacher_def``); it is copied once per checkpoint
            and not modified.
        checkpoints: the members' state-dict files (e.g. teachers trained with different seeds or folds), in
            member order. A single path gives an ensemble of one (the plain teacher).
        device: where the ensemble should run.
        tap_member: the index of the member whose modules the feature taps read.
        hint: what the user should do when a file is missing (e.g. the command that trains the teacher).
        average: ``"logits"`` (mean of logits, default) or ``"probabilities"``; see :class:`EnsembleTeacher`.

    Raises:
        FileNotFoundError: when a checkpoint does not exist (the message names it and its member index).
        ValueError: when a checkpoint does not fit ``network``, or ``checkpoints`` is empty.
    """
    paths = [checkpoints] if isinstance(checkpoints, (str, Path)) else list(checkpoints)
    if not paths:
        raise ValueError("load_ensemble_teacher needs at least one teacher checkpoint")
    if len(paths) == 1:
        logger.warning("ensemble teacher with a single checkpoint (%s): it is the plain teacher", paths[0])
    repeated = sorted({str(p) for p in paths if sum(Path(q) == Path(p) for q in paths) > 1})
    if repeated:
        logger.warning("ensemble teacher checkpoints listed more than once: %s (those members are identical)", repeated)
    members = []
    for i, path in enumerate(paths):
        try:
            members.append(load_teacher(copy.deepcopy(network), path, device, hint=hint))
        except (FileNotFoundError, ValueError) as err:
            raise type(err)(f"ensemble teacher member {i} of {len(paths)}: {err}") from err
    ensemble = EnsembleTeacher(members, tap_member=tap_member, average=average)
    if device is not None:
        ensemble.to(device)
    logger.info("ensemble teacher: %s, from %s", ensemble.describe(), [str(p) for p in paths])
    return ensemble
