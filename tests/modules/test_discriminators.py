"""Tests of the N-D discriminators and the self-attention block."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from kd_components.modules import PatchDiscriminator, SelfAttentionBlock, SelfAttentionDiscriminator


def _weighted_layers(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]


@pytest.mark.parametrize("spatial", [(16,), (16, 12), (8, 8, 1), (8, 6, 4)])
def test_self_attention_discriminator_shapes(spatial: tuple[int, ...]) -> None:
    disc = SelfAttentionDiscriminator(len(spatial), 3, channels=(4, 8, 8), attention_blocks=(1, 2))
    assert disc(torch.randn(2, 3, *spatial)).shape == (2, 1)
    assert sum(isinstance(m, SelfAttentionBlock) for m in disc.modules()) == 2


@pytest.mark.parametrize(("spatial", "expected"), [((32,), (2,)), ((32, 24), (2, 1)), ((32, 32, 16), (2, 2, 0))])
def test_patch_discriminator_shapes(spatial: tuple[int, ...], expected: tuple[int, ...]) -> None:
    # kernel 4, padding 1: each stride-2 conv gives floor(n/2), each stride-1 conv n - 1 (pix2pix arithmetic)
    disc = PatchDiscriminator(len(spatial), 2, channels=4, num_layers=3)
    if 0 in expected:
        with pytest.raises(RuntimeError):
            disc(torch.randn(1, 2, *spatial))
        return
    assert disc(torch.randn(2, 2, *spatial)).shape == (2, 1, *expected)


def test_patch_discriminator_kernel3_keeps_thin_volumes() -> None:
    disc = PatchDiscriminator(3, 2, channels=4, num_layers=2, kernel_size=3, norm="instance")
    assert disc(torch.randn(2, 2, 16, 16, 1)).shape == (2, 1, 4, 4, 1)
    assert any(isinstance(m, nn.InstanceNorm3d) for m in disc.modules())


def test_spectral_norm_present() -> None:
    sa = SelfAttentionDiscriminator(2, 3, channels=(4, 8), attention_blocks=(1,))
    layers = _weighted_layers(sa)
    assert len(layers) == 2 + 3 + 1  # two convs, three attention projections, the linear head
    assert all(parametrize.is_parametrized(m, "weight") for m in layers)
    patch = PatchDiscriminator(2, 3, channels=4)
    assert all(parametrize.is_parametrized(m, "weight") for m in _weighted_layers(patch))
    plain = PatchDiscriminator(2, 3, channels=4, spectral_norm=False)
    assert not any(parametrize.is_parametrized(m, "weight") for m in _weighted_layers(plain))
    # spectral norm bounds the largest singular value of every weight matrix by ~1 after a few power iterations
    conv = _weighted_layers(patch)[1]
    for _ in range(20):
        patch(torch.randn(1, 3, 32, 32))
    sigma = torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2)
    assert abs(float(sigma) - 1.0) < 0.05


def test_self_attention_block() -> None:
    block = SelfAttentionBlock(2, 8, spectral_norm=False)
    x = torch.randn(2, 8, 5, 4)
    assert torch.equal(block(x), x)  # γ starts at 0: the identity
    with torch.no_grad():
        block.gamma.fill_(1.0)
    y = block(x)
    assert y.shape == x.shape and not torch.allclose(y, x)
    # no positional information: permuting the positions permutes the output the same way (N-D, flattened)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    x_perm = x.flatten(2)[..., perm].view_as(x)
    assert torch.allclose(block(x_perm).flatten(2), y.flatten(2)[..., perm], atol=1e-5)
    x3 = torch.randn(1, 8, 3, 2, 2)
    assert SelfAttentionBlock(3, 8)(x3).shape == x3.shape


def test_tanh_preprocessing() -> None:
    plain = SelfAttentionDiscriminator(2, 2, channels=(4, 8), attention_blocks=(1,)).eval()
    squashed = SelfAttentionDiscriminator(2, 2, channels=(4, 8), attention_blocks=(1,), tanh_inputs=True).eval()
    squashed.load_state_dict(plain.state_dict())
    x = 10 * torch.randn(2, 2, 8, 8)
    assert torch.allclose(squashed(x), plain(torch.tanh(x)), atol=1e-6)
    assert not torch.allclose(squashed(x), plain(x), atol=1e-3)


@pytest.mark.parametrize("kernel_size, num_layers, spatial_dims", [(4, 3, 2), (4, 2, 2), (3, 3, 2), (4, 1, 3)])
def test_patch_discriminator_min_input_size_is_the_smallest_that_runs(kernel_size, num_layers, spatial_dims) -> None:
    disc = PatchDiscriminator(spatial_dims, 2, channels=4, num_layers=num_layers, kernel_size=kernel_size)
    n = disc.min_input_size
    assert disc(torch.randn(1, 2, *[n] * spatial_dims)).numel() >= 1
    if n > 1:
        with pytest.raises(RuntimeError):
            disc(torch.randn(1, 2, *[n - 1] * spatial_dims))


@pytest.mark.parametrize("spatial", [(9,), (8, 6), (5, 4, 1), (4, 3, 2)])
def test_self_attention_with_pooled_keys_matches_the_sagan_code_by_hand(spatial: tuple[int, ...]) -> None:
    # the SAGAN authors' block: every position queries, keys and values max-pooled 2x per axis (an axis of 1 stays,
    # an odd axis keeps its last row in a smaller window), half-width values, a 1x1 output projection
    torch.manual_seed(0)
    block = SelfAttentionBlock(len(spatial), 8, spectral_norm=False, key_pool=2, value_reduction=2)
    x = torch.randn(2, 8, *spatial)
    assert torch.equal(block(x), x)  # γ starts at 0: the identity
    with torch.no_grad():
        block.gamma.fill_(0.7)
    pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[len(spatial) - 1]
    kernel = [min(2, n) for n in spatial]
    q = block.query(x).flatten(2)
    k = pool(block.key(x), kernel, kernel, ceil_mode=True).flatten(2)
    v = pool(block.value(x), kernel, kernel, ceil_mode=True).flatten(2)
    assert v.shape[1] == 4 and k.shape[2] == math.prod(-(-n // m) for n, m in zip(spatial, kernel))
    expected = x + 0.7 * block.output(
        (v @ torch.softmax(q.transpose(1, 2) @ k, -1).transpose(1, 2)).view(2, 4, *spatial)
    )
    assert torch.allclose(block(x), expected, atol=1e-6)


def test_pooled_attention_has_second_derivatives_and_the_default_keeps_its_parameters() -> None:
    disc = SelfAttentionDiscriminator(
        2, 2, channels=(4, 8), attention_blocks=(0, 1), attention_key_pool=2, attention_value_reduction=2
    )
    with torch.no_grad():
        for block in [m for m in disc.modules() if isinstance(m, SelfAttentionBlock)]:
            block.gamma.fill_(1.0)
    x = torch.randn(2, 2, 16, 12, requires_grad=True)
    (grad,) = torch.autograd.grad(disc(x).sum(), x, create_graph=True)
    grad.pow(2).sum().backward()  # the WGAN-GP penalty's double backward
    block = next(m for m in disc.modules() if isinstance(m, SelfAttentionBlock))
    for projection in (block.key, block.output):  # spectral norm: the trained tensor is the parametrization's original
        assert projection.parametrizations.weight.original.grad.abs().sum() > 0
    assert len(_weighted_layers(disc)) == 2 + 2 * 4 + 1 and all(
        parametrize.is_parametrized(m, "weight") for m in _weighted_layers(disc)
    )
    # key_pool=1, value_reduction=1 is the block as before: same parameters, so earlier checkpoints still load
    assert sorted(SelfAttentionBlock(2, 8).state_dict()) == sorted(
        k for k in SelfAttentionBlock(2, 8, key_pool=2).state_dict()
    )
    assert not any(k.startswith("output") for k in SelfAttentionBlock(2, 8).state_dict())
    with pytest.raises(ValueError, match="key_pool and value_reduction"):
        SelfAttentionBlock(2, 8, key_pool=0)
