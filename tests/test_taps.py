"""Tests of kd_components.taps: recording named submodule outputs, name resolution and tap listing."""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.distributed as dist
from monai.networks.nets import UNet
from torch import nn

from kd_components.taps import FeatureTaps, TapNotFoundError, list_tap_candidates, resolve_module, unwrap_network


def unet_2d() -> UNet:
    torch.manual_seed(0)
    return UNet(2, 3, 2, (4, 8, 16), (2, 2), num_res_units=1)


def unet_3d() -> UNet:
    torch.manual_seed(0)
    return UNet(3, 1, 2, (4, 8, 16), (2, 2), num_res_units=1)


class TupleNet(nn.Module):
    """A network whose submodule returns a tuple (like deep-supervision heads) and one unused submodule."""

    class Pair(nn.Module):
        def forward(self, x):
            return x * 2, x * 3

    def __init__(self) -> None:
        super().__init__()
        self.pair = self.Pair()
        self.conv = nn.Conv2d(1, 2, 1)
        self.unused = nn.Conv2d(1, 5, 1)

    def forward(self, x):
        first, _ = self.pair(x)
        return self.conv(first)


def manual_shapes(net: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """Output shapes of every named submodule, recorded with hooks written independently of FeatureTaps."""
    shapes, handles = {}, []
    for name, module in net.named_modules():
        if name:

            def hook(_m, _i, out, name=name):
                out = out[0] if isinstance(out, (tuple, list)) else out
                shapes[name] = tuple(out.shape)

            handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        net(x)
    for h in handles:
        h.remove()
    return shapes


@pytest.fixture
def process_group(tmp_path):
    """A one-process gloo group, destroyed after the test."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_taps_record_named_outputs_equal_to_recomputation():
    net = unet_2d().eval()
    x = torch.randn(2, 3, 16, 16)
    taps = FeatureTaps(net, ["model.0", "model.1.submodule.0"])
    with torch.no_grad():
        y = net(x)
        first = net.model[0](x)  # the first down block recomputed by hand
        deeper = net.model[1].submodule[0](first)
    assert set(taps.outputs) == {"model.0", "model.1.submodule.0"}
    torch.testing.assert_close(taps["model.0"], first)
    torch.testing.assert_close(taps["model.1.submodule.0"], deeper)
    assert tuple(taps["model.1.submodule.0"].shape) == (2, 8, 4, 4)
    assert tuple(y.shape) == (2, 2, 16, 16)


def test_taps_keep_autograd_graph_when_training():
    net = unet_2d()
    taps = FeatureTaps(net, ["model.1.submodule.0"])
    net(torch.randn(1, 3, 16, 16))
    feature = taps["model.1.submodule.0"]
    assert feature.requires_grad
    feature.sum().backward()
    assert net.model[0].conv.unit0.conv.weight.grad is not None


def test_duplicate_names_are_registered_once():
    net = unet_2d()
    taps = FeatureTaps(net, ["model.0", "model.0", "model.2"])
    assert taps.names == ("model.0", "model.2")
    assert len(net.model[0]._forward_hooks) == 1


def test_module_prefix_is_accepted():
    net = unet_2d().eval()
    x = torch.randn(1, 3, 16, 16)
    plain = FeatureTaps(net, ["model.1.submodule"])
    prefixed = FeatureTaps(net, ["module.model.1.submodule"])
    with torch.no_grad():
        net(x)
    assert resolve_module(net, "module.model.1.submodule") is net.model[1].submodule
    torch.testing.assert_close(prefixed["module.model.1.submodule"], plain["model.1.submodule"])


def test_taps_work_identically_through_ddp(process_group):
    net = unet_2d().eval()
    ddp = nn.parallel.DistributedDataParallel(net, device_ids=None)
    assert unwrap_network(ddp) is net
    x = torch.randn(2, 3, 16, 16)
    names = ["model.0", "model.1.submodule.0"]
    on_plain = FeatureTaps(net, names)
    on_ddp = FeatureTaps(ddp, names)
    on_ddp_prefixed = FeatureTaps(ddp, [f"module.{n}" for n in names])
    with torch.no_grad():
        ddp(x)
    for name in names:
        assert name in on_ddp and f"module.{name}" in on_ddp_prefixed
        torch.testing.assert_close(on_ddp[name], on_plain[name])
        torch.testing.assert_close(on_ddp_prefixed[f"module.{name}"], on_plain[name])
    for taps in (on_plain, on_ddp, on_ddp_prefixed):
        taps.remove()


def test_unknown_name_lists_close_names_and_list_taps():
    net = unet_2d()
    with pytest.raises(TapNotFoundError) as info:
        FeatureTaps(net, ["model.1.submodle"], owner="teacher")
    message = str(info.value)
    assert "'model.1.submodule'" in message
    assert "kd_components.list_taps" in message
    assert "teacher" in message and "UNet" in message
    assert isinstance(info.value, KeyError)


def test_empty_name_is_not_the_network_itself():
    with pytest.raises(TapNotFoundError):
        resolve_module(unet_2d(), "")


def test_getitem_errors_distinguish_unrun_and_unregistered():
    net = unet_2d()
    taps = FeatureTaps(net, ["model.0"], owner="student")
    with pytest.raises(RuntimeError, match="not run since the last clear"):
        taps["model.0"]
    with pytest.raises(KeyError, match="not a registered student tap"):
        taps["model.2"]


def test_clear_releases_outputs():
    net = unet_2d().eval()
    taps = FeatureTaps(net, ["model.0"])
    with torch.no_grad():
        net(torch.randn(1, 3, 16, 16))
    ref = weakref.ref(taps["model.0"])
    assert ref() is not None
    taps.clear()  # no autograd graph holds the tensor, so reference counting frees it at once
    assert taps.outputs == {} and "model.0" not in taps
    assert ref() is None, "the tap still holds its tensor after clear()"


def test_remove_removes_hooks():
    net = unet_2d().eval()
    before = len(net.model[0]._forward_hooks)
    taps = FeatureTaps(net, ["model.0"])
    assert len(net.model[0]._forward_hooks) == before + 1
    taps.remove()
    assert len(net.model[0]._forward_hooks) == before
    with torch.no_grad():
        net(torch.randn(1, 3, 16, 16))
    assert taps.outputs == {}


def test_context_manager_removes_hooks():
    net = unet_2d().eval()
    with FeatureTaps(net, ["model.0"]) as taps, torch.no_grad():
        net(torch.randn(1, 3, 16, 16))
        assert "model.0" in taps
    assert len(net.model[0]._forward_hooks) == 0
    assert taps.outputs == {}


def test_tuple_outputs_take_first_element():
    net = TupleNet()
    x = torch.randn(1, 1, 4, 4)
    taps = FeatureTaps(net, ["pair"])
    net(x)
    torch.testing.assert_close(taps["pair"], x * 2)


@pytest.mark.parametrize(
    "make, shape, known",
    [
        (unet_2d, (1, 3, 16, 16), {"model.0": (1, 4, 8, 8), "model.1.submodule.0": (1, 8, 4, 4)}),
        (unet_3d, (1, 1, 8, 8, 8), {"model.0": (1, 4, 4, 4, 4), "model.1.submodule.0": (1, 8, 2, 2, 2)}),
    ],
)
def test_list_tap_candidates_match_real_forward(make, shape, known):
    net = make()
    rows = list_tap_candidates(net, shape)
    expected = manual_shapes(net, torch.zeros(*shape))
    modules = dict(net.named_modules())
    assert [r[0] for r in rows] == [n for n in modules if n]
    for name, type_name, out_shape in rows:
        assert type_name == type(modules[name]).__name__
        assert out_shape == expected[name], name
    found = {name: out_shape for name, _, out_shape in rows}
    for name, out_shape in known.items():
        assert found[name] == out_shape
    assert found["model"] == (1, 2, *shape[2:])
    assert all(len(m._forward_hooks) == 0 for m in net.modules()), "probe hooks left behind"


def test_list_tap_candidates_unused_module_is_none_and_tuple_first():
    rows = {name: out_shape for name, _, out_shape in list_tap_candidates(TupleNet(), (1, 1, 4, 4))}
    assert rows == {"pair": (1, 1, 4, 4), "conv": (1, 2, 4, 4), "unused": None}


def test_list_tap_candidates_restores_each_module_mode():
    net = unet_2d()
    net.train()
    net.model[0].eval()  # e.g. a frozen encoder block kept in eval mode
    before = {n: m.training for n, m in net.named_modules()}
    list_tap_candidates(net, (1, 3, 16, 16))
    assert {n: m.training for n, m in net.named_modules()} == before


def test_inactive_taps_record_nothing():
    """With ``active = False`` the hooks stay but keep no output; switching back on records again."""
    net = UNet(2, 3, 2, (4, 8, 16), (2, 2), num_res_units=1)
    taps = FeatureTaps(net, ["model.1.submodule"], active=False)
    net(torch.rand(1, 3, 16, 16))
    assert "model.1.submodule" not in taps
    taps.active = True
    net(torch.rand(1, 3, 16, 16))
    assert "model.1.submodule" in taps
    taps.remove()
