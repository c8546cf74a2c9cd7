"""Any MONAI bundle as the teacher: a bundle built here (as a model-zoo bundle is laid out), loaded and checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from monai.networks.nets import UNet

from kd_components import BundleTeacherError, load_bundle_teacher
from kd_components.bundle_teacher import bundle_channel_def

REPO = Path(__file__).resolve().parents[1]
NET = {
    "_target_": "UNet",
    "spatial_dims": 2,
    "in_channels": 3,
    "out_channels": 2,
    "channels": [4, 8],
    "strides": [2],
    "num_res_units": 0,
}


def make_bundle(
    root: Path,
    net: dict | None = None,
    labels: dict[str, str] | None = None,
    config: str = "inference.json",
    wrap: str | None = None,
) -> tuple[Path, dict[str, torch.Tensor]]:
    """A bundle folder as ``monai.bundle download`` leaves it: configs (network_def, metadata) and models/model.pt."""
    net = dict(net or NET)
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "configs" / config).write_text(json.dumps({"imports": ["$import torch"], "network_def": net}))
    labels = labels if labels is not None else {"0": "background", "1": "polyp"}
    meta = {
        "version": "0.1.0",
        "network_data_format": {
            "inputs": {"image": {"num_channels": net["in_channels"], "spatial_shape": [32, 32]}},
            "outputs": {"pred": {"num_channels": len(labels) or net["out_channels"], "channel_def": labels}},
        },
    }
    (root / "configs" / "metadata.json").write_text(json.dumps(meta))
    parser = ConfigParser({"network_def": net})
    torch.manual_seed(1)
    state = parser.get_parsed_content("network_def").state_dict()
    torch.save({wrap: state} if wrap else state, root / "models" / "model.pt")
    return root, state


def test_loads_the_bundle_network_and_weights_frozen(tmp_path):
    bundle, state = make_bundle(tmp_path / "zoo_polyp")
    teacher = load_bundle_teacher(
        bundle, "cpu", num_classes=2, in_channels=3, labels=["background", "Polyp"], probe_shape=[1, 3, 32, 32]
    )
    assert isinstance(teacher, UNet) and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in state.items())
    assert teacher(torch.rand(2, 3, 32, 32)).shape == (2, 2, 32, 32)


@pytest.mark.parametrize("wrap", ["model", "state_dict"])
def test_reads_wrapped_checkpoints_and_train_json(tmp_path, wrap):
    bundle, state = make_bundle(tmp_path / "b", config="train.json", wrap=wrap)
    teacher = load_bundle_teacher(bundle, num_classes=2)
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in state.items())


def test_refuses_a_bundle_with_other_classes(tmp_path):
    bundle, _ = make_bundle(
        tmp_path / "organs", {**NET, "out_channels": 4}, {"0": "background", "1": "a", "2": "b", "3": "c"}
    )
    assert bundle_channel_def(bundle) == (3, 4, {0: "background", 1: "a", 2: "b", 3: "c"})
    with pytest.raises(BundleTeacherError, match="predicts 4 channels .*the student 2"):
        load_bundle_teacher(bundle, num_classes=2)


def test_refuses_other_inputs_and_other_labels(tmp_path):
    bundle, _ = make_bundle(tmp_path / "b")
    with pytest.raises(BundleTeacherError, match="takes 3 input channels, the student 1"):
        load_bundle_teacher(bundle, num_classes=2, in_channels=1)
    with pytest.raises(BundleTeacherError, match="labels 0: background, 1: polyp differ .*1: vessel"):
        load_bundle_teacher(bundle, num_classes=2, labels={0: "background", 1: "vessel"})


def test_the_probe_catches_metadata_that_does_not_match_the_network(tmp_path):
    """metadata.json says 2 channels but the network gives 3: the real output decides."""
    bundle, _ = make_bundle(tmp_path / "b", {**NET, "out_channels": 3})
    load_bundle_teacher(bundle, num_classes=2)  # without a probe only the metadata is checked
    with pytest.raises(BundleTeacherError, match="gives 3 output channels .*the student 2"):
        load_bundle_teacher(bundle, num_classes=2, probe_shape=[1, 3, 32, 32])


def test_missing_weights_or_configs_say_what_to_do(tmp_path):
    bundle, _ = make_bundle(tmp_path / "b")
    (bundle / "models" / "model.pt").unlink()
    with pytest.raises(FileNotFoundError, match="teacher weights not found.*monai.bundle download"):
        load_bundle_teacher(bundle, num_classes=2)
    with pytest.raises(FileNotFoundError, match="is .* a MONAI bundle folder"):
        load_bundle_teacher(tmp_path / "nothing", num_classes=2)


def test_weights_of_another_network_are_refused(tmp_path):
    bundle, _ = make_bundle(tmp_path / "b")
    torch.save(UNet(2, 3, 2, (8, 16), (2,), num_res_units=0).state_dict(), bundle / "models" / "model.pt")
    with pytest.raises(ValueError, match="does not fit UNet.*shape mismatches"):
        load_bundle_teacher(bundle, num_classes=2)


def test_a_bundle_teaches_polyp_kdas_through_its_config(tmp_path):
    """``teacher`` replaced in train.json: the distiller is built on the bundle's network (its own architecture)."""
    bundle, state = make_bundle(tmp_path / "zoo_polyp")
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / "polyp_kdas" / "configs" / "train.json"))
    parser.update(
        {
            "bundle_root": str(tmp_path),
            "image_size": [32, 32],
            "teacher": f"$kd_components.load_bundle_teacher({str(bundle)!r}, @device, num_classes=@num_classes, "
            "in_channels=@network_def.in_channels, probe_shape=[1, 3] + list(@image_size))",
        }
    )
    parser.get_parsed_content("distiller")  # the KDAS terms are built with this teacher
    teacher = parser.get_parsed_content("teacher")
    assert parser["train#trainer"]["teacher"] == "@teacher" and isinstance(teacher, UNet)
    assert len(teacher.state_dict()) == len(state)  # the bundle's own architecture, not teacher_def's
    assert torch.equal(teacher.state_dict()["model.0.conv.weight"], state["model.0.conv.weight"])
