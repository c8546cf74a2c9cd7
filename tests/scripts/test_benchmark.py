"""scripts/benchmark.py on the tiny ``--quick`` setting: well-formed JSON and markdown, positive finite ratios.

polyp_kdas in detail; every other bundle on its own synthetic data (and random paraphrasers where its methods need
them) with ``none`` and its own method. No timing assertions: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from scripts import benchmark

# the bundles besides polyp_kdas: their own (default) method and the synthetic data they run on
OTHER_BUNDLES = {
    "vessel_lightvessel": ("lightvessel", "vessels"),
    "pathology_coco": ("coco", "polyps"),
    "multiorgan_graphflow": ("graph_flow", "volumes"),
}
PARAPHRASERS = ["paraphraser_deep.pt", "paraphraser_shallow.pt"]


def _positive(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("benchmark")
    argv = ["--quick", "--threads", "1", "--bundle", "polyp_kdas", "--methods", "kdas", "none", "--out", str(out)]
    assert benchmark.main(argv) == 0
    return out, json.loads((out / "benchmark.json").read_text())


def test_inference_section(quick_run) -> None:
    _, data = quick_run
    assert data["machine"]["device"] == "cpu" and data["command"].startswith("python scripts/benchmark.py")
    (bundle,) = data["bundles"]
    assert bundle["bundle"] == "polyp_kdas"
    inference = bundle["inference"]
    assert inference["image_size"] == [32, 32] and inference["batch"] == 1
    for name in ("teacher", "student"):
        net = inference[name]
        assert net["params"] > 0 and _positive(net["gflops_per_input"]) and _positive(net["images_per_s"])
        assert _positive(net["latency"]["median_ms"]) and net["latency"]["iqr_ms"] >= 0
        assert net["peak_mib"] >= 0
    assert inference["teacher"]["params"] > inference["student"]["params"]
    for key in ("params", "gflops_per_input", "latency", "images_per_s"):
        assert _positive(inference["ratios"][key]), key


def test_training_section(quick_run) -> None:
    _, data = quick_run
    training = data["bundles"][0]["training"]
    assert training["batch_size"] == 2 and training["image_size"] == [32, 32] and training["amp"] is False
    for step in ("student_step", "teacher_forward"):
        assert _positive(training[step]["median_ms"]) and training[step]["n"] == 3
        assert training[step]["page_faults"] >= 0 and len(training[step]["samples_ms"]) == 3
    assert list(training["methods"]) == ["kdas"]
    kdas = training["methods"]["kdas"]
    assert _positive(kdas["overhead_ratio"]) and _positive(kdas["median_ms"]) and _positive(kdas["ratio_of_medians"])
    quartiles = kdas["overhead_ratio_quartiles"]
    assert quartiles["q1"] <= kdas["overhead_ratio"] <= quartiles["q3"]
    assert kdas["terms"] == ["kdas_attention", "kdas_sgm"]
    assert "none" in training["skipped"]  # the student alone is the plain step, not a distillation method
    loader = training["loader"]
    assert loader["num_workers"] == 0 and _positive(loader["per_batch"]["median_ms"]) and loader["first_batch_s"] > 0


def test_markdown_tables(quick_run) -> None:
    out, _ = quick_run
    text = (out / "benchmark.md").read_text()
    assert text.startswith("Command: `python scripts/benchmark.py --quick")
    headers = (
        "| network | params | GFLOPs / input | latency median (ms)",
        "| step | median (ms) | IQR (ms) | peak memory (MiB) | minor page faults | overhead (c) / ((a) + (b))",
    )
    for header in headers:
        assert header in text
    for row in ("| teacher |", "| student |", "| student / teacher |", "| (a) student step", "| (b) teacher forward"):
        assert row in text
    assert "| (c) kdas: DistillationTrainer iteration (kdas_attention, kdas_sgm) |" in text
    assert "| data loader, per batch (0 workers" in text


def test_helpers() -> None:
    assert "polyp_kdas" in benchmark.bundle_names()
    assert benchmark.paired_ratio([3.0, 6.0], [1.0, 2.0], [1.0, 1.0])["median"] == pytest.approx(1.75)
    stats = benchmark.summarize([0.001, 0.002, 0.003, 0.004, 0.005])
    assert stats["median_ms"] == pytest.approx(3.0) and stats["iqr_ms"] == pytest.approx(2.0) and stats["n"] == 5
    config = {"_target_": "kd_components.DistillationTrainer"}
    assert benchmark.is_distillation_trainer(config)
    assert not benchmark.is_distillation_trainer({"_target_": "SupervisedTrainer"})


@pytest.mark.parametrize(
    "critic_every, gp_every, steps, cycle",
    [(1, 1, 1, 1), (4, 1, 1, 4), (1, 4, 1, 4), (4, 4, 1, 16), (2, 4, 2, 4), (2, 4, 0, 1)],
)
def test_lever_cycle(critic_every: int, gp_every: int, steps: int, cycle: int) -> None:
    step = SimpleNamespace(critic_every=critic_every, gp_every=gp_every, steps=steps)
    assert benchmark.lever_cycle(SimpleNamespace(adversarial=step)) == cycle
    assert benchmark.lever_cycle(SimpleNamespace(adversarial=None)) == 1


def test_per_iteration_divides_every_sample() -> None:
    timing = {**benchmark.summarize([0.4, 0.8, 0.6]), "page_faults": 40}
    per = benchmark.per_iteration(timing, 4)
    assert per["samples_ms"] == pytest.approx([100.0, 200.0, 150.0])
    assert per["median_ms"] == pytest.approx(150.0) and per["page_faults"] == pytest.approx(10)
    assert benchmark.per_iteration(timing, 1) is timing


# 3D bundles: --quick and SYNTHETIC_DATA are 2D (32x32 images, NPY slices); benchmark them with --dataset_dir
NOT_BENCHMARKED = {"cardiac3d_swin"}


def test_every_bundle_is_covered() -> None:
    assert set(benchmark.bundle_names()) - NOT_BENCHMARKED == {"polyp_kdas", *OTHER_BUNDLES}
    assert set(benchmark.SYNTHETIC_DATA) == set(benchmark.bundle_names()) - NOT_BENCHMARKED


@pytest.mark.parametrize("bundle", sorted(OTHER_BUNDLES))
def test_quick_run_of_each_other_bundle(bundle, tmp_path) -> None:
    method, data = OTHER_BUNDLES[bundle]
    argv = ["--quick", "--threads", "1", "--bundle", bundle, "--methods", "none", method, "--out", str(tmp_path)]
    assert benchmark.main(argv) == 0
    (result,) = json.loads((tmp_path / "benchmark.json").read_text())["bundles"]
    assert result["bundle"] == bundle
    assert result["inference"]["teacher"]["params"] > result["inference"]["student"]["params"]
    training = result["training"]
    assert training["data"] == data and training["image_size"] == [32, 32] and training["batch_size"] == 2
    assert training["batch_items"] >= 2 and list(training["methods"]) == [method] and "none" in training["skipped"]
    assert training.get("paraphrasers") == (PARAPHRASERS if bundle != "vessel_lightvessel" else None)
    measured = training["methods"][method]
    assert _positive(measured["overhead_ratio"]) and _positive(measured["median_ms"]) and measured["terms"]
    assert _positive(training["student_step"]["median_ms"]) and _positive(training["teacher_forward"]["median_ms"])
    assert _positive(training["loader"]["per_batch"]["median_ms"])
    assert f"| (c) {method}: DistillationTrainer iteration (" in (tmp_path / "benchmark.md").read_text()


def test_missing_method_is_skipped_and_unknown_bundle_needs_data() -> None:
    assert benchmark.synthetic_data_kind("some_rgb_bundle", 3, 2) == "polyps"
    with pytest.raises(ValueError, match="--dataset_dir"):
        benchmark.synthetic_data_kind("some_ct_bundle", 1, 3)
    bundle = benchmark.BUNDLES / "polyp_kdas"
    assert benchmark.make_paraphrasers(bundle, {}, Path("/nonexistent")) == []  # no paraphraser stage
    result = benchmark.benchmark_training(bundle, ["coco"], {}, torch.device("cpu"), 0, 1, 1)
    assert result["methods"] == {} and "no polyp_kdas/configs/methods/coco.json" in result["skipped"]["coco"]


def test_paraphrasers_are_listed_explicitly(tmp_path) -> None:
    """Every bundle with a paraphraser stage has its (network, checkpoint) ids in PARAPHRASERS; one without fails."""
    staged = {p.parent.parent.name for p in benchmark.BUNDLES.glob("*/configs/train_paraphraser.json")}
    assert staged == set(benchmark.PARAPHRASERS)
    bundle = tmp_path / "new_bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "configs" / "train_paraphraser.json").write_text("{}")
    with pytest.raises(ValueError, match="PARAPHRASERS"):
        benchmark.make_paraphrasers(bundle, {}, tmp_path / "out")
