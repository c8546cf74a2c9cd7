"""Tests of kd_components.list_taps: the command that lists a config network's tap names with output shapes."""

from __future__ import annotations

import json

import pytest
from monai.networks.nets import UNet

from kd_components.list_taps import format_tap_table, main

UNET = {
    "_target_": "monai.networks.nets.UNet",
    "spatial_dims": 2,
    "in_channels": 3,
    "out_channels": 2,
    "channels": [4, 8, 16],
    "strides": [2, 2],
    "num_res_units": 1,
}


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "train.json"
    teacher = {**UNET, "channels": [16, 32, 64]}
    net3d = {**UNET, "spatial_dims": 3, "in_channels": 1}
    config = {"epochs": 2, "lr": 0.001, "network_def": UNET, "teacher_def": teacher, "net3d": net3d}
    path.write_text(json.dumps(config))
    return str(path)


def table_rows(text: str) -> dict[str, list[str]]:
    lines = text.strip().splitlines()
    assert lines[0].split() == ["name", "type", "output", "shape", "params"]
    return {line.split()[0]: line.split()[1:] for line in lines[1:]}


def test_prints_names_types_shapes_and_params(config_file, capsys):
    assert main(["--config_file", config_file, "--input_shape", "1", "3", "16", "16"]) == 0
    rows = table_rows(capsys.readouterr().out)
    reference = UNet(2, 3, 2, (4, 8, 16), (2, 2), num_res_units=1)
    assert list(rows) == [name for name, _ in reference.named_modules() if name]
    block = dict(reference.named_modules())["model.1.submodule.0"]
    assert rows["model.1.submodule.0"] == ["ResidualUnit", "1x8x4x4", f"{sum(p.numel() for p in block.parameters()):,}"]
    assert rows["model"][1] == "1x2x16x16"


@pytest.mark.parametrize(
    "net_id, shape, expected",
    [("teacher_def", ["2", "3", "32", "32"], "2x32x8x8"), ("net3d", ["1", "1", "8", "8", "8"], "1x8x2x2x2")],
)
def test_net_id_and_input_shape_select_network_and_shapes(config_file, capsys, net_id, shape, expected):
    assert main(["--config_file", config_file, "--net_id", net_id, "--input_shape", *shape]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert rows["model.1.submodule.0"][:2] == ["ResidualUnit", expected]


def test_filter_and_depth(config_file, capsys):
    shape = ["--input_shape", "1", "3", "16", "16"]
    main(["--config_file", config_file, *shape, "--filter", "submodule.1.submodule.conv"])
    rows = table_rows(capsys.readouterr().out)
    assert rows and all("submodule.1.submodule.conv" in name for name in rows)
    main(["--config_file", config_file, *shape, "--depth", "2"])
    assert list(table_rows(capsys.readouterr().out)) == ["model", "model.0", "model.1", "model.2"]


def test_unknown_net_id_exits_listing_network_like_ids(config_file, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--config_file", config_file, "--net_id", "studnet_def", "--input_shape", "1", "3", "16", "16"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "'studnet_def' is not an id" in err
    assert "network_def" in err and "teacher_def" in err and "net3d" in err
    assert "epochs" not in err and "'lr'" not in err


def test_format_tap_table_aligns_columns_and_marks_unused():
    rows = [("a", "Conv2d", (1, 2, 3, 3)), ("long.name", "Identity", None)]
    text = format_tap_table(rows, {"a": 1234})
    lines = text.splitlines()
    assert lines[1].split() == ["a", "Conv2d", "1x2x3x3", "1,234"]
    assert lines[2].split() == ["long.name", "Identity", "-", "0"]
    starts = {line.index(line.split()[1]) for line in lines[1:]}
    assert len(starts) == 1, "the type column is not aligned"
