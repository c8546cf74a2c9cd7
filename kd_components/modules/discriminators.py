"""N-D discriminators for adversarial distillation: SAGAN-style (global score) and PatchGAN-style (score map)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers import Act, Conv, Norm
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

__all__ = ["PatchDiscriminator", "SelfAttentionBlock", "SelfAttentionDiscriminator"]


def _maybe_sn(module: nn.Module, enabled: bool) -> nn.Module:
    return _spectral_norm(module) if enabled else module


def _smallest_input(kernel_size: int, strides: Sequence[int], padding: int = 1) -> int:
    """Smallest input size n for which convolutions (``kernel_size``, ``padding``, each stride in turn) all run.

    A convolution's output ``(n + 2·padding − kernel_size) // stride + 1`` is at least ``m ≥ 1`` exactly when
    ``n ≥ (m − 1)·stride + kernel_size − 2·padding``, so the need is carried back from one output element.
    """
    need = 1
    for stride in reversed(strides):
        need = max(1, (need - 1) * stride + kernel_size - 2 * padding)
    return need


def _max_pool(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Max-pool every spatial axis of ``x`` (B, C, *S) by ``factor``; an axis shorter than ``factor`` is pooled by its
    own length, a leftover at the end of an axis forms a smaller window (ceil mode), so nothing is dropped."""
    if factor == 1:
        return x
    kernel = [min(factor, n) for n in x.shape[2:]]
    pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[x.ndim - 3]
    return pool(x, kernel_size=kernel, stride=kernel, ceil_mode=True)


class SelfAttentionBlock(nn.Module):
    """SAGAN self-attention over the spatial positions of an N-D feature, with a learned residual gate.

    ``out = x + γ · W_o V softmax(QᵀK)ᵀ``: Q, K (C/r channels) and V (C/v channels) are 1×1(×1) convolutions of x;
    every position queries, the keys and values are max-pooled by ``key_pool`` per axis first (N/key_pool^d of
    them); ``W_o`` is a 1×1 convolution back to C channels when v > 1 (absent when v = 1); γ is a learned scalar
    initialised to 0 (the block starts as the identity). The SAGAN authors' code (``sn_non_local_block_sim``) uses
    ``key_pool=2, value_reduction=2``: 4× fewer keys in 2D, half-width values, ≈ 8× less attention arithmetic. The
    defaults (1, 1) are the paper's equations as written, full-resolution keys. Memory is O(B·N²/key_pool^d) for
    N positions: place it on coarse feature maps, especially in 3D. Computed with explicit matrix products (not fused
    attention kernels) so that second derivatives exist, as WGAN-GP needs.

    Args:
        spatial_dims: 1, 2 or 3.
        channels: input and output channels C.
        reduction: r, the channel reduction of the query and key projections.
        spectral_norm: wrap the projections in spectral normalisation.
        key_pool: max-pool factor per spatial axis of the keys and values (an axis shorter than it is pooled whole).
        value_reduction: v, the channel reduction of the values; v > 1 adds the output projection ``W_o``.

    Reference:
        Zhang et al., "Self-Attention Generative Adversarial Networks", ICML 2019 (and the authors' TensorFlow code).
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: int,
        reduction: int = 8,
        spectral_norm: bool = True,
        key_pool: int = 1,
        value_reduction: int = 1,
    ) -> None:
        super().__init__()
        if key_pool < 1 or value_reduction < 1:
            raise ValueError(f"key_pool and value_reduction must be >= 1, got {key_pool} and {value_reduction}")
        conv = Conv[Conv.CONV, spatial_dims]
        inner = max(1, channels // reduction)
        values = max(1, channels // value_reduction)
        self.key_pool = key_pool
        self.query = _maybe_sn(conv(channels, inner, kernel_size=1), spectral_norm)
        self.key = _maybe_sn(conv(channels, inner, kernel_size=1), spectral_norm)
        self.value = _maybe_sn(conv(channels, values, kernel_size=1), spectral_norm)
        self.output: nn.Module = (
            _maybe_sn(conv(values, channels, kernel_size=1), spectral_norm) if value_reduction > 1 else nn.Identity()
        )
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) → (B, C, *S)."""
        q = self.query(x).flatten(2)  # (B, C', N)
        k = _max_pool(self.key(x), self.key_pool).flatten(2)  # (B, C', M), M = N / key_pool^d
        v = _max_pool(self.value(x), self.key_pool).flatten(2)  # (B, C/v, M)
        attention = torch.softmax(q.transpose(1, 2) @ k, dim=-1)  # (B, N query, M key)
        out = (v @ attention.transpose(1, 2)).view(x.shape[0], -1, *x.shape[2:])  # (B, C/v, *S)
        return x + self.gamma * self.output(out)


class SelfAttentionDiscriminator(nn.Module):
    """SAGAN-style N-D discriminator with one global score per sample (Graph Flow / Structured KD holistic term).

    Strided spectral-norm convolutions (kernel 3, stride 2, padding 1, LeakyReLU 0.1) double the width at each
    block; self-attention blocks follow the blocks listed in ``attention_blocks``; a global average pool and a
    spectral-norm linear layer give the score. Optional ``tanh`` pre-processing squashes unbounded inputs such as
    logits (Graph Flow's choice). Kernel 3 (instead of SAGAN's 4) and global pooling (instead of a final 4×4 conv)
    make it work for any input size, thin or one-slice volumes included.

    Args:
        spatial_dims: 1, 2 or 3.
        in_channels: input channels (e.g. the number of classes, plus image channels for a conditional critic).
        channels: widths of the downsampling blocks.
        attention_blocks: indices of the blocks followed by self-attention (SAGAN: the last two).
        tanh_inputs: apply ``tanh`` to the input first.
        negative_slope: LeakyReLU slope.
        attention_key_pool: :class:`SelfAttentionBlock`'s ``key_pool`` (the SAGAN authors' code: 2).
        attention_value_reduction: :class:`SelfAttentionBlock`'s ``value_reduction`` (the SAGAN authors' code: 2).

    Shapes:
        input (B, in_channels, *S) → output (B, 1).

    Reference:
        Zhang et al., "Self-Attention Generative Adversarial Networks", ICML 2019; Zou et al., Graph Flow, TMI 2023.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        channels: Sequence[int] = (64, 128, 256, 512),
        attention_blocks: Sequence[int] = (2, 3),
        tanh_inputs: bool = False,
        negative_slope: float = 0.1,
        attention_key_pool: int = 1,
        attention_value_reduction: int = 1,
    ) -> None:
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims]
        n = len(channels)
        wanted = {i % n for i in attention_blocks}
        self.preprocess: nn.Module = nn.Tanh() if tanh_inputs else nn.Identity()
        layers: list[nn.Module] = []
        width = in_channels
        for i, out in enumerate(channels):
            layers += [
                _spectral_norm(conv(width, out, kernel_size=3, stride=2, padding=1)),
                Act[Act.LEAKYRELU](negative_slope=negative_slope),
            ]
            if i in wanted:
                layers.append(
                    SelfAttentionBlock(
                        spatial_dims, out, key_pool=attention_key_pool, value_reduction=attention_value_reduction
                    )
                )
            width = out
        self.features = nn.Sequential(*layers)
        self.head = _spectral_norm(nn.Linear(width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, *S) → (B, 1) scores."""
        h = self.features(self.preprocess(x))
        return self.head(h.flatten(2).mean(dim=2))


class PatchDiscriminator(nn.Module):
    """PatchGAN-style N-D discriminator: a map of scores, one per receptive-field patch.

    ``num_layers`` strided convolutions (kernel ``kernel_size``, stride 2, padding 1) doubling the width up to 8×
    ``channels``, one stride-1 convolution, then a stride-1 convolution to one channel; LeakyReLU(0.2) between
    them. Spectral normalisation on every convolution (optional) and an optional MONAI norm after all but the first
    and the last convolution (pix2pix uses batch/instance norm without spectral norm).

    Args:
        spatial_dims: 1, 2 or 3.
        in_channels: input channels.
        channels: width of the first convolution.
        num_layers: number of stride-2 convolutions (pix2pix: 3, a 70×70 receptive field in 2D).
        kernel_size: convolution kernel size (pix2pix: 4; use 3 for thin inputs).
        spectral_norm: wrap every convolution in spectral normalisation.
        norm: optional MONAI norm name (e.g. ``"instance"``, ``"batch"``).
        negative_slope: LeakyReLU slope.

    Shapes:
        input (B, in_channels, *S) → output (B, 1, *S') with S' ≈ S / 2**num_layers.

    Reference:
        Isola et al., "Image-to-Image Translation with Conditional Adversarial Networks", CVPR 2017.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        channels: int = 64,
        num_layers: int = 3,
        kernel_size: int = 4,
        spectral_norm: bool = True,
        norm: str | None = None,
        negative_slope: float = 0.2,
    ) -> None:
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims]
        widths = [in_channels] + [channels * min(2**i, 8) for i in range(num_layers + 1)]
        strides = [2] * num_layers + [1]
        layers: list[nn.Module] = []
        for i, stride in enumerate(strides):
            layers.append(
                _maybe_sn(conv(widths[i], widths[i + 1], kernel_size, stride=stride, padding=1), spectral_norm)
            )
            if norm is not None and i > 0:
                layers.append(Norm[norm, spatial_dims](widths[i + 1]))
            layers.append(Act[Act.LEAKYRELU](negative_slope=negative_slope))
        layers.append(_maybe_sn(conv(widths[-1], 1, kernel_size, stride=1, padding=1), spectral_norm))
        self.model = nn.Sequential(*layers)
        self.min_input_size = _smallest_input(kernel_size, [*strides, 1])
        """The smallest size per axis that leaves every convolution an input at least as large as its kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, *S) → (B, 1, *S') score map."""
        return self.model(x)
