"""Tests of the Factor Transfer paraphraser and translator."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kd_components.losses import FactorTransferLoss
from kd_components.modules import Paraphraser, Translator


@pytest.mark.parametrize("spatial", [(9,), (6, 7), (4, 5, 3)])
def test_shapes(spatial: tuple[int, ...]) -> None:
    nd = len(spatial)
    x = torch.randn(2, 8, *spatial)
    para = Paraphraser(nd, 8)
    assert para.factor_channels == 4  # rate 0.5
    assert para.encode(x).shape == (2, 4, *spatial)
    assert para(x).shape == x.shape
    assert Paraphraser(nd, 8, factor_channels=3).encode(x).shape == (2, 3, *spatial)
    trans = Translator(nd, 5, factor_channels=4)
    assert trans(torch.randn(2, 5, *spatial)).shape == (2, 4, *spatial)
    # encoder: three convs with LeakyReLU(0.1); decoder: three transposed convs, the last one linear
    acts = [m for m in para.encoder.modules() if isinstance(m, nn.LeakyReLU)]
    assert len(acts) == 3 and all(a.negative_slope == 0.1 for a in acts)
    transposed = [
        m for m in para.decoder.modules() if isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))
    ]
    assert len(transposed) == 3
    assert len([m for m in para.decoder.modules() if isinstance(m, nn.LeakyReLU)]) == 2


def test_reconstruction_training_reduces_error() -> None:
    torch.manual_seed(0)
    para = Paraphraser(2, 8)
    # a structured "teacher feature": smooth maps with some negative values
    grid = torch.linspace(-1, 1, 8)
    base = torch.stack([torch.sin(3 * grid[:, None] * (c + 1) / 4 + grid[None, :] * c) for c in range(8)])
    feature = (base.unsqueeze(0) * torch.rand(4, 8, 1, 1)).requires_grad_(True)
    optimizer = torch.optim.Adam(para.parameters(), lr=1e-2)
    initial = float(para.reconstruction_loss(feature).detach())
    for _ in range(40):
        optimizer.zero_grad()
        loss = para.reconstruction_loss(feature)
        loss.backward()
        optimizer.step()
    final = float(para.reconstruction_loss(feature).detach())
    assert final < 0.5 * initial, (initial, final)
    assert feature.grad is None  # the teacher feature is detached


def test_freeze_and_translator_matches_frozen_factor() -> None:
    torch.manual_seed(0)
    para = Paraphraser(2, 6, factor_channels=4).freeze()
    assert not para.training and not any(p.requires_grad for p in para.parameters())
    teacher, student = torch.randn(2, 6, 6, 6), torch.randn(2, 3, 6, 6)
    trans = Translator(2, 3, factor_channels=4)
    ft = FactorTransferLoss()
    optimizer = torch.optim.Adam(trans.parameters(), lr=1e-2)
    values = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = ft(trans(student), para.encode(teacher))
        loss.backward()
        optimizer.step()
        values.append(float(loss.detach()))
    assert values[-1] < 0.8 * values[0], values
    assert all(p.grad is None for p in para.parameters())
