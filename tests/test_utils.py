"""Tests of kd_components.utils: teacher loading, freezing, parameter counts, backups and DDP wrapping."""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist
from monai.networks.nets import UNet
from torch import nn

from kd_components import utils
from kd_components.utils import (
    backup_existing,
    count_parameters,
    freeze,
    load_state_dict_file,
    load_teacher,
    require_file,
    wrap_ddp_if_trainable,
)


def teacher_net(res_units: int = 1) -> UNet:
    return UNet(2, 3, 2, (8, 16, 32), (2, 2), num_res_units=res_units)


@pytest.fixture
def trained(tmp_path):
    """A 'trained' teacher's state (random weights, with a seed) saved as a plain state dict."""
    torch.manual_seed(0)
    state = teacher_net().state_dict()
    path = tmp_path / "teacher.pt"
    torch.save(state, path)
    return path, state


def assert_loaded(network: nn.Module, state: dict) -> None:
    own = network.state_dict()
    assert own.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(own[key], value), key


def assert_frozen(network: nn.Module) -> None:
    assert not any(m.training for m in network.modules())
    assert not any(p.requires_grad for p in network.parameters())


def test_load_teacher_loads_strictly_and_freezes(trained):
    path, state = trained
    torch.manual_seed(1)
    network = teacher_net()
    assert not torch.equal(
        network.state_dict()["model.0.conv.unit0.conv.weight"], state["model.0.conv.unit0.conv.weight"]
    )
    result = load_teacher(network, path, device="cpu")
    assert result is network
    assert_loaded(result, state)
    assert_frozen(result)


def test_load_teacher_moves_to_device(trained):
    path, _ = trained
    result = load_teacher(teacher_net(), path, device="meta")  # any device other than the CPU the file holds
    assert {p.device.type for p in result.parameters()} == {"meta"}
    assert_frozen(result)


def test_load_teacher_missing_file_gives_the_hint(tmp_path):
    missing = tmp_path / "models" / "teacher.pt"
    with pytest.raises(FileNotFoundError) as info:
        load_teacher(teacher_net(), missing, hint="run `python -m monai.bundle run --config_file teacher.json`")
    message = str(info.value)
    assert str(missing) in message
    assert "To fix: run `python -m monai.bundle run --config_file teacher.json`" in message
    with pytest.raises(FileNotFoundError, match="train the teacher first"):
        load_teacher(teacher_net(), missing)


def test_load_teacher_rejects_another_architecture_listing_keys(tmp_path):
    path = tmp_path / "deeper.pt"
    torch.save(teacher_net(res_units=2).state_dict(), path)
    with pytest.raises(ValueError) as info:
        load_teacher(teacher_net(res_units=1), path)
    message = str(info.value)
    assert str(path) in message and "does not fit UNet" in message
    assert "unexpected keys ['model.0.conv.unit1." in message
    assert "make `teacher_def` the network" in message

    torch.save(teacher_net(res_units=1).state_dict(), path)
    with pytest.raises(ValueError, match=r"missing keys \['model.0.conv.unit1."):
        load_teacher(teacher_net(res_units=2), path)


def test_load_teacher_rejects_wrong_shapes(tmp_path):
    path = tmp_path / "wider.pt"
    torch.save(UNet(2, 3, 2, (16, 32, 64), (2, 2), num_res_units=1).state_dict(), path)
    with pytest.raises(ValueError, match=r"shape mismatches \['model.0.conv.unit0.conv.weight \(16, 3, 3, 3\) vs"):
        load_teacher(teacher_net(), path)


def test_module_prefix_is_stripped(trained, tmp_path):
    _, state = trained
    path = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)
    assert set(load_state_dict_file(path)) == set(state)
    assert_loaded(load_teacher(teacher_net(), path), state)


def test_checkpoint_with_model_entry_is_accepted(trained, tmp_path):
    _, state = trained
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "epoch": 3}, path)
    assert_loaded(load_teacher(teacher_net(), path), state)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"definitely not a checkpoint", "could not be read as weights"),
        (None, "holds a list, not a state dict"),
    ],
)
def test_unreadable_file_raises_naming_it(tmp_path, content, message):
    path = tmp_path / "broken.pt"
    if content is None:
        torch.save([1, 2, 3], path)
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        load_teacher(teacher_net(), path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_require_file(tmp_path):
    present = tmp_path / "data.json"
    present.write_text("{}")
    assert require_file(str(present), "datalist", "make it") == present
    with pytest.raises(FileNotFoundError, match=r"datalist not found: .*absent.json. To fix: run prepare_data."):
        require_file(tmp_path / "absent.json", "datalist", "run prepare_data")


def test_freeze_and_count_parameters():
    net = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    assert count_parameters(net) == count_parameters(net, trainable_only=True) == 3 * 4 + 4 + 4 * 2 + 2
    net[0].requires_grad_(False)
    assert count_parameters(net, trainable_only=True) == 4 * 2 + 2
    assert count_parameters(nn.DataParallel(net)) == 3 * 4 + 4 + 4 * 2 + 2  # through a wrapper
    assert freeze(net) is net
    assert_frozen(net)


def test_backup_copies_existing_file_with_timestamp(tmp_path):
    target = tmp_path / "models" / "model.pt"
    target.parent.mkdir()
    target.write_bytes(b"user's trained weights")
    moved = backup_existing(str(target))
    assert len(moved) == 1
    assert moved[0].parent == target.parent / "backup"
    assert re.fullmatch(r"model\.\d{8}-\d{6}\.pt", moved[0].name)
    assert moved[0].read_bytes() == b"user's trained weights"
    assert target.read_bytes() == b"user's trained weights"  # copied, not moved: inference still finds it


def test_backup_ignores_missing_files_and_honours_backup_dir(tmp_path):
    present, absent = tmp_path / "a.json", tmp_path / "b.json"
    present.write_text("1")
    moved = backup_existing([present, absent], backup_dir=tmp_path / "elsewhere")
    assert [p.parent for p in moved] == [tmp_path / "elsewhere"]
    assert moved[0].read_text() == "1"
    assert backup_existing([absent]) == []


def test_two_backups_in_the_same_second_do_not_collide(tmp_path, monkeypatch):
    monkeypatch.setattr(utils.time, "strftime", lambda fmt, *args: "20260101-120000")
    target = tmp_path / "model.pt"
    contents = [b"first", b"second", b"third"]
    moved = []
    for content in contents:
        target.write_bytes(content)
        moved += backup_existing(target)
    assert [p.name for p in moved] == [
        "model.20260101-120000.pt",
        "model.20260101-120000-1.pt",
        "model.20260101-120000-2.pt",
    ]
    assert [p.read_bytes() for p in moved] == contents


def test_wrap_ddp_returns_untrainable_module_unwrapped():
    assert not dist.is_initialized()  # no process group is needed for this case
    frozen = freeze(nn.Linear(2, 2))
    assert wrap_ddp_if_trainable(frozen, "cpu") is frozen
    empty = nn.ModuleList()
    assert wrap_ddp_if_trainable(empty, torch.device("cpu")) is empty


def test_wrap_ddp_wraps_trainable_module(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        module = nn.Linear(2, 2)
        wrapped = wrap_ddp_if_trainable(module, "cpu")
        assert isinstance(wrapped, nn.parallel.DistributedDataParallel)
        assert wrapped.module is module and wrapped.device_ids is None
    finally:
        dist.destroy_process_group()
