"""TorchScript and ONNX export of every bundle's student, checked against the eager network."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from scripts import export_student

REPO = Path(__file__).resolve().parents[2]
NAMES = sorted(p.name for p in (REPO / "bundles").iterdir() if (p / "configs" / "inference.json").is_file())
HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))


def _weights(bundle: str, folder: Path, image_size: list[int] | None = None) -> Path:
    """Random but non-trivial student weights (batch-norm statistics too), with the trained size recorded."""
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / bundle / "configs" / "inference.json"))
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def")
    for name, buffer in net.named_buffers():
        if name.endswith("running_mean"):
            buffer.uniform_(-0.1, 0.1)
        elif name.endswith("running_var"):
            buffer.uniform_(0.5, 1.5)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), folder / "model.pt")
    if image_size is not None:
        (folder / "model_settings.json").write_text(json.dumps({"image_size": image_size}))
    return folder / "model.pt"


def _size(bundle: str, size: list[int]) -> list[int]:
    """``size`` with a depth of 16 appended for a bundle whose student is 3D."""
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / bundle / "configs" / "inference.json"))
    return size + [16] * (int(parser["network_def"]["spatial_dims"]) - 2)


@pytest.mark.parametrize("bundle", NAMES)
def test_torchscript_equals_eager(bundle, tmp_path):
    weights = _weights(bundle, tmp_path / "models", _size(bundle, [32, 48]))
    report = export_student.export_student(bundle, weights, tmp_path / "out", formats=["torchscript"])
    assert report["input_shape"][2:] == _size(bundle, [32, 48])  # the recorded trained size
    assert report["torchscript"]["ok"] and report["torchscript"]["max_abs_diff"] <= export_student.TS_ATOL
    net, shape = export_student.load_student(bundle, weights)
    scripted = torch.jit.load(str(tmp_path / "out" / "model.ts"))
    x = torch.rand(2, *shape[1:])
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), net(x), rtol=0, atol=export_student.TS_ATOL)
    assert json.loads((tmp_path / "out" / "export.json").read_text())["torchscript"]["ok"]


@pytest.mark.skipif(not HAS_ONNX, reason="onnx, onnxscript and onnxruntime are needed (pip install .[export])")
@pytest.mark.parametrize("bundle", NAMES)
def test_onnx_runtime_equals_eager_with_a_dynamic_batch(bundle, tmp_path):
    import onnxruntime

    weights = _weights(bundle, tmp_path / "models")
    assert export_student.main(
        ["--bundle", bundle, "--weights", str(weights), "--out", str(tmp_path / "out"), "--formats", "onnx",
         "--image_size", *map(str, _size(bundle, [32, 32]))]
    ) == 0  # fmt: skip
    report = json.loads((tmp_path / "out" / "export.json").read_text())
    assert report["onnx"]["ok"] and report["onnx"]["max_abs_diff"] <= export_student.ONNX_ATOL
    net, shape = export_student.load_student(bundle, weights, _size(bundle, [32, 32]))
    session = onnxruntime.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.rand(5, *shape[1:])  # a batch size the export never saw
    (out,) = session.run(["pred"], {"image": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), net(x), rtol=0, atol=export_student.ONNX_ATOL)


def test_a_broken_export_is_reported(tmp_path, monkeypatch):
    weights = _weights("polyp_kdas", tmp_path / "models")
    monkeypatch.setattr(export_student, "export_torchscript", lambda net, shape, path: 0.5)
    assert export_student.main(["--bundle", "polyp_kdas", "--weights", str(weights), "--out", str(tmp_path / "o"),
                                "--formats", "torchscript"]) == 1  # fmt: skip
    assert json.loads((tmp_path / "o" / "export.json").read_text())["torchscript"] == {
        "file": str(tmp_path / "o" / "model.ts"), "max_abs_diff": 0.5, "atol": export_student.TS_ATOL, "ok": False,
    }  # fmt: skip


def test_weights_of_another_network_are_refused(tmp_path):
    torch.save({"w": torch.zeros(1)}, tmp_path / "model.pt")
    with pytest.raises(RuntimeError, match="Missing key"):
        export_student.load_student("polyp_kdas", tmp_path / "model.pt")
