"""Paraphraser and Translator of Factor Transfer, N-D (used by CoCo DistillNet and Graph Flow)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn

__all__ = ["Paraphraser", "Translator"]


def _encoder(
    spatial_dims: int, in_channels: int, factor_channels: int, negative_slope: float, norm: str | tuple | None
) -> nn.Sequential:
    """Three 3×3(×3) convolutions with LeakyReLU, ``in → in → factor → factor`` channels, size preserving."""
    act = ("leakyrelu", {"negative_slope": negative_slope})
    widths = [in_channels, in_channels, factor_channels, factor_channels]
    return nn.Sequential(
        *(
            Convolution(spatial_dims, c_in, c_out, kernel_size=3, act=act, norm=norm)
            for c_in, c_out in zip(widths[:-1], widths[1:], strict=True)
        )
    )


class Paraphraser(nn.Module):
    """Factor Transfer paraphraser: a convolutional auto-encoder of a (frozen) teacher feature.

    The encoder is three 3×3(×3) convolutions with LeakyReLU(0.1), ``C → C → K → K`` channels, producing the
    "factor"; the decoder is three 3×3(×3) transposed convolutions ``K → K → C → C`` back to the feature. Spatial
    size is preserved throughout. It is pre-trained *unsupervised* on the frozen teacher's feature with
    :meth:`reconstruction_loss` (L2), then frozen (:meth:`freeze`); at distillation time only :meth:`encode` is used,
    to produce the teacher factor that a student :class:`Translator` must match.

    Formulation used here: the last decoder layer has no activation (the teacher feature may be negative, e.g.
    before a ReLU), the others LeakyReLU like the encoder; no normalisation by default (``norm`` adds it to every
    layer but the last).

    Paper defaults: K = k·C with paraphrase rate k = 0.5; trained 10 epochs with L2 reconstruction (CIFAR).
    Graph Flow / CoCo compress the teacher tap to the student's width, i.e. ``factor_channels`` = student channels.

    Args:
        spatial_dims: 1, 2 or 3.
        in_channels: teacher feature channels C.
        factor_channels: factor channels K; default ``max(1, round(rate · C))``.
        rate: paraphrase rate k, used when ``factor_channels`` is not given.
        negative_slope: LeakyReLU slope.
        norm: optional MONAI norm spec (e.g. ``"batch"``, ``"instance"``) after each conv but the last.

    Reference:
        Kim et al., "Paraphrasing Complex Network: Network Compression via Factor Transfer", NeurIPS 2018.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        factor_channels: int | None = None,
        rate: float = 0.5,
        negative_slope: float = 0.1,
        norm: str | tuple | None = None,
    ) -> None:
        super().__init__()
        self.factor_channels = factor_channels if factor_channels is not None else max(1, round(rate * in_channels))
        k = self.factor_channels
        act = ("leakyrelu", {"negative_slope": negative_slope})
        self.encoder = _encoder(spatial_dims, in_channels, k, negative_slope, norm)
        self.decoder = nn.Sequential(
            Convolution(spatial_dims, k, k, kernel_size=3, act=act, norm=norm, is_transposed=True),
            Convolution(spatial_dims, k, in_channels, kernel_size=3, act=act, norm=norm, is_transposed=True),
            Convolution(spatial_dims, in_channels, in_channels, kernel_size=3, is_transposed=True, conv_only=True),
        )

    def encode(self, feature: torch.Tensor) -> torch.Tensor:
        """Factor (B, K, *S) of a teacher feature (B, C, *S)."""
        return self.encoder(feature)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        """Reconstruction (B, C, *S) of a teacher feature (B, C, *S)."""
        return self.decoder(self.encoder(feature))

    def reconstruction_loss(self, feature: torch.Tensor) -> torch.Tensor:
        """L2 reconstruction loss ``mean((P(F) - F)²)`` of a (detached) teacher feature (B, C, *S), float32."""
        feature = feature.detach()
        return F.mse_loss(self(feature).float(), feature.float())

    def freeze(self) -> Paraphraser:
        """Stop gradients to every parameter and switch to eval mode, for use as a fixed teacher-side encoder."""
        for param in self.parameters():
            param.requires_grad_(False)
        return self.eval()


class Translator(nn.Module):
    """Factor Transfer translator: the student-side encoder mapping a student feature to a factor.

    Same shape as the :class:`Paraphraser` encoder — three 3×3(×3) convolutions with LeakyReLU(0.1),
    ``C_s → C_s → K → K`` — trained jointly with the student; its output is matched to the teacher paraphraser's
    factor (e.g. :class:`kd_components.losses.FactorTransferLoss`, or the CoCo / Graph Flow losses).

    Args:
        spatial_dims: 1, 2 or 3.
        in_channels: student feature channels C_s.
        factor_channels: factor channels K (the paraphraser's).
        negative_slope: LeakyReLU slope.
        norm: optional MONAI norm spec after each conv.

    Reference:
        Kim et al., "Paraphrasing Complex Network: Network Compression via Factor Transfer", NeurIPS 2018.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        factor_channels: int,
        negative_slope: float = 0.1,
        norm: str | tuple | None = None,
    ) -> None:
        super().__init__()
        self.factor_channels = factor_channels
        self.encoder = _encoder(spatial_dims, in_channels, factor_channels, negative_slope, norm)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        """Factor (B, K, *S) of a student feature (B, C_s, *S)."""
        return self.encoder(feature)
