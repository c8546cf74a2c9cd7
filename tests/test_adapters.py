"""Tests of kd_components.adapters: FeatureAdapter (channels by 1×1 conv, size by interpolation) and resizing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kd_components.adapters import FeatureAdapter, match_spatial_size


def conv1x1_by_einsum(adapter: FeatureAdapter, x: torch.Tensor) -> torch.Tensor:
    """The adapter's channel mapping written out: out[b, o, ...] = sum_i W[o, i] x[b, i, ...] + bias[o]."""
    weight = adapter.proj.weight.reshape(adapter.proj.out_channels, adapter.proj.in_channels)
    out = torch.einsum("oi,bi...->bo...", weight, x)
    if adapter.proj.bias is not None:
        out = out + adapter.proj.bias.reshape(1, -1, *([1] * (x.dim() - 2)))
    return out


@pytest.mark.parametrize(
    "spatial_dims, student, teacher",
    [
        (2, (2, 4, 8, 8), (2, 16, 4, 4)),  # down-sizing
        (2, (2, 4, 4, 4), (2, 16, 8, 8)),  # up-sizing
        (2, (2, 4, 6, 6), (2, 3, 6, 6)),  # same size, fewer channels
        (2, (1, 4, 8, 4), (1, 6, 4, 8)),  # one axis down, the other up
        (3, (2, 4, 8, 8, 8), (2, 16, 4, 4, 4)),
        (3, (2, 4, 2, 2, 2), (2, 16, 4, 6, 4)),
    ],
)
def test_adapter_maps_student_shape_to_teacher_shape(spatial_dims, student, teacher):
    torch.manual_seed(0)
    adapter = FeatureAdapter(student[1], teacher[1], spatial_dims=spatial_dims)
    x = torch.randn(*student)
    out = adapter(x, teacher[2:])
    assert tuple(out.shape) == teacher
    # 1×1 conv and (bi/tri)linear interpolation commute, so the result is the channel map of the resized input
    interp = {2: "bilinear", 3: "trilinear"}[spatial_dims]
    expected = conv1x1_by_einsum(adapter, F.interpolate(x, size=teacher[2:], mode=interp, align_corners=False))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_channel_mapping_is_a_1x1_conv(spatial_dims):
    torch.manual_seed(0)
    adapter = FeatureAdapter(5, 7, spatial_dims=spatial_dims)
    x = torch.randn(3, 5, *([4] * spatial_dims))
    assert adapter.proj.kernel_size == (1,) * spatial_dims
    for size in (None, x.shape[2:]):
        out = adapter(x, size)
        assert tuple(out.shape) == (3, 7, *x.shape[2:])
        torch.testing.assert_close(out, conv1x1_by_einsum(adapter, x), rtol=1e-5, atol=1e-5)


def test_adapter_without_bias_is_linear():
    torch.manual_seed(0)
    adapter = FeatureAdapter(4, 6, bias=False)
    assert adapter.proj.bias is None
    x, y = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(adapter(2 * x + y, (4, 4)), 2 * adapter(x, (4, 4)) + adapter(y, (4, 4)))


def test_adapter_is_trainable_and_passes_gradient():
    adapter = FeatureAdapter(4, 8)
    x = torch.randn(2, 4, 4, 4, requires_grad=True)
    adapter(x, (8, 8)).square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())


def test_nearest_mode_copies_values():
    adapter = FeatureAdapter(1, 1, mode="nearest", bias=False)
    with torch.no_grad():
        adapter.proj.weight.fill_(1.0)
    x = torch.arange(4.0).reshape(1, 1, 2, 2)
    out = adapter(x, (4, 4))
    assert set(out.unique().tolist()) == {0.0, 1.0, 2.0, 3.0}
    torch.testing.assert_close(out, x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))


@pytest.mark.parametrize("spatial_dims, shape", [(2, (1, 4, 8, 8, 8)), (3, (1, 4, 8, 8)), (2, (4, 8))])
def test_wrong_dimensionality_errors_clearly(spatial_dims, shape):
    adapter = FeatureAdapter(4, 8, spatial_dims=spatial_dims)
    with pytest.raises(ValueError, match=rf"built for {spatial_dims}D features got a tensor of shape"):
        adapter(torch.randn(*shape))


def test_match_spatial_size_is_a_noop_when_sizes_match():
    x = torch.randn(2, 3, 5, 7)
    assert match_spatial_size(x, (5, 7)) is x
    assert match_spatial_size(x, torch.Size([5, 7])) is x


def test_match_spatial_size_resizes_2d_and_3d():
    constant = torch.full((1, 2, 4, 4, 4), 3.0)
    out = match_spatial_size(constant, (8, 2, 6))
    assert tuple(out.shape) == (1, 2, 8, 2, 6)
    torch.testing.assert_close(out, torch.full_like(out, 3.0))  # interpolation weights sum to one
    x = torch.randn(1, 2, 8, 8)
    torch.testing.assert_close(match_spatial_size(x, (4, 4)), F.interpolate(x, size=(4, 4), mode="bilinear"))


def test_match_spatial_size_rejects_wrong_number_of_dims():
    with pytest.raises(ValueError, match="cannot resize a tensor of shape"):
        match_spatial_size(torch.randn(1, 2, 4, 4), (4, 4, 4))
