"""Evaluation metrics for thin tubular structures: clDice (centerline Dice, Shit et al., CVPR 2021).

clDice compares each mask with the *skeleton* of the other, so every vessel counts by its length rather than its
area: missing a thin vessel costs little Dice but as much clDice as missing a thick one of the same length, and a
prediction that is too thick but follows the right centerlines keeps a clDice of 1::

    Tprec = |S(P) ∩ G| / |S(P)|     (topology precision: predicted centerline inside the ground truth)
    Tsens = |S(G) ∩ P| / |S(G)|     (topology sensitivity: true centerline covered by the prediction)
    clDice = 2 Tprec Tsens / (Tprec + Tsens)

with ``S`` the skeleton. The skeleton is, by default, the morphological skeleton of the paper's soft-skeleton, computed
in torch (1 to 3 spatial dimensions, on the tensors' device) by iterated minimum / maximum filters: with ``erode`` a
minimum over the axis-aligned 3-voxel cross, ``dilate`` a maximum over the 3^N window and ``open = dilate(erode(.))``,
``S(x) = Σ_k relu(erode^k(x) - open(erode^k(x)))`` (accumulated without double counting), iterated until the erosion
is empty, so no part of the mask is missed whatever its thickness; voxels outside the image count as background. On
binary masks it is binary and is computed with logical operations (the same result as :func:`soft_skeleton`): a
1-voxel-wide line is its own skeleton, a 3-voxel-wide bar gives its centre line. It is not guaranteed to be connected
or one voxel thin (unlike topology-preserving thinning), which makes clDice slightly more lenient on thick structures
than with the paper's scikit-image ``skeletonize``; ``skeleton="skimage"`` uses that one instead when scikit-image is
installed (it is not a dependency of this package). The default does not switch to scikit-image by itself, so that
reported values do not change with the environment.

- :func:`soft_skeleton`: the differentiable soft-skeleton (also usable in a clDice loss);
- :func:`cldice`: per-sample, per-channel clDice of binary tensors ``(B, C, *spatial)``, 1D to 3D;
- :class:`ClDiceMetric`: MONAI ``CumulativeIterationMetric`` (buffers, reduction, ``get_not_nans``);
- :class:`SpacedHausdorffDistance`: MONAI's Hausdorff distance handler in physical units, each case's spacing read
  from its label's affine (voxels when the affine is the identity); with ``empty_penalty="diagonal"`` a class whose
  prediction is empty while its label is not (or the reverse) scores the image diagonal instead of MONAI's inf/NaN,
  which a mean would otherwise silently drop (:func:`image_diagonal`, :func:`hausdorff_with_penalty`);
- :class:`ClDiceHandler`: the Ignite handler for bundle configs, e.g. in ``validate#handlers`` /
  ``key_val_metric``::

      {"_target_": "kd_components.metrics.ClDiceHandler",
       "output_transform": "$monai.handlers.from_engine(['pred', 'label'])"}

  on the one-hot ``(B, 2, *spatial)`` ``pred`` / ``label`` that MONAI's post-processing (``AsDiscreted`` with
  ``argmax`` / ``to_onehot``) produces; the background channel is left out by default.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.handlers import HausdorffDistance, IgniteMetricHandler
from monai.metrics import Cumulative, CumulativeIterationMetric, compute_hausdorff_distance
from monai.metrics.utils import do_metric_reduction
from monai.utils import MetricReduction

try:  # ignite is a MONAI optional dependency; the handlers need it
    from ignite.metrics.metric import reinit__is_reduced
except ImportError:  # pragma: no cover

    def reinit__is_reduced(func: Callable) -> Callable:  # noqa: N802 - ignite's name
        return func


logger = logging.getLogger(__name__)

__all__ = [
    "EMPTY_PENALTIES",
    "SKELETONS",
    "ClDiceHandler",
    "ClDiceMetric",
    "SpacedHausdorffDistance",
    "cldice",
    "hausdorff_with_penalty",
    "image_diagonal",
    "skeletonize",
    "soft_skeleton",
    "voxel_spacing",
]

SKELETONS = ("torch", "skimage")
EMPTY_PENALTIES = ("diagonal",)
"""Named penalties of :func:`hausdorff_with_penalty` (a number is also accepted)."""


def _neighbours(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` shifted by one voxel both ways along ``dim``, filled with zeros (outside the image is background)."""
    n = x.shape[dim]
    before, after = torch.zeros_like(x), torch.zeros_like(x)
    before.narrow(dim, 1, n - 1).copy_(x.narrow(dim, 0, n - 1))
    after.narrow(dim, 0, n - 1).copy_(x.narrow(dim, 1, n - 1))
    return before, after


def _erode(x: torch.Tensor) -> torch.Tensor:
    """Erosion: minimum (logical and, for bool) over the axis-aligned 3-voxel cross."""
    combine = torch.logical_and if x.dtype == torch.bool else torch.minimum
    out = x
    for dim in range(2, x.dim()):
        before, after = _neighbours(x, dim)
        out = combine(out, combine(before, after))
    return out


def _dilate(x: torch.Tensor) -> torch.Tensor:
    """Dilation: maximum (logical or, for bool) over the 3^N window, one axis after the other."""
    combine = torch.logical_or if x.dtype == torch.bool else torch.maximum
    for dim in range(2, x.dim()):
        before, after = _neighbours(x, dim)
        x = combine(x, combine(before, after))
    return x


def _binary_skeleton(mask: torch.Tensor, iterations: int | None = None) -> torch.Tensor:
    """:func:`soft_skeleton` of a bool mask with logical operations (the same result, less memory and time)."""
    x = mask
    skeleton = x & ~_dilate(_erode(x))
    for _ in range(iterations if iterations is not None else max(x.shape[2:]) // 2 + 1):
        x = _erode(x)
        if iterations is None and not bool(x.any()):
            break
        skeleton |= x & ~_dilate(_erode(x))
    return skeleton


def _check_spatial(x: torch.Tensor, name: str) -> None:
    """Raise for tensors that are not ``(B, C, *spatial)`` with 1 to 3 spatial dimensions."""
    if x.dim() not in (3, 4, 5):
        raise ValueError(f"{name} must be (B, C, *spatial) with 1 to 3 spatial dimensions, got shape {tuple(x.shape)}")


def soft_skeleton(x: torch.Tensor, iterations: int | None = None) -> torch.Tensor:
    """Soft-skeleton of Shit et al. (2021) by iterated min/max filters; the morphological skeleton for 0/1 input.

    Args:
        x: ``(B, C, *spatial)`` values in [0, 1] (1 to 3 spatial dimensions); differentiable.
        iterations: number of erosions; None erodes until nothing is left (at most half the largest spatial size
            plus one), which a metric needs so that thick parts are not missed.

    Returns:
        a tensor like ``x`` with the skeleton's values in [0, 1].
    """
    _check_spatial(x, "x")
    x = x.float()
    limit = iterations if iterations is not None else max(x.shape[2:]) // 2 + 1
    skeleton = F.relu(x - _dilate(_erode(x)))
    for _ in range(limit):
        x = _erode(x)
        if iterations is None and not bool((x > 0).any()):
            break
        delta = F.relu(x - _dilate(_erode(x)))
        skeleton = skeleton + F.relu(delta - skeleton * delta)
    return skeleton


def _skimage_skeleton(mask: torch.Tensor) -> torch.Tensor:
    """Skeleton of every ``(b, c)`` mask with ``skimage.morphology.skeletonize`` (3D masks need scikit-image 0.23+)."""
    try:
        from skimage.morphology import skeletonize as sk_skeletonize
    except ImportError as err:
        raise ImportError(
            "skeleton='skimage' needs scikit-image (pip install scikit-image); or use skeleton='torch'."
        ) from err
    array = mask.detach().cpu().numpy().astype(bool)
    out = np.zeros_like(array)
    for b in range(array.shape[0]):
        for c in range(array.shape[1]):
            out[b, c] = sk_skeletonize(array[b, c])
    return torch.as_tensor(out, device=mask.device)


def skeletonize(mask: torch.Tensor, skeleton: str = "torch", iterations: int | None = None) -> torch.Tensor:
    """Boolean skeleton of a binary ``(B, C, *spatial)`` mask (values > 0.5 are foreground).

    Args:
        mask: binary (bool or 0/1) tensor with 1 to 3 spatial dimensions.
        skeleton: ``"torch"`` (:func:`soft_skeleton` on the 0/1 mask) or ``"skimage"``
            (``skimage.morphology.skeletonize``, needs scikit-image).
        iterations: erosions of the torch skeleton; None until the mask is eroded away.
    """
    _check_spatial(mask, "mask")
    binary = mask.float() > 0.5
    if skeleton == "torch":
        return _binary_skeleton(binary, iterations)
    if skeleton == "skimage":
        return _skimage_skeleton(binary)
    raise ValueError(f"skeleton must be one of {SKELETONS}, got {skeleton!r}")


def cldice(
    pred: torch.Tensor,
    label: torch.Tensor,
    skeleton: str = "torch",
    iterations: int | None = None,
    ignore_empty: bool = True,
) -> torch.Tensor:
    """clDice of binary masks, per sample and channel: ``2 Tprec Tsens / (Tprec + Tsens)``.

    ``Tprec = |S(pred) ∩ label| / |S(pred)|``, ``Tsens = |S(label) ∩ pred| / |S(label)|``, ``S`` the skeleton. A
    non-empty mask always has a non-empty skeleton. An empty prediction against a non-empty label scores 0, and so
    does a prediction whose skeleton misses the label entirely. When the label is empty the value is NaN with
    ``ignore_empty`` (left out of MONAI reductions, as in ``DiceMetric``), else 1 for an empty prediction and 0
    otherwise. Symmetric in ``pred`` and ``label`` (apart from the empty-label rule).

    Args:
        pred: ``(B, C, *spatial)`` binary prediction (bool or 0/1; values > 0.5 are foreground), 1 to 3 spatial dims.
        label: ground truth of the same shape.
        skeleton: ``"torch"`` (default) or ``"skimage"``, see :func:`skeletonize`.
        iterations: erosions of the torch skeleton; None (default) until the masks are eroded away.
        ignore_empty: NaN instead of a score where the label is empty.

    Returns:
        ``(B, C)`` float32 tensor.
    """
    _check_spatial(pred, "pred")
    if pred.shape != label.shape:
        raise ValueError(f"pred and label must have the same shape, got {tuple(pred.shape)} and {tuple(label.shape)}")
    p, g = pred.float() > 0.5, label.float() > 0.5
    skel_p, skel_g = skeletonize(p, skeleton, iterations), skeletonize(g, skeleton, iterations)
    dims = tuple(range(2, p.dim()))
    n_skel_p, n_skel_g = skel_p.sum(dims).float(), skel_g.sum(dims).float()
    tprec = (skel_p & g).sum(dims).float() / n_skel_p.clamp(min=1)
    tsens = (skel_g & p).sum(dims).float() / n_skel_g.clamp(min=1)
    score = torch.where(tprec + tsens > 0, 2 * tprec * tsens / (tprec + tsens).clamp(min=1e-12), 0.0)
    empty_label = n_skel_g == 0
    empty_score = torch.where(n_skel_p == 0, 1.0, 0.0)
    score = torch.where(empty_label, torch.full_like(score, float("nan")) if ignore_empty else empty_score, score)
    return score.float()


class ClDiceMetric(CumulativeIterationMetric):
    """clDice as a MONAI cumulative metric: :func:`cldice` per sample and channel, buffered, then reduced.

    Inputs are binary ``(B, C, *spatial)`` tensors (or lists of channel-first tensors), typically one-hot
    predictions and labels from MONAI's post-processing.

    Args:
        include_background: also score channel 0. Ignored for single-channel inputs (binary masks), whose only
            channel is the foreground. Defaults to False: clDice of the background's skeleton is meaningless.
        reduction: MONAI reduction mode (``"mean"``, ``"mean_batch"``, ``"none"``...), applied to non-NaN values.
        get_not_nans: ``aggregate`` also returns the number of non-NaN values.
        ignore_empty: score NaN (left out of the reduction) where the label is empty.
        skeleton: ``"torch"`` or ``"skimage"``, see :func:`skeletonize`.
        iterations: erosions of the torch skeleton; None until the masks are eroded away.
    """

    def __init__(
        self,
        include_background: bool = False,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
        ignore_empty: bool = True,
        skeleton: str = "torch",
        iterations: int | None = None,
    ) -> None:
        super().__init__()
        if skeleton not in SKELETONS:
            raise ValueError(f"skeleton must be one of {SKELETONS}, got {skeleton!r}")
        self.include_background = include_background
        self.reduction = reduction
        self.get_not_nans = get_not_nans
        self.ignore_empty = ignore_empty
        self.skeleton = skeleton
        self.iterations = iterations

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """``(B, C)`` clDice of one batch.

        Args:
            y_pred: binary prediction ``(B, C, *spatial)``.
            y: binary ground truth of the same shape.
        """
        if not self.include_background and y_pred.shape[1] > 1:
            y_pred, y = y_pred[:, 1:], y[:, 1:]
        return cldice(y_pred, y, self.skeleton, self.iterations, self.ignore_empty)

    def aggregate(
        self, reduction: MetricReduction | str | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Reduce the buffered ``(N, C)`` values.

        Args:
            reduction: overrides the reduction given at construction.
        """
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError(f"the data to aggregate must be a PyTorch Tensor, got {type(data)}.")
        value, not_nans = do_metric_reduction(data, reduction or self.reduction)
        return (value, not_nans) if self.get_not_nans else value


class ClDiceHandler(IgniteMetricHandler):
    """Ignite handler computing :class:`ClDiceMetric` over an epoch (like MONAI's ``MeanDice`` handler).

    Args:
        include_background: also score channel 0 of multi-channel inputs; defaults to False.
        reduction: MONAI reduction mode over samples and channels; defaults to ``"mean"``.
        ignore_empty: leave samples with an empty label out of the mean.
        skeleton: ``"torch"`` or ``"skimage"``, see :func:`skeletonize`.
        iterations: erosions of the torch skeleton; None until the masks are eroded away.
        output_transform: extracts ``(y_pred, y)`` from ``engine.state.output``, e.g.
            ``monai.handlers.from_engine(["pred", "label"])``.
        save_details: save the per-sample values in ``engine.state.metric_details`` under the metric's name.
    """

    def __init__(
        self,
        include_background: bool = False,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        ignore_empty: bool = True,
        skeleton: str = "torch",
        iterations: int | None = None,
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
    ) -> None:
        metric_fn = ClDiceMetric(
            include_background=include_background,
            reduction=reduction,
            ignore_empty=ignore_empty,
            skeleton=skeleton,
            iterations=iterations,
        )
        super().__init__(metric_fn=metric_fn, output_transform=output_transform, save_details=save_details)


def voxel_spacing(tensor: torch.Tensor) -> list[float] | None:
    """The voxel spacing of a channel-first ``MetaTensor`` ``(C, *spatial)`` from its affine, one value per spatial
    dim (the norms of the affine's columns); None for a plain tensor (no geometry known)."""
    if not isinstance(tensor, MetaTensor):
        return None
    spacing = [float(v) for v in tensor.pixdim]
    return spacing[: tensor.ndim - 1]


def image_diagonal(shape: Sequence[int], spacing: Sequence[float] | None = None) -> float:
    """The diagonal of an image of ``shape`` voxels: ``sqrt(sum((n_i * s_i)^2))``, in the unit of ``spacing``.

    It is longer than any distance between two voxel centres of the image (at most ``sqrt(sum(((n_i - 1) s_i)^2))``),
    so a Hausdorff distance penalised with it is worse than any prediction that has at least one voxel.

    Args:
        shape: the spatial shape (no channel).
        spacing: the voxel size per spatial dim; None for 1 (voxels).
    """
    spacing = [1.0] * len(shape) if spacing is None else list(spacing)
    if len(spacing) != len(shape):
        raise ValueError(f"spacing {spacing} does not match the {len(shape)} spatial dims of shape {tuple(shape)}")
    return math.sqrt(sum((float(n) * float(s)) ** 2 for n, s in zip(shape, spacing)))


def hausdorff_with_penalty(
    pred: torch.Tensor,
    label: torch.Tensor,
    include_background: bool = False,
    distance_metric: str = "euclidean",
    percentile: float | None = None,
    directed: bool = False,
    spacing: Sequence[float] | None = None,
    empty_penalty: str | float = "diagonal",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hausdorff distance of one case, per class, with a stated value where MONAI's is undefined.

    MONAI gives inf or NaN (with a warning) when the prediction or the label of a class is empty, and mean
    reductions then leave that case out: a model that misses a structure entirely would look *better*. Here:

    - prediction empty, label not (a missed structure), or label empty, prediction not (a structure where there is
      none): the penalty, ``"diagonal"`` being :func:`image_diagonal` of the case (in the unit of ``spacing``);
    - both empty: NaN (nothing to measure; left out of means, as MONAI's Dice does for an empty label);
    - otherwise MONAI's value.

    Args:
        pred: one case's binary (one-hot) prediction ``(C, *spatial)``; values > 0.5 are foreground.
        label: the case's ground truth, same shape.
        include_background: also score channel 0.
        distance_metric: ``"euclidean"``, ``"chessboard"`` or ``"taxicab"``.
        percentile: e.g. 95 for HD95; None for the maximum.
        directed: distance from the prediction to the label only.
        spacing: the voxel size per spatial dim (None: voxels).
        empty_penalty: ``"diagonal"`` or a number, in the unit of ``spacing``.

    Returns:
        ``(values, penalised)``: two ``(C',)`` tensors (``C'`` the scored channels): float32 distances, and bool
        flags of the classes that received the penalty.
    """
    if pred.shape != label.shape:
        raise ValueError(f"pred and label must have the same shape, got {tuple(pred.shape)} and {tuple(label.shape)}")
    if isinstance(empty_penalty, str):
        if empty_penalty not in EMPTY_PENALTIES:
            raise ValueError(f"empty_penalty must be one of {EMPTY_PENALTIES} or a number, got {empty_penalty!r}")
        penalty = image_diagonal(pred.shape[1:], spacing)
    else:
        penalty = float(empty_penalty)
    p, g = pred.float() > 0.5, label.float() > 0.5
    if not include_background and p.shape[0] > 1:
        p, g = p[1:], g[1:]
    pred_empty = ~p.flatten(1).any(1).cpu()
    label_empty = ~g.flatten(1).any(1).cpu()
    with warnings.catch_warnings():  # MONAI warns about the empty classes handled below
        warnings.simplefilter("ignore")
        values = compute_hausdorff_distance(
            p[None].float(),
            g[None].float(),
            include_background=True,
            distance_metric=distance_metric,
            percentile=percentile,
            directed=directed,
            spacing=None if spacing is None else list(spacing),
        )[0]
    values = values.detach().float().cpu()
    penalised = pred_empty ^ label_empty
    values = torch.where(penalised, torch.tensor(penalty, dtype=torch.float32), values)
    values = torch.where(pred_empty & label_empty, torch.tensor(float("nan")), values)
    return values, penalised


class SpacedHausdorffDistance(HausdorffDistance):
    """MONAI's ``HausdorffDistance`` handler with each case's voxel spacing taken from its label's affine, and an
    optional stated penalty for empty predictions.

    MONAI's handler computes distances in voxels unless a ``spacing`` is passed to the metric, which its ``update``
    never does. Here every case of the batch is scored with the spacing of its label (or prediction) ``MetaTensor``
    (:func:`voxel_spacing`), so HD95 comes in the physical unit of the image header (mm for NIfTI). Data whose affine
    is the identity (spacing unknown, e.g. the SSL4MIS ACDC copy, or PNG images) gives voxels / pixels, as the
    plain handler; plain tensors too.

    With ``empty_penalty`` (e.g. ``"diagonal"``), a class whose prediction is empty while its label is not (or the
    reverse) scores the penalty instead of MONAI's inf / NaN, which mean reductions silently leave out (see
    :func:`hausdorff_with_penalty`); a class empty in both is NaN. The per-case, per-class flags of the penalised
    values are saved in ``engine.state.metric_details["<name>_penalised"]`` (with ``save_details``) and the number
    of penalised cases in ``engine.state.metrics["<name>_penalised"]``, and logged.

    Args:
        include_background: also score channel 0.
        distance_metric: ``"euclidean"`` (the only one that uses spacing), ``"chessboard"`` or ``"taxicab"``.
        percentile: e.g. 95 for HD95; None for the maximum.
        directed: directed distance from prediction to label only.
        reduction: MONAI reduction over cases and channels.
        output_transform: extracts ``(y_pred, y)`` — lists of ``(C, *spatial)`` one-hot tensors or batched
            ``(B, C, *spatial)`` tensors — from ``engine.state.output``.
        save_details: save the per-case values in ``engine.state.metric_details`` (for ``MetricsSaver``).
        empty_penalty: None (MONAI's inf / NaN, left out of the mean), ``"diagonal"`` (the case's image diagonal,
            :func:`image_diagonal`, in HD95's unit) or a number in that unit.
    """

    def __init__(
        self,
        include_background: bool = False,
        distance_metric: str = "euclidean",
        percentile: float | None = None,
        directed: bool = False,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
        empty_penalty: str | float | None = None,
    ) -> None:
        if isinstance(empty_penalty, str) and empty_penalty not in EMPTY_PENALTIES:
            raise ValueError(f"empty_penalty must be None, one of {EMPTY_PENALTIES} or a number, got {empty_penalty!r}")
        self.empty_penalty = empty_penalty
        self._penalised = Cumulative()
        super().__init__(
            include_background=include_background,
            distance_metric=distance_metric,
            percentile=percentile,
            directed=directed,
            reduction=reduction,
            output_transform=output_transform,
            save_details=save_details,
        )

    @reinit__is_reduced
    def reset(self) -> None:
        """Clear the buffered values and penalty flags (at every epoch start)."""
        super().reset()
        self._penalised.reset()

    def update(self, output: Sequence[torch.Tensor]) -> None:
        """Score each case of ``output = (y_pred, y)`` with its own spacing (and the penalty where it applies)."""
        y_pred, y = output
        for pred, label in zip(y_pred, y):
            spacing = voxel_spacing(label)
            if spacing is None:
                spacing = voxel_spacing(pred)
            if self.empty_penalty is None:
                self.metric_fn(y_pred=[pred], y=[label], spacing=spacing)
                continue
            metric = self.metric_fn
            values, penalised = hausdorff_with_penalty(
                pred,
                label,
                include_background=metric.include_background,
                distance_metric=metric.distance_metric,
                percentile=metric.percentile,
                directed=metric.directed,
                spacing=spacing,
                empty_penalty=self.empty_penalty,
            )
            metric.extend(values[None])
            self._penalised.extend(penalised[None].float())

    def compute(self) -> Any:
        """The reduced distance; also records (and logs) the penalised cases when ``empty_penalty`` is set."""
        result = super().compute()
        if self.empty_penalty is None or self._engine is None or self._name is None:
            return result
        flags = self._penalised.get_buffer()
        if not isinstance(flags, torch.Tensor):  # no case scored
            return result
        if self.save_details:
            self._engine.state.metric_details[f"{self._name}_penalised"] = flags
        count = int(flags.bool().any(dim=1).sum())
        self._engine.state.metrics[f"{self._name}_penalised"] = count
        if count:
            logger.info(
                "%s: %d of %d cases have a class with an empty prediction (or label) and score the penalty %s",
                self._name,
                count,
                flags.shape[0],
                self.empty_penalty,
            )
        return result
