"""Cross-layer correlation losses: CoCo DistillNet, Graph Flow and LightVessel's feature similarity distillation."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kd_components.adapters import match_spatial_size

from ._grid import adaptive_pool, autocast_off, check_spatial, clip_grid

__all__ = ["CrossLayerCorrelationLoss", "FeatureSimilarityDistillationLoss", "GraphFlowLoss"]


def _same_dims(**features: torch.Tensor) -> int:
    """Check that every feature is (B, C, *S) with the same batch size and number of spatial dims; return the dims."""
    dims = {check_spatial(x, name) for name, x in features.items()}
    batches = {x.shape[0] for x in features.values()}
    if len(dims) != 1 or len(batches) != 1:
        shapes = {name: tuple(x.shape) for name, x in features.items()}
        raise ValueError(f"features must share batch size and number of spatial dims, got {shapes}")
    return dims.pop()


def _position_normalised(x: torch.Tensor, eps: float) -> torch.Tensor:
    """(B, C, *S) → (B, C, N) with every position's channel vector L2-normalised, in float32."""
    return F.normalize(x.float().flatten(2), dim=1, eps=eps)


class CrossLayerCorrelationLoss(nn.Module):
    """CoCo DistillNet cross-layer correlation: match how spatial similarity changes from a shallow to a deep layer.

    Formulation used here: every tap is pooled (adaptive average or max) to a common grid g — per spatial dim
    ``min(grid, smallest size of that dim among the four taps)``, so no dim is pooled up and a one-slice volume
    gives the same result as its 2D slice. Each position's channel vector is L2-normalised and the channel-mixed
    spatial similarity is ``A = F̂ᵀF̂`` (|g|×|g|, cosines in [-1, 1]). The cross-layer correlation is

    - ``"matmul"`` (default): ``C = A_shallow · A_deep / |g|`` — the matrix product, divided by |g| so entries stay in
      [-1, 1] whatever the grid (the paper gives no scale);
    - ``"elementwise"``: ``C = A_shallow ⊙ A_deep``.

    The loss is ``mean((C_T - C_S)²)`` over batch and the |g|² entries. Channel counts may differ between all four
    taps (in CoCo they are aligned by a paraphraser/translator upstream). The loss is unchanged by a per-position
    positive scaling of any feature at grid resolution. The published criterion is not available, so matmul was
    chosen as the default because it composes the two similarity structures (a two-step relation shallow→deep)
    rather than only gating one by the other.

    Cost: written out, ``C`` is |g|×|g| and the matmul form costs O(B·|g|³). Because ``C = F̂_shᵀ (F̂_sh F̂_dpᵀ)
    F̂_dp / |g|`` has rank at most the channel count, the matmul loss is computed without forming it when every tap
    has fewer channels than |g| (CoCo's translated taps: 8 and 32 channels against |g| = 256 in 2D, 4096 in 3D):
    ``Σ(C_T - C_S)² = ⟨C_T, C_T⟩ + ⟨C_S, C_S⟩ - 2⟨C_T, C_S⟩`` with
    ``⟨C_X, C_Y⟩ = Σ (M_Xᵀ (F̂_sh,X F̂_sh,Yᵀ) M_Y) ⊙ (F̂_dp,X F̂_dp,Yᵀ) / |g|²``, ``M = F̂_sh F̂_dpᵀ``: only
    channel×channel matrices, O(B·|g|·c²) time and O(B·|g|·c) memory, in float64 (the three terms nearly cancel
    when student and teacher agree). The value equals the written-out form to rounding (tested); ``"elementwise"``
    and taps wider than |g| use the written-out form.

    Paper defaults: 16×16 grid (2D); weight λ_s = 1 alongside CE + Dice and the adversarial term.

    Args:
        grid: pooling grid per spatial dim, an int or one int per dim.
        product: ``"matmul"`` or ``"elementwise"``.
        pooling: ``"avg"`` or ``"max"`` adaptive pooling.
        eps: floor of the L2 norm in the per-position normalisation.

    Reference:
        Zou et al., "CoCo DistillNet: a Cross-layer Correlation Distillation Network for Pathological Gastric Cancer
        Segmentation", IEEE BIBM 2021.
    """

    def __init__(
        self, grid: int | Sequence[int] = 16, product: str = "matmul", pooling: str = "avg", eps: float = 1e-8
    ) -> None:
        super().__init__()
        if product not in ("matmul", "elementwise"):
            raise ValueError(f"product must be 'matmul' or 'elementwise', got {product!r}")
        if pooling not in ("avg", "max"):
            raise ValueError(f"pooling must be 'avg' or 'max', got {pooling!r}")
        self.grid = grid
        self.product = product
        self.pooling = pooling
        self.eps = eps

    def similarity(self, feature: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """Spatial similarity ``F̂ᵀF̂`` (B, |g|, |g|) of ``feature`` (B, C, *S) pooled to ``grid``."""
        f = _position_normalised(adaptive_pool(feature.float(), grid, self.pooling), self.eps)
        return f.transpose(1, 2) @ f

    def correlation(self, shallow: torch.Tensor, deep: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """Cross-layer correlation (B, |g|, |g|) of one network's shallow and deep taps."""
        a_shallow, a_deep = self.similarity(shallow, grid), self.similarity(deep, grid)
        if self.product == "matmul":
            return (a_shallow @ a_deep) / a_shallow.shape[-1]
        return a_shallow * a_deep

    def forward(
        self,
        student_shallow: torch.Tensor,
        student_deep: torch.Tensor,
        teacher_shallow: torch.Tensor,
        teacher_deep: torch.Tensor,
    ) -> torch.Tensor:
        """
        Args:
            student_shallow: student shallow tap (B, C1_s, *S1_s).
            student_deep: student deep tap (B, C2_s, *S2_s).
            teacher_shallow: teacher shallow tap (B, C1_t, *S1_t).
            teacher_deep: teacher deep tap (B, C2_t, *S2_t).

        Returns:
            scalar loss.
        """
        teacher_shallow, teacher_deep = teacher_shallow.detach(), teacher_deep.detach()
        taps = [student_shallow, student_deep, teacher_shallow, teacher_deep]
        _same_dims(
            student_shallow=student_shallow,
            student_deep=student_deep,
            teacher_shallow=teacher_shallow,
            teacher_deep=teacher_deep,
        )
        grid = clip_grid(self.grid, *(x.shape[2:] for x in taps))
        positions = math.prod(grid)
        with autocast_off(student_shallow):
            if self.product == "matmul" and max(x.shape[1] for x in taps) < positions:
                return self._factored_matmul_loss(taps, grid).float()
            c_s = self.correlation(student_shallow, student_deep, grid)
            c_t = self.correlation(teacher_shallow, teacher_deep, grid)
            return (c_t - c_s).pow(2).mean()

    def _unit(self, feature: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """``F̂`` (B, C, |g|) of ``feature`` pooled to ``grid``, in float64."""
        return _position_normalised(adaptive_pool(feature.float(), grid, self.pooling), self.eps).double()

    def _factored_matmul_loss(self, taps: Sequence[torch.Tensor], grid: Sequence[int]) -> torch.Tensor:
        """``mean((C_T - C_S)²)`` of the matmul form through channel×channel products only (see the class doc).

        Args:
            taps: student shallow, student deep, teacher shallow, teacher deep, each (B, C_i, *S_i).
            grid: the common pooling grid.

        Returns:
            the scalar loss in float64.
        """
        f_s, g_s, f_t, g_t = (self._unit(x, grid) for x in taps)  # (B, C_i, N)
        n = f_s.shape[-1]
        m_s, m_t = f_s @ g_s.transpose(1, 2), f_t @ g_t.transpose(1, 2)  # (B, C_sh, C_dp)

        def inner(f_x, g_x, m_x, f_y, g_y, m_y):  # ⟨C_X, C_Y⟩ · N² per sample, (B,)
            core = m_x.transpose(1, 2) @ (f_x @ f_y.transpose(1, 2)) @ m_y  # (B, C_dp,X, C_dp,Y)
            return (core * (g_x @ g_y.transpose(1, 2))).sum(dim=(1, 2))

        total = inner(f_t, g_t, m_t, f_t, g_t, m_t) + inner(f_s, g_s, m_s, f_s, g_s, m_s)
        total = total - 2 * inner(f_t, g_t, m_t, f_s, g_s, m_s)
        return total.sum() / (f_s.shape[0] * float(n) ** 4)


class GraphFlowLoss(nn.Module):
    """Graph Flow: match the change ("flow") of a channel graph between two layers of the teacher and the student.

    Formulation used here: for each tap F (B, C, *S) a graph has one vertex per channel, described by

    - ``"pooled"`` (default): the channel map adaptive-average-pooled to a common grid g (per dim ``min(grid,
      smallest size among the four taps)``), flattened to |g| values;
    - ``"patch"``: the k×k(×k) patch of the channel map around the channel's peak activation (k = ``patch_size``,
      clipped to the map; per dim ``min(k, smallest size among the taps)``), flattened.

    Each descriptor is L2-normalised (V, (B, C, D)); edges are the cosine similarities between vertices,
    ``E = V Vᵀ`` (B, C, C). The flow from the shallow to the deep tap is ``ΔV = V_deep - V_shallow`` and
    ``ΔE = E_deep - E_shallow``; the loss is

        ``λ_v · mean_{b,c} ‖ΔV_T - ΔV_S‖² + λ_e · mean_{b,c,c'} (ΔE_T - ΔE_S)²``.

    Because descriptors are unit vectors and edges cosines, both terms are bounded (≤ 16 and ≤ 16), so λ are O(1)
    — the authors' unnormalised version needed weights 1e-5 / 1e-8. Vertex flow needs the same channels in all four
    taps: align them upstream (teacher: frozen paraphraser encoders, student: translators or the student width);
    a mismatch raises an error. The loss is unchanged by a per-channel positive scaling of any tap. The paper's
    criterion file is not public; the exact descriptor and normalisation are ours.

    Paper defaults: k = 3 patch, weights 1e-5 (vertices) / 1e-8 (edges) on their unnormalised terms; here 1 / 1.

    Args:
        descriptor: ``"pooled"`` or ``"patch"``.
        grid: pooling grid per spatial dim for ``"pooled"`` (int or one per dim).
        patch_size: k, the salient-patch size per spatial dim for ``"patch"``.
        vertex_weight: λ_v.
        edge_weight: λ_e.
        eps: floor of the L2 norm in the normalisation.

    Reference:
        Zou et al., "Graph Flow: Cross-layer Graph Flow Distillation for Dual Efficient Medical Image Segmentation",
        IEEE TMI 2023.
    """

    def __init__(
        self,
        descriptor: str = "pooled",
        grid: int | Sequence[int] = 4,
        patch_size: int = 3,
        vertex_weight: float = 1.0,
        edge_weight: float = 1.0,
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        if descriptor not in ("pooled", "patch"):
            raise ValueError(f"descriptor must be 'pooled' or 'patch', got {descriptor!r}")
        if patch_size < 1:
            raise ValueError(f"patch_size must be positive, got {patch_size}")
        self.descriptor = descriptor
        self.grid = grid
        self.patch_size = patch_size
        self.vertex_weight = vertex_weight
        self.edge_weight = edge_weight
        self.eps = eps

    @staticmethod
    def salient_patches(feature: torch.Tensor, patch: Sequence[int]) -> torch.Tensor:
        """The ``patch``-sized window of every channel map around its peak, (B, C, prod(patch)).

        Windows are shifted inward at the borders so they always lie inside the map.
        """
        b, c, *size = feature.shape
        flat = feature.flatten(2)
        peak = flat.argmax(dim=2)  # (B, C)
        strides = [1] * len(size)
        for d in range(len(size) - 2, -1, -1):
            strides[d] = strides[d + 1] * size[d + 1]
        index = torch.zeros((b, c, 1), dtype=torch.long, device=feature.device)
        for n, k, stride in zip(size, patch, strides, strict=True):
            coord = (peak // stride) % n
            start = (coord - k // 2).clamp(0, n - k)
            offsets = torch.arange(k, device=feature.device)
            # all combinations: (B, C, P_prev, 1) + (1, 1, 1, k) -> (B, C, P_prev * k)
            along = ((start.unsqueeze(-1) + offsets) * stride).unsqueeze(2)
            index = (index.unsqueeze(-1) + along).flatten(2)
        return flat.gather(2, index)

    def vertices(self, feature: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """L2-normalised vertex descriptors (B, C, D) of ``feature`` (B, C, *S)."""
        f = feature.float()
        if self.descriptor == "pooled":
            desc = adaptive_pool(f, grid, "avg").flatten(2)
        else:
            desc = self.salient_patches(f, grid)
        return F.normalize(desc, dim=2, eps=self.eps)

    def forward(
        self,
        student_shallow: torch.Tensor,
        student_deep: torch.Tensor,
        teacher_shallow: torch.Tensor,
        teacher_deep: torch.Tensor,
    ) -> torch.Tensor:
        """
        Args:
            student_shallow: student shallow (e.g. encoder) tap (B, C, *S1_s).
            student_deep: student deep (e.g. decoder) tap (B, C, *S2_s).
            teacher_shallow: teacher shallow tap, channels aligned to C (B, C, *S1_t).
            teacher_deep: teacher deep tap, channels aligned to C (B, C, *S2_t).

        Returns:
            scalar loss.
        """
        teacher_shallow, teacher_deep = teacher_shallow.detach(), teacher_deep.detach()
        taps = {
            "student_shallow": student_shallow,
            "student_deep": student_deep,
            "teacher_shallow": teacher_shallow,
            "teacher_deep": teacher_deep,
        }
        _same_dims(**taps)
        if len({x.shape[1] for x in taps.values()}) != 1:
            channels = {name: x.shape[1] for name, x in taps.items()}
            raise ValueError(
                f"GraphFlowLoss needs the same channel count in all four taps (vertices are channels), got {channels}; "
                "align them upstream with paraphraser encoders (teacher) and translators (student)"
            )
        size = self.grid if self.descriptor == "pooled" else self.patch_size
        grid = clip_grid(size, *(x.shape[2:] for x in taps.values()))
        with autocast_off(student_shallow):
            v = {name: self.vertices(x, grid) for name, x in taps.items()}
            e = {name: x @ x.transpose(1, 2) for name, x in v.items()}
            dv_s = v["student_deep"] - v["student_shallow"]
            dv_t = v["teacher_deep"] - v["teacher_shallow"]
            de_s = e["student_deep"] - e["student_shallow"]
            de_t = e["teacher_deep"] - e["teacher_shallow"]
            vertex_term = (dv_t - dv_s).pow(2).sum(dim=2).mean()
            edge_term = (de_t - de_s).pow(2).mean()
            return self.vertex_weight * vertex_term + self.edge_weight * edge_term


def channel_cosine(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Cosine over channels at every position: ``Σ_c a_c b_c / max(‖a‖ ‖b‖, eps)``, (B, C, *S) → (B, *S).

    The value of ``F.cosine_similarity(a, b, dim=1, eps=eps)`` from three channel reductions; its autograd graph is
    a few element-wise products, 3–5× cheaper forward and backward on CPU for feature maps of a few channels.
    """
    norms = (a.square().sum(1) * b.square().sum(1)).clamp_min(eps * eps).sqrt()
    return (a * b).sum(1) / norms


class FeatureSimilarityDistillationLoss(nn.Module):
    """LightVessel feature similarity distillation (FSD): match the encoder→decoder similarity map of a skip pair.

    Formulation used here, for an encoder feature E and a decoder feature D at the same resolution (one symmetric
    pair of a U-shaped network; use one loss instance per pair):

    - ``"cosine"`` (default): per position, the cosine over channels between E and D, a map (B, *S). If the student
      map's spatial size differs from the teacher's, it is resized (bi/trilinearly) to the teacher's size.
    - ``"affinity"``: E and D are pooled to a common grid g (per dim ``min(grid, smallest size of the four
      features)``), each position's channel vector is L2-normalised, and the map is the cross affinity
      ``Êᵀ D̂`` (B, |g|, |g|) between encoder and decoder positions.

    The loss is ``mean((M_T - M_S)²)``. Both forms contract E and D over channels, so within each network E and D
    need the same channel count — otherwise project them to a common width first (a 1×1 conv adapter per feature,
    trained with the student; e.g. :class:`FitNetLoss`'s adapter or :class:`kd_components.modules.Translator`);
    student and teacher widths may differ. The loss is unchanged by a per-position positive scaling of any
    feature (at grid resolution for ``"affinity"``). The paper's exact form is not public.

    Paper defaults: not published; weight 1 is a reasonable start since the map entries are cosines.

    Args:
        mode: ``"cosine"`` or ``"affinity"``.
        grid: pooling grid per spatial dim for ``"affinity"`` (int or one per dim).
        eps: floor of the norms.

    Reference:
        "LightVessel: Exploring Lightweight Coronary Artery Vessel Segmentation via Similarity Knowledge
        Distillation", 2022 (its FSD module; ASD is an adversarial term, see ``adversarial.py``).
    """

    def __init__(self, mode: str = "cosine", grid: int | Sequence[int] = 16, eps: float = 1e-8) -> None:
        super().__init__()
        if mode not in ("cosine", "affinity"):
            raise ValueError(f"mode must be 'cosine' or 'affinity', got {mode!r}")
        self.mode = mode
        self.grid = grid
        self.eps = eps

    def similarity_map(self, encoder: torch.Tensor, decoder: torch.Tensor, grid: Sequence[int] | None = None):
        """The similarity map of one network: (B, 1, *S) for ``"cosine"``, (B, |g|, |g|) for ``"affinity"``."""
        if encoder.shape[1] != decoder.shape[1]:
            raise ValueError(
                f"encoder ({encoder.shape[1]}) and decoder ({decoder.shape[1]}) channels differ: project both to a "
                "common width with 1×1 conv adapters before FeatureSimilarityDistillationLoss"
            )
        if self.mode == "cosine":
            if encoder.shape[2:] != decoder.shape[2:]:
                raise ValueError(f"encoder {tuple(encoder.shape)} and decoder {tuple(decoder.shape)} sizes differ")
            return channel_cosine(encoder.float(), decoder.float(), self.eps).unsqueeze(1)
        e = _position_normalised(adaptive_pool(encoder.float(), grid, "avg"), self.eps)
        d = _position_normalised(adaptive_pool(decoder.float(), grid, "avg"), self.eps)
        return e.transpose(1, 2) @ d

    def forward(
        self,
        student_encoder: torch.Tensor,
        student_decoder: torch.Tensor,
        teacher_encoder: torch.Tensor,
        teacher_decoder: torch.Tensor,
    ) -> torch.Tensor:
        """
        Args:
            student_encoder: student encoder feature (B, C_s, *S_s).
            student_decoder: student decoder feature at the same resolution (B, C_s, *S_s).
            teacher_encoder: teacher encoder feature (B, C_t, *S_t).
            teacher_decoder: teacher decoder feature (B, C_t, *S_t).

        Returns:
            scalar loss.
        """
        teacher_encoder, teacher_decoder = teacher_encoder.detach(), teacher_decoder.detach()
        taps = [student_encoder, student_decoder, teacher_encoder, teacher_decoder]
        _same_dims(
            student_encoder=student_encoder,
            student_decoder=student_decoder,
            teacher_encoder=teacher_encoder,
            teacher_decoder=teacher_decoder,
        )
        grid = clip_grid(self.grid, *(x.shape[2:] for x in taps)) if self.mode == "affinity" else None
        with autocast_off(student_encoder):
            m_s = self.similarity_map(student_encoder, student_decoder, grid)
            m_t = self.similarity_map(teacher_encoder, teacher_decoder, grid)
            if self.mode == "cosine":
                m_s = match_spatial_size(m_s, m_t.shape[2:])
            return (m_t - m_s).pow(2).mean()
