"""Cross-architecture feature distillation: a CNN student's features matched in a transformer teacher's stage space."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._grid import adaptive_pool, autocast_off, check_spatial, clip_grid

__all__ = ["StageSpaceLoss", "token_layer_norm"]


def token_layer_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Layer-normalise ``x`` over channels at every position, without affine parameters.

    Each token (the channel vector at one position) is shifted to mean 0 and scaled to variance 1 over its ``C``
    channels: ``(x_p - mean_c x_p) / sqrt(var_c x_p + eps)`` (biased variance, as ``torch.nn.LayerNorm``).

    Args:
        x: a feature of shape (B, C, *S).
        eps: added to the variance.

    Returns:
        a tensor of the shape of ``x``.
    """
    mean = x.mean(dim=1, keepdim=True)
    var = x.var(dim=1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


class StageSpaceLoss(nn.Module):
    """Match a (projected) CNN student feature to a transformer teacher's stage tokens at several pooled scales.

    Formulation used here (in the spirit of TransKD and cross-architecture KD; their exact modules, cross selective
    fusion and the partially cross-attention projector, are not reproduced):

    1. **Projection into the stage space.** The student feature ``F_S`` (B, C_s, *S_s) must first be mapped to the
       teacher stage's width and grid, ``P(F_S)`` of shape (B, C_t, *S_t). In a bundle this is the term's
       ``"align": {"student": "teacher"}``: a trainable :class:`kd_components.FeatureAdapter`, a 1×1(×1) convolution,
       i.e. one linear projection applied to every token (the linear projector of cross-architecture KD), plus
       interpolation when the grids differ. Any other projector can be given in the term's ``transforms``.
    2. **Token normalisation.** Both sides are layer-normalised over channels at each position without affine
       parameters (:func:`token_layer_norm`). Swin stages are normalised this way before SwinUNETR's decoder reads
       them, so the student is compared in the space the teacher's decoder sees, and the scales of CNN activations
       (batch norm + ReLU) and of transformer tokens become comparable.
    3. **Multi-level pooled MSE** (TransKD's multi-level loss): with ``Z_S = LN(P(F_S))``, ``Z_T = LN(F_T)``,

       ``L = Σ_k w_k · mean((pool_{g_k}(Z_S) - pool_{g_k}(Z_T))²) / Σ_k w_k``

       over the grids ``g_k`` of ``grids`` (``None``: the full grid, no pooling; an int: adaptive average pooling
       to that size per axis, clipped to the feature's size) with weights ``w_k`` (default: full, 4, 2, 1 with
       weights 1, 1/2, 1/4, 1/8, halving as in TransKD). Dividing by ``Σ_k w_k`` keeps the scale of one MSE, so a
       term's weight reads as a FitNet weight. Stage weights (TransKD's: 0.1 for the patch embedding, up to 1 for
       the last stage; ``cardiac3d_swin`` uses a tenth of them) are the terms' weights in a bundle, not part of this
       loss.

    Properties (tested): 0 when the normalised student equals the normalised teacher (e.g. ``student == teacher``);
    unchanged when either side is multiplied by a positive factor or shifted by a constant over its channels at
    any position (up to ``eps``); no gradient reaches the teacher; a one-slice volume ``(..., 1)``, or a volume whose
    slices are all equal, gives the loss of the 2D image.

    Args:
        grids: pooling grids, ``None`` for the full grid; at least one.
        level_weights: one non-negative weight per grid, not all 0; default ``2^{-k}``.
        eps: the layer norm's variance floor.

    References:
        Liu et al., "TransKD: Transformer Knowledge Distillation for Efficient Semantic Segmentation", IEEE T-ITS 2024.
        Liu et al., "Cross-Architecture Knowledge Distillation", ACCV 2022.
    """

    def __init__(
        self,
        grids: Sequence[int | None] = (None, 4, 2, 1),
        level_weights: Sequence[float] | None = None,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.grids = [None if g is None else int(g) for g in grids]
        if not self.grids or any(g is not None and g < 1 for g in self.grids):
            raise ValueError(f"grids must be a non-empty list of positive ints or None, got {list(grids)}")
        weights = [0.5**k for k in range(len(self.grids))] if level_weights is None else list(level_weights)
        if len(weights) != len(self.grids) or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(
                f"level_weights must be {len(self.grids)} non-negative numbers, not all 0, got {level_weights}"
            )
        self.level_weights = [float(w) for w in weights]
        self.eps = eps

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """
        Args:
            student: the projected student feature ``P(F_S)`` of shape (B, C_t, *S_t).
            teacher: the teacher's stage feature ``F_T`` of shape (B, C_t, *S_t), 1 to 3 spatial dims.

        Returns:
            scalar loss.

        Raises:
            ValueError: when the shapes differ (the student was not projected to the teacher's stage).
        """
        teacher = teacher.detach()
        check_spatial(student, "student")
        check_spatial(teacher, "teacher")
        if student.shape != teacher.shape:
            raise ValueError(
                f"the student feature {tuple(student.shape)} is not in the teacher's stage space "
                f'{tuple(teacher.shape)}: project it first (the term\'s "align": {{"student": "teacher"}})'
            )
        with autocast_off(student):
            z_s = token_layer_norm(student.float(), self.eps)
            z_t = token_layer_norm(teacher.float(), self.eps)
            total = z_s.new_zeros(())
            for grid, weight in zip(self.grids, self.level_weights):
                if weight == 0:
                    continue
                if grid is None:
                    p_s, p_t = z_s, z_t
                else:
                    size = clip_grid(grid, z_s.shape[2:])
                    p_s, p_t = adaptive_pool(z_s, size), adaptive_pool(z_t, size)
                total = total + weight * (p_s - p_t).pow(2).mean()
            return total / sum(self.level_weights)
