"""The comparison runner: method resolution, the table, and a tiny end-to-end comparison with a paraphraser stage."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from kd_components.data.synthetic import make_synthetic_polyps

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import compare_methods  # noqa: E402

POLYP = REPO / "bundles" / "polyp_kdas"


def _row(model: str, dice: float, cldice: float | None = None) -> dict:
    extra = {} if cldice is None else {"cldice": cldice}
    return {
        "model": model,
        "dice": {"polyp": dice},
        "mean_dice": dice,
        "mean_iou": dice / 2,
        "hd95": 3.0,
        "extra": extra,
        "params": 1000,
        "train_s": 1.0,
    }


def test_available_methods_lists_none_first():
    methods = compare_methods.available_methods(POLYP)
    assert methods[0] == "none"
    assert "kdas" in methods and methods == ["none", *sorted(methods[1:])]


def test_method_configs_merge_parts_in_order_and_name_what_is_missing():
    assert compare_methods.method_configs(POLYP, "kdas") == ["train.json", "methods/kdas.json"]
    assert compare_methods.method_configs(POLYP, "none+train_teacher") == [
        "train.json",
        "methods/none.json",
        "train_teacher.json",
    ]
    with pytest.raises(SystemExit, match=r"no method or override 'kdaz'.*methods: \['none'"):
        compare_methods.method_configs(POLYP, "kdaz")


def test_markdown_table_shows_difference_to_student_alone_and_extra_metrics():
    rows = [_row("teacher", 0.9, 0.8), _row("student: none", 0.7, 0.6), _row("student: x", 0.75, 0.65)]
    table = compare_methods.markdown_table(rows, hd95_unit="vox").splitlines()
    assert table[0].split(" | ")[1:] == [
        "Dice polyp",
        "mean Dice",
        "Δ vs none",
        "IoU",
        "HD95 (vox)",
        "clDice",
        "params",
        "train s |",
    ]
    cells = [c.strip() for c in table[4].split("|")[1:-1]]
    assert cells[0] == "student: x" and cells[3] == "+0.0500" and cells[6] == "0.6500"
    assert [c.strip() for c in table[2].split("|")[1:-1]][3] == ""  # the teacher has no difference


def test_csv_means_ignore_non_finite_cases(tmp_path):
    csv = tmp_path / "val_mean_dice_raw.csv"
    csv.write_text("filename\tclass0\tmean\na\t0.5\t0.5\nb\tnan\tinf\nc\t1.0\t0.0\n".replace("\t", ","))
    assert compare_methods._csv_means(csv) == {"class0": 0.75, "mean": 0.25}


PARAPHRASER_STAGE = {
    "paraphraser": {
        "_target_": "kd_components.modules.Paraphraser",
        "spatial_dims": 2,
        "in_channels": 128,
        "factor_channels": 8,
    },
    "train#trainer": {
        "_target_": "kd_components.ParaphraserTrainer",
        "device": "@device",
        "max_epochs": 1,
        "train_data_loader": "@train#dataloader",
        "network": "$@paraphraser.to(@device)",
        "teacher": "@teacher",
        "tap": "model.1.submodule.1",
        "optimizer": {"_target_": "torch.optim.Adam", "params": "$@paraphraser.parameters()", "lr": 1e-3},
        "train_handlers": "@train#handlers",
    },
    "train#handlers": [{"_target_": "StatsHandler", "tag_name": "train_reconstruction"}],
    "initialize": ["$monai.utils.set_determinism(seed=@seed)"],
    "run": [
        "$@train#trainer.run()",
        "$torch.save(@paraphraser.state_dict(), os.path.join(@ckpt_dir, 'paraphraser_deep.pt'))",
    ],
}

# a student-alone run that fails unless the runner hands it the paraphraser's folder
NEEDS_PARAPHRASER = {
    "optimizer#params": "$@network.parameters()",
    "train#trainer": "@train#supervised_trainer",
    "initialize": [
        "$kd_components.require_file(os.path.join(@paraphraser_dir, 'paraphraser_deep.pt'), 'paraphraser', 'x')",
        "$monai.utils.set_determinism(seed=@seed)",
    ],
}


@pytest.fixture
def bundle_with_paraphraser(tmp_path, monkeypatch) -> str:
    """A copy of polyp_kdas with a paraphraser stage and a method that needs its output."""
    bundles = tmp_path / "bundles"
    shutil.copytree(POLYP, bundles / "probe", ignore=shutil.ignore_patterns("docs"))
    configs = bundles / "probe" / "configs"
    (configs / "train_paraphraser.json").write_text(json.dumps(PARAPHRASER_STAGE))
    (configs / "methods" / "needs_paraphraser.json").write_text(json.dumps(NEEDS_PARAPHRASER))
    train = json.loads((configs / "train.json").read_text())
    train["paraphraser_dir"] = "@ckpt_dir"
    (configs / "train.json").write_text(json.dumps(train))
    monkeypatch.setattr(compare_methods, "BUNDLES", bundles)
    return "probe"


def test_compare_trains_teacher_paraphraser_and_methods_then_tabulates_and_tracks(bundle_with_paraphraser, tmp_path):
    data = tmp_path / "data"
    make_synthetic_polyps(data, n=12, size=(32, 32), seed=0, overwrite=True)
    out = tmp_path / "out"
    fast = {"epochs": 1, "image_size": [32, 32], "batch_size": 4, "num_workers": 0}
    rows = compare_methods.compare(bundle_with_paraphraser, ["none", "needs_paraphraser"], data, out, **fast)

    assert [r["model"] for r in rows] == ["teacher", "student: none", "student: needs_paraphraser"]
    assert (out / "teacher" / "models" / "paraphraser_deep.pt").is_file()
    for row in rows:
        assert 0.0 <= row["mean_dice"] <= 1.0 and row["cases"] > 0 and row["params"] > 0
    assert rows[0]["params"] > rows[1]["params"]
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["paraphraser_dir"] == str(out / "teacher" / "models")
    assert (out / "results.md").read_text().count("| student:") == 2

    client = MlflowClient(f"sqlite:///{out / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("compare_probe")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"teacher", "paraphraser", "none", "needs_paraphraser"}
    assert "test_mean_dice" in runs["none"].data.metrics and "test_mean_dice" in runs["teacher"].data.metrics


def test_compare_refuses_unknown_method_before_training(tmp_path):
    data = tmp_path / "data"
    make_synthetic_polyps(data, n=12, size=(32, 32), seed=0, overwrite=True)
    with pytest.raises(SystemExit, match="teacher checkpoint .* not found"):
        compare_methods.compare("polyp_kdas", ["none"], data, tmp_path / "out", teacher_ckpt=tmp_path / "t.pt")


def test_parameter_counts_follow_the_run_overrides():
    default = compare_methods._parameters(POLYP, "network_def")
    wider = compare_methods._parameters(POLYP, "network_def", num_classes=3)
    assert wider > default  # one more output channel in the last convolutions


def test_markdown_table_takes_a_combined_none_as_the_student_alone():
    rows = [_row("teacher", 0.9), _row("student: none+labelled_only", 0.5), _row("student: semi", 0.6)]
    last = [c.strip() for c in compare_methods.markdown_table(rows).splitlines()[4].split("|")[1:-1]]
    assert last[0] == "student: semi" and last[3] == "+0.1000"
