"""KDAS: attention supervision and the Symmetrical Guiding Module.

KDAS's supervised loss, PraNet's structure loss, is :class:`kd_components.losses.supervised.StructureLoss`.

Reference: Trinh et al., "KDAS: Knowledge Distillation via Attention Supervision Framework for Polyp
Segmentation", ICASSP 2024 (arXiv:2312.08555).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kd_components.losses._grid import adaptive_pool, check_spatial, clip_grid

__all__ = ["KDASAttentionLoss", "KDASSGMLoss"]

_ACTIVATIONS = ("auto", "sigmoid", "softmax", "none", "logit")


def prediction_map(logits: torch.Tensor, channel: int, activation: str) -> torch.Tensor:
    """One prediction map ``(B, 1, *S)`` in float32 from logits ``(B, C, *S)``.

    Args:
        logits: network output, ``(B, C, *S)``.
        channel: the channel to keep (negative indices count from the end).
        activation: ``"sigmoid"`` (of the chosen channel), ``"softmax"`` (over C, then the chosen channel),
            ``"none"`` (the raw channel), ``"logit"`` (the log-odds of the chosen class: the raw logit of a
            one-channel output, ``z_c - logsumexp_{k != c} z_k`` of a multi-channel one, i.e. the inverse sigmoid
            of its softmax probability) or ``"auto"`` (sigmoid when C == 1, softmax otherwise).
    """
    logits = logits.float()
    num_channels = logits.shape[1]
    if activation == "auto":
        activation = "sigmoid" if num_channels == 1 else "softmax"
    if activation == "softmax":
        if num_channels < 2:
            raise ValueError("activation='softmax' needs at least two channels; use 'sigmoid' for one-channel logits")
        out = torch.softmax(logits, dim=1)[:, channel]
    elif activation == "sigmoid":
        out = torch.sigmoid(logits[:, channel])
    elif activation == "none":
        out = logits[:, channel]
    elif activation == "logit":
        if num_channels == 1:
            out = logits[:, 0]
        else:
            index = channel % num_channels
            others = torch.cat([logits[:, :index], logits[:, index + 1 :]], dim=1)
            out = logits[:, index] - torch.logsumexp(others, dim=1)
    else:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    return out.unsqueeze(1)


# exp() of arguments below this is < 1e-27 (negligible against the row maximum's exp(0) = 1): clamping there keeps
# every value a normal float, since denormal results make exp and matrix products tens of times slower on CPUs
_EXP_FLOOR = -60.0


class _RankOneAttentionKL(torch.autograd.Function):
    """``sum over b, i of KL(softmax_j(t_i t_j) || softmax_j(s_i s_j))`` for maps ``s``, ``t`` ``(B, N)`` (already
    divided by sqrt(tau)), and its gradient with respect to ``s``, in one pass over row blocks.

    With ``Q = softmax`` rows of the teacher and ``S`` of the student, row i's KL is
    ``t_i (Q t)_i - s_i (Q s)_i - LSE_t(i) + LSE_s(i)`` and
    ``d(sum_i KL_i) / d s_k = (S s - Q s)_k + sum_i s_i (S_ik - Q_ik)``: both need only matrix-vector products with
    each block of exp(x_i x_j) rows, so the gradient is accumulated during the forward pass (no N^2 tensor is kept
    for backward and nothing is recomputed); the backward pass scales it by the incoming gradient.

    Each block ``exp(x_i x_j - max_j x_i x_j)`` is written in place into one work buffer; the row maximum of a
    rank-one matrix is closed-form (``x_i max(x)`` if ``x_i >= 0``, else ``x_i min(x)``). Per block and side there
    are six tensor operations; everything per row is done once, vectorised, after the loop.
    """

    @staticmethod
    def forward(ctx, s: torch.Tensor, t: torch.Tensor, row_chunk: int, need_grad: bool) -> torch.Tensor:  # type: ignore[override]
        batch, num = s.shape
        x = torch.stack([t, s])  # (2, B, N): teacher, student
        hi, lo = x.amax(dim=-1, keepdim=True), x.amin(dim=-1, keepdim=True)
        row_max = torch.where(x >= 0, x * hi, x * lo)
        # the smallest exp argument of row i is -|x_i| (max(x) - min(x)); skip the clamp when none can be denormal
        # (decided on the host for CPU tensors only: elsewhere that would be a device sync)
        spread = (hi - lo) * x.abs().amax(dim=-1, keepdim=True)
        clamp = x.device.type != "cpu" or bool(spread.max() > -_EXP_FLOOR)
        # products with [1, t - s, s]: row sums, Q (t - s), Q s for the teacher; row sums, (unused), S s for the
        # student. t_i (Q t)_i - s_i (Q s)_i = t_i (Q (t - s))_i + (t_i - s_i) (Q s)_i avoids cancellation, and the
        # same inputs on both sides make the loss exactly zero when s == t. Laid out (B, 3, N) and multiplied by
        # the transposed block: much faster than block @ (B, N, 3) for a skinny right side.
        vec = torch.stack([torch.ones_like(s), t - s, s], dim=1)
        s_row = s.unsqueeze(1)
        grad = s.new_zeros(batch, 1, num) if need_grad else None
        products: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        work = s.new_empty(batch, min(row_chunk, num), num)
        for start in range(0, num, row_chunk):
            rows = slice(start, start + row_chunk)
            block = work[:, : min(row_chunk, num - start)]
            for side, sign in ((0, -1.0), (1, 1.0)):  # teacher, then student
                torch.mul(x[side, :, rows, None], x[side, :, None, :], out=block)
                block.sub_(row_max[side, :, rows, None])
                if clamp:
                    block.clamp_(min=_EXP_FLOOR)
                block.exp_()
                reduced = torch.bmm(vec, block.transpose(1, 2))  # (B, 3, r)
                products[side].append(reduced)
                if need_grad:  # -/+ sum_i s_i / Z_i exp(...)_ik
                    grad.baddbmm_(s_row[:, :, rows] / reduced[:, :1], block, alpha=sign)
        z_t, q_diff, qs = torch.cat(products[0], dim=-1).unbind(1)
        z_s, _, ss = torch.cat(products[1], dim=-1).unbind(1)
        if need_grad:
            ctx.save_for_backward(grad.squeeze(1) + (ss / z_s - qs / z_t))
        cross = (t * q_diff + (t - s) * qs) / z_t
        return (cross + ((row_max[1] + z_s.log()) - (row_max[0] + z_t.log()))).sum()  # + LSE_s(i) - LSE_t(i)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad_output * grad, None, None, None


def attention_kl_sum(student: torch.Tensor, teacher: torch.Tensor, temperature: float, row_chunk: int) -> torch.Tensor:
    """``sum over b, i of KL(softmax_j(t_i t_j / tau) || softmax_j(s_i s_j / tau))`` for maps ``(B, N)``, in float32.

    Exact, O(B * N^2) time and O(B * row_chunk * N) memory; no N^2 tensor is kept for backward. The teacher map is
    detached.
    """
    scale = temperature**-0.5
    with torch.autocast(device_type=student.device.type, enabled=False):
        s = student.float() * scale
        t = teacher.detach().float() * scale
        need_grad = torch.is_grad_enabled() and s.requires_grad
        return _RankOneAttentionKL.apply(s, t, max(1, int(row_chunk)), need_grad)


def _default_row_chunk(batch: int, num: int, device: torch.device) -> int:
    """Rows per block: a block of about 2^18 elements (1 MiB, cache-resident) on CPU, 2^26 (256 MiB) elsewhere."""
    budget = 2**18 if device.type == "cpu" else 2**26
    return max(16, budget // max(1, batch * num))


class KDASAttentionLoss(nn.Module):
    """KDAS attention supervision: match the spatial self-attention of the student's prediction map to the
    teacher's.

    Formulation used here: each network's prediction map P (by default the foreground *log-odds*, see
    ``activation``) is adaptively average-pooled to a grid (``grid`` per spatial dim, never more than the input
    size), flattened to ``p`` of shape ``(B, N)`` and, by default, standardised per map:
    ``p <- (p - mean(p)) / sqrt(var(p) + 1)``. The self-attention is ``A = p p^T`` ``(B, N, N)``; each row is
    turned into a distribution over positions by a softmax over the *last (spatial) axis* at temperature ``tau``,
    for both teacher and student. The loss is
    ``tau^2 * mean over the B*N rows of KL(softmax(A_T / tau) || softmax(A_S / tau))``.

    Why log-odds and standardisation: with probabilities in [0, 1] every entry of ``A / tau`` lies in [0, 1/tau],
    so each row's softmax is nearly uniform and the KL is tiny. Measured (MONAI UNets of the polyp bundle,
    synthetic polyps at 64 x 64, grid 32, trained teacher): probabilities give 0.0065 for an untrained student and
    0.0014 after 300 plain steps, under 1% of the supervised loss at alpha = 0.3. The released code feeds the raw
    logit maps to its attention target, so the log-odds are used here (the raw logit of a one-channel output; the
    chosen logit minus the log-sum-exp of the others for several channels, so a two-class softmax network and a
    one-channel sigmoid network give the same map). Raw log-odds have no fixed scale: a confident teacher's reach
    +-10, rows become one-hot, and the measured value *grew* from 5.4 to 15.9 while the student learned (it
    rewards matching the logit scale, not the pattern). Standardising each map makes the attention depend on the
    pattern only (unchanged by a shift or, for spreads well above one logit, a scaling of the logits), keeps
    ``A / tau`` within a few units, and gave 0.71 -> 0.47 -> 0.30 over the same training, i.e. ``alpha * value``
    about 0.2 -> 0.1 beside ``(1 - alpha) * supervised`` 1.1 -> 0.3. The ``+ 1`` (logit^2) under the square root
    keeps a nearly constant map (an untrained student) from being amplified: maps spread over much less than one
    logit are only centred. The row reduction is the mean (not the sum), so the value does not grow with the grid.
    Details: docs/PERFORMANCE.md.

    Departure from the released code: it applies the softmax over the singleton channel axis, which makes every
    student "distribution" the constant 1 and gives the student no gradient. The paper intends a distribution
    over positions, which is what is done here.

    Cost: exact, O(B * N^2) time and O(B * row_chunk * N) memory. Because ``A = p p^T`` has rank one, each row's
    KL is ``p^t_i (Q p^t)_i / tau - p^s_i (Q p^s)_i / tau - LSE_t(i) + LSE_s(i)`` (``Q`` the teacher's softmax
    rows, ``LSE`` the row log-sum-exp), and its gradient needs only matrix-vector products with the same rows; both
    are computed in one pass over row blocks, with nothing kept for (or recomputed in) backward: a few
    elementwise passes over ``(B, N, N)``, 19x faster than evaluating the dense softmax rows with autograd. In 3D the
    default grid gives N = 32768 (1000x the 2D cost); use ``grid=16`` (N = 4096) for volumes unless a GPU has time.

    The paper's setting: tau = 2, KL term weight alpha = 0.3 shared with SGM (total
    ``(1 - alpha) * L_seg + alpha * (tau^2 KL + SGM)``); applied to each of the two decoder heads.

    Args:
        temperature: softmax temperature tau (paper: 2).
        grid: pooling grid, one int for every spatial dim or one per dim (default 32).
        channel: which channel of the logits is the foreground map (default -1: the only channel of a one-channel
            output, the foreground of a two-class output).
        activation: ``"logit"`` (default, log-odds of ``channel``), ``"none"`` (the raw channel), ``"auto"``
            (sigmoid for one channel, softmax over channels otherwise), ``"sigmoid"`` or ``"softmax"``.
        standardize: standardise each pooled map (default True); see above.
        row_chunk: number of attention rows evaluated at once (speed / memory only; the result does not change);
            default: blocks of about 1 MiB on CPU (cache-resident), 256 MiB on GPU.

    Reference: Trinh et al., KDAS, ICASSP 2024, arXiv:2312.08555.
    """

    def __init__(
        self,
        temperature: float = 2.0,
        grid: int | Sequence[int] = 32,
        channel: int = -1,
        activation: str = "logit",
        standardize: bool = True,
        row_chunk: int | None = None,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
        if row_chunk is not None and row_chunk < 1:
            raise ValueError(f"row_chunk must be positive or None, got {row_chunk}")
        self.temperature = float(temperature)
        self.grid = grid
        self.channel = channel
        self.activation = activation
        self.standardize = bool(standardize)
        self.row_chunk = row_chunk

    def attention_map(self, logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """The flattened map ``(B, N)`` (float32) whose self-attention is compared: prediction map, pooled to
        ``size``, standardised when ``standardize``."""
        p = adaptive_pool(prediction_map(logits, self.channel, self.activation), size).flatten(1)
        if self.standardize:
            var, mean = torch.var_mean(p, dim=1, correction=0, keepdim=True)
            p = (p - mean) * torch.rsqrt(var + 1.0)
        return p

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """
        Args:
            student: student logits ``(B, C_s, *S_s)``, 1 to 3 spatial dims.
            teacher: teacher logits ``(B, C_t, *S_t)``, same batch and number of spatial dims.

        Returns:
            the scalar loss.
        """
        check_spatial(student, "student")
        check_spatial(teacher, "teacher")
        teacher = teacher.detach()
        size = clip_grid(self.grid, student.shape[2:], teacher.shape[2:])
        with torch.autocast(device_type=student.device.type, enabled=False):
            p_s = self.attention_map(student, size)
            p_t = self.attention_map(teacher, size)
        if p_s.shape != p_t.shape:
            raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} batch sizes differ")
        batch, num = p_s.shape
        chunk = self.row_chunk or _default_row_chunk(batch, num, p_s.device)
        total = attention_kl_sum(p_s, p_t, self.temperature, chunk)
        return total * self.temperature**2 / (batch * num)


def symmetrise(x: torch.Tensor) -> torch.Tensor:
    """Symmetrise the spatial axes of ``x`` ``(B, C, *S)`` (all spatial sizes equal): ``(2 / d!) * sum`` over the d!
    permutations of the d spatial axes. In 2D this is exactly ``P + P^T``; in 3D it is a third of the sum of the six
    axis permutations, so the result has the same scale in every dimension."""
    ndim = x.dim() - 2
    perms = list(itertools.permutations(range(2, x.dim())))
    out = sum(x.permute(0, 1, *perm) for perm in perms)
    return out * (2.0 / math.factorial(ndim))


class KDASSGMLoss(nn.Module):
    """KDAS Symmetrical Guiding Module (SGM): MSE between the symmetrised prediction maps of student and teacher.

    Formulation used here: the prediction map P (one channel, optionally passed through an activation) is
    adaptively average-pooled to a square (2D) or cubic (3D) grid and symmetrised over its spatial axes, as the
    released code does with the 2D map itself: ``P + P^T`` in 2D; in 3D the generalisation
    ``(1/3) * sum over the 6 permutations of the axes`` (same scale as ``P + P^T``). The loss is the mean squared
    difference of the teacher's and the student's symmetrised maps. Symmetrising the flattened-grid affinity
    ``p p^T`` instead would be a no-op (it is already symmetric), so the map itself is symmetrised.

    Spatial axes of size 1 in both inputs are dropped first (a one-slice volume is an image), so a one-slice 3D
    input gives the 2D result. Consequence of the symmetrisation: the loss is unchanged when either map is
    transposed (any permutation of its spatial axes in 3D).

    Defaults follow the released code: raw logits (``activation="none"``) and a grid equal to the largest spatial
    side (the code pools a square H x W map to H x H). The paper's weight: alpha = 0.3, shared with the attention
    KL term.

    Args:
        grid: side of the square / cubic grid; ``None`` (default) uses the largest spatial side of the inputs.
        channel: which channel of the logits is the foreground map (default -1).
        activation: ``"none"`` (default, raw logits as in the released code), ``"auto"``, ``"sigmoid"`` or
            ``"softmax"`` (see :class:`KDASAttentionLoss`).

    Reference: Trinh et al., KDAS, ICASSP 2024, arXiv:2312.08555.
    """

    def __init__(self, grid: int | None = None, channel: int = -1, activation: str = "none") -> None:
        super().__init__()
        if grid is not None and grid < 1:
            raise ValueError(f"grid must be a positive int or None, got {grid}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
        self.grid = grid
        self.channel = channel
        self.activation = activation

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """
        Args:
            student: student logits ``(B, C_s, *S_s)``, 1 to 3 spatial dims.
            teacher: teacher logits ``(B, C_t, *S_t)``, same batch and number of spatial dims.

        Returns:
            the scalar loss.
        """
        ndim = check_spatial(student, "student")
        if check_spatial(teacher, "teacher") != ndim:
            raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ in dims")
        teacher = teacher.detach()
        m_s = prediction_map(student, self.channel, self.activation)
        m_t = prediction_map(teacher, self.channel, self.activation)
        single = tuple(2 + i for i in range(ndim) if m_s.shape[2 + i] == 1 and m_t.shape[2 + i] == 1)
        if single:
            m_s, m_t = m_s.squeeze(single), m_t.squeeze(single)
        if m_s.dim() > 2:
            side = self.grid or max(max(m_s.shape[2:]), max(m_t.shape[2:]))
            size = (side,) * (m_s.dim() - 2)
            m_s, m_t = adaptive_pool(m_s, size), adaptive_pool(m_t, size)
        return F.mse_loss(symmetrise(m_s), symmetrise(m_t))
