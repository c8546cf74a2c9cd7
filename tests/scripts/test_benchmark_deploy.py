"""scripts/benchmark_deploy.py on a tiny input: every runtime timed, exports equal to eager. No timing assertions."""

from __future__ import annotations

import json
import math

from scripts import benchmark_deploy


def test_deploy_bundles_have_a_teacher() -> None:
    names = benchmark_deploy.deploy_bundles()
    assert "polyp_kdas" in names
    for name in names:
        assert json.loads((benchmark_deploy.BUNDLES / name / "configs" / "train.json").read_text())["teacher_def"]


def test_quick_run(tmp_path, capsys) -> None:
    argv = ["--bundle", "polyp_kdas", "--image_size", "32", "32", "--batch", "2", "--warmup", "1", "--repeats", "3"]
    assert benchmark_deploy.main([*argv, "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "benchmark_deploy.json").read_text())
    assert data["machine"]["torch_threads"] == 1 and data["machine"]["ort_threads"] == 1
    (item,) = data["bundles"]
    assert item["bundle"] == "polyp_kdas" and item["input_shape"] == [2, 3, 32, 32]
    expected = set(benchmark_deploy.RUNTIMES) - set(item["skipped"])
    assert set(item["runtimes"]) == expected and "student_onnxruntime" in expected | set(item["skipped"])
    for name in expected:
        timing = item["runtimes"][name]
        assert timing["n"] == 3 and timing["median_ms"] > 0 and math.isfinite(timing["images_per_s"])
        assert item["speedup_over_teacher"][name] > 0
    assert item["speedup_over_teacher"]["teacher_eager"] == 1.0
    assert item["max_abs_diff"]["torchscript"] <= 1e-5
    if "onnx" in item["max_abs_diff"]:
        assert item["max_abs_diff"]["onnx"] <= 1e-4
    text = (tmp_path / "benchmark_deploy.md").read_text()
    assert text.startswith("Command: `python scripts/benchmark_deploy.py --bundle polyp_kdas")
    assert "| student, TorchScript |" in text and "speed-up over the eager teacher" in capsys.readouterr().out
