"""The comparison runner: method resolution, statistics and tables, seeds and determinism, --plan / --only_job /
--collect, --eval_sets, HD95 penalties, and a tiny end-to-end comparison with a paraphraser stage."""

from __future__ import annotations

import json
import math
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from kd_components.data.synthetic import make_synthetic_polyps
from kd_components.ensemble import EnsembleTeacher
from scripts import compare_methods
from scripts.comparison import plan as plan_module
from scripts.comparison import runner as runner_module
from scripts.comparison.collect import collect
from scripts.comparison.evaluation import _csv_means, evaluate_stage
from scripts.comparison.jobs import RESULT_FILE, TEACHER_JOB, _jsonable, job_dir, plan_jobs
from scripts.comparison.join import join_label
from scripts.comparison.plan import ensemble_overrides, make_plan, read_plan, teacher_checkpoints
from scripts.comparison.report import markdown_report, markdown_table
from scripts.comparison.runner import run_job
from scripts.comparison.sequential import compare
from scripts.comparison.stages import _parameters, _weights_digest, _workflow, available_methods, method_configs
from scripts.comparison.summary import summarize

REPO = Path(__file__).resolve().parents[2]
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
    methods = available_methods(POLYP)
    assert methods[0] == "none"
    assert "kdas" in methods and methods == ["none", *sorted(methods[1:])]


def test_method_configs_merge_parts_in_order_and_name_what_is_missing():
    assert method_configs(POLYP, "kdas") == ["train.json", "methods/kdas.json"]
    assert method_configs(POLYP, "none+train_teacher") == [
        "train.json",
        "methods/none.json",
        "train_teacher.json",
    ]
    with pytest.raises(SystemExit, match=r"no method or override 'kdaz'.*methods: \['none'"):
        method_configs(POLYP, "kdaz")


def test_markdown_table_shows_difference_to_student_alone_and_extra_metrics():
    rows = [_row("teacher", 0.9, 0.8), _row("student: none", 0.7, 0.6), _row("student: x", 0.75, 0.65)]
    table = markdown_table(rows, hd95_unit="vox").splitlines()
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
    assert _csv_means(csv) == {"class0": 0.75, "mean": 0.25}


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
        "$torch.save(@paraphraser.state_dict(), os.path.join(@paraphraser_dir, 'paraphraser_deep.pt'))",
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
    for module in (plan_module, runner_module):  # where make_plan and run_job look the bundle up
        monkeypatch.setattr(module, "BUNDLES", bundles)
    return "probe"


def test_compare_trains_teacher_paraphraser_and_methods_then_tabulates_and_tracks(
    bundle_with_paraphraser, tmp_path, capsys
):
    data = tmp_path / "data"
    make_synthetic_polyps(data, n=12, size=(32, 32), seed=0, overwrite=True)
    out = tmp_path / "out"
    fast = {"epochs": 1, "image_size": [32, 32], "batch_size": 4, "num_workers": 0}
    rows = compare(bundle_with_paraphraser, ["none", "needs_paraphraser"], data, out, **fast)

    assert [r["model"] for r in rows] == ["teacher", "student: none", "student: needs_paraphraser"]
    progress = [line for line in capsys.readouterr().out.splitlines() if line.startswith("comparison job")]
    assert [line.split(":")[0] for line in progress] == [
        "comparison job " + k for k in ("1/3", "1/3", "2/3", "2/3", "3/3", "3/3")
    ]
    assert "left" in progress[1] and "left" not in progress[-1]
    assert (out / "teacher" / "models" / "paraphraser_deep.pt").is_file()
    for row in rows:
        assert 0.0 <= row["mean_dice"] <= 1.0 and row["cases"] > 0 and row["params"] > 0
        assert row["seeds"] == [0]
    assert rows[0]["params"] > rows[1]["params"]
    assert (out / "needs_paraphraser" / "seed0" / "models" / "model.pt").is_file()
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["paraphraser_dir"] == str(out / "teacher" / "models")
    assert results["missing_jobs"] == []
    report = (out / "results.md").read_text()
    assert report.count("| student: none |") == 1  # the reference: values only
    assert report.count("| student: needs_paraphraser |") == 4  # values, then Δ of mean Dice, IoU, HD95
    assert (out / "results_test.png").stat().st_size > 0

    client = MlflowClient(f"sqlite:///{out / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("compare_probe")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"teacher", "paraphraser", "none seed0", "needs_paraphraser seed0", "comparison"}
    assert runs["none seed0"].data.tags["method"] == "none" and runs["none seed0"].data.tags["seed"] == "0"
    assert runs["teacher"].data.tags["method"] == "teacher" and runs["paraphraser"].data.tags["method"] == "paraphraser"
    assert "test_mean_dice" in runs["none seed0"].data.metrics and "test_mean_dice" in runs["teacher"].data.metrics
    artifacts = {a.path for a in client.list_artifacts(runs["comparison"].info.run_id)}
    assert {"results.md", "results.json", "results_test.png"} <= artifacts


def test_a_reused_teacher_gets_its_paraphrasers_in_the_comparison_not_in_its_own_folder(
    bundle_with_paraphraser, tmp_path
):
    data = tmp_path / "data"
    make_synthetic_polyps(data, n=12, size=(32, 32), seed=0, overwrite=True)
    teacher_dir = tmp_path / "my_teacher"
    teacher_dir.mkdir()
    wf = _workflow(plan_module.BUNDLES / bundle_with_paraphraser, ["train.json"], "train")
    torch.save(wf.parser.get_parsed_content("teacher_def").state_dict(), teacher_dir / "teacher.pt")
    fast = {"epochs": 1, "image_size": [32, 32], "batch_size": 4, "num_workers": 0}
    plan = make_plan(
        bundle_with_paraphraser,
        ["needs_paraphraser"],
        data,
        tmp_path / "out",
        teacher_ckpt=teacher_dir / "teacher.pt",
        **fast,
    )
    run_job(plan["out"], "teacher")
    assert sorted(p.name for p in teacher_dir.iterdir()) == ["teacher.pt"]  # the user's folder is left alone
    assert (Path(plan["paraphraser_dir"]) / "paraphraser_deep.pt").is_file()
    run_job(plan["out"], "needs_paraphraser:0")  # finds them there


def test_compare_refuses_unknown_method_or_missing_teacher_before_training(tmp_path):
    data = tmp_path / "data"
    make_synthetic_polyps(data, n=12, size=(32, 32), seed=0, overwrite=True)
    with pytest.raises(SystemExit, match="teacher checkpoint .* not found"):
        compare("polyp_kdas", ["none"], data, tmp_path / "out", teacher_ckpt=tmp_path / "t.pt")
    with pytest.raises(SystemExit, match="no method or override 'kdaz'"):
        compare("polyp_kdas", ["none", "kdaz"], data, tmp_path / "out")
    with pytest.raises(SystemExit, match="seeds are repeated"):
        make_plan("polyp_kdas", ["none"], data, tmp_path / "out", seeds=[1, 1])
    with pytest.raises(SystemExit, match="eval_sets takes name=path"):
        make_plan("polyp_kdas", ["none"], data, tmp_path / "out", eval_sets=["cvc"])
    assert not (tmp_path / "out" / "teacher").exists()


def test_parameter_counts_follow_the_run_overrides():
    default = _parameters(POLYP, "network_def")
    wider = _parameters(POLYP, "network_def", num_classes=3)
    assert wider > default  # one more output channel in the last convolutions


def test_markdown_table_takes_a_combined_none_as_the_student_alone():
    rows = [_row("teacher", 0.9), _row("student: none+labelled_only", 0.5), _row("student: semi", 0.6)]
    last = [c.strip() for c in markdown_table(rows).splitlines()[4].split("|")[1:-1]]
    assert last[0] == "student: semi" and last[3] == "+0.1000"


def _fake_run(seed, dice, hd95, penalised=None, cases=None):
    """A job result as written by run_job, with given per-case values on the test set."""
    cases = cases or [f"images/case_{i:02d}.png" for i in range(len(dice))]
    per_case = {
        "cases": cases,
        "main": ["mean_dice", "mean_iou", "hd95"],
        "metrics": {
            "mean_dice": list(dice),
            "dice_polyp": list(dice),
            "mean_iou": [d / 2 for d in dice],
            "hd95": list(hd95),
        },
        "hd95_penalised": penalised if penalised is not None else [0] * len(dice),
        "hd95_nonfinite": 0,
    }
    return {"seed": seed, "params": 1000, "train_s": 2.0, "sets": {"test": {"per_case": per_case}}}


def _fake_comparison():
    """Per-case results of a teacher, the student alone, and a helpful, a harmful and a neutral method (2 seeds)."""
    rng = np.random.default_rng(0)
    n = 40
    base = rng.uniform(0.5, 0.8, n)
    hd = rng.uniform(10.0, 20.0, n)
    plan = {"methods": ["none", "good", "bad", "same"], "seeds": [0, 1], "sets": {"test": {}}, "n_resamples": 2000}
    results = {"teacher": _fake_run(0, base + 0.06, hd - 4.0)}
    for seed in (0, 1):
        noise = rng.normal(0.0, 0.005, n)
        results[f"none:{seed}"] = _fake_run(seed, base + noise, hd, penalised=[1] + [0] * (n - 1))
        results[f"good:{seed}"] = _fake_run(seed, base + 0.03 + rng.normal(0.0, 0.005, n), hd - 2.0)
        results[f"bad:{seed}"] = _fake_run(seed, base - 0.05 + rng.normal(0.0, 0.005, n), hd + 3.0)
        same = base + rng.normal(0.0, 0.02, n)
        results[f"same:{seed}"] = _fake_run(seed, same - (same - base).mean(), hd + rng.normal(0.0, 1.0, n))
    return plan, results


def test_summarize_gives_deltas_cis_verdicts_and_gap_closed():
    plan, results = _fake_comparison()
    rows = summarize(plan, results)
    by = {r["method"]: r["sets"]["test"]["metrics"] for r in rows}
    assert [r["model"] for r in rows] == ["teacher", "student: none", "student: good", "student: bad", "student: same"]
    assert by["teacher"]["mean_dice"]["verdict"] == "better"  # the teacher–student gap
    assert by["teacher"]["mean_dice"]["delta"] == pytest.approx(0.06, abs=0.005)
    good, bad, same = by["good"], by["bad"], by["same"]
    assert (
        good["mean_dice"]["verdict"] == "better" and good["mean_dice"]["ci_low"] < 0.03 < good["mean_dice"]["ci_high"]
    )
    assert good["mean_dice"]["gap_closed"] == pytest.approx(0.5, abs=0.1)
    assert good["hd95"]["verdict"] == "better" and good["hd95"]["delta"] == pytest.approx(-2.0)  # lower is better
    assert good["hd95"]["gap_closed"] == pytest.approx(0.5)
    assert bad["mean_dice"]["verdict"] == "worse" and bad["hd95"]["verdict"] == "worse"
    assert bad["mean_dice"]["gap_closed"] < 0
    assert (
        same["mean_dice"]["verdict"] == "no evidence" and same["mean_dice"]["ci_low"] < 0 < same["mean_dice"]["ci_high"]
    )
    none = rows[1]
    assert none["sets"]["test"]["hd95_penalised"] == [1, 1] and none["mean_dice"] == pytest.approx(
        none["sets"]["test"]["metrics"]["mean_dice"]["mean"]
    )
    assert len(none["sets"]["test"]["metrics"]["mean_dice"]["per_seed"]) == 2
    assert math.isfinite(none["sets"]["test"]["metrics"]["mean_dice"]["sd"])
    again = summarize(plan, results)  # seeded resampling: the same numbers again
    assert json.dumps(_jsonable(again)) == json.dumps(_jsonable(rows))

    table = markdown_table(rows)
    assert "Teacher − student alone (none), mean Dice: +0.06" in table and "the teacher is better" in table
    good_line = next(line for line in table.splitlines() if line.startswith("| student: good | mean Dice |"))
    assert "| better | 5" in good_line
    assert "HD95 penalised" in table and "| 1, 1 of 40 |" in table
    assert "image, sqrt(Σ (size × spacing)²)" in table and "2000 resamples" in table


def test_gap_closed_is_na_when_the_teacher_is_not_better():
    plan, results = _fake_comparison()
    teacher = results["teacher"]["sets"]["test"]["per_case"]["metrics"]
    teacher["mean_dice"] = [d - 0.1 for d in results["none:0"]["sets"]["test"]["per_case"]["metrics"]["mean_dice"]]
    rows = summarize(plan, results)
    good = rows[2]["sets"]["test"]["metrics"]["mean_dice"]
    assert good["verdict"] == "better" and math.isnan(good["gap_closed"])
    table = markdown_table(rows)
    assert "the teacher is WORSE than the student alone" in table
    assert next(line for line in table.splitlines() if line.startswith("| student: good | mean Dice |")).endswith(
        "| better | n/a |"
    )


def _make_sets(root: Path) -> dict[str, Path]:
    """The training data and two tiny external sets: one with a test split, one without (evaluated whole)."""
    data = root / "data"
    make_synthetic_polyps(data, n=12, size=(32, 32), seed=0, overwrite=True)
    with_test = root / "set_a"
    make_synthetic_polyps(with_test, n=10, size=(32, 32), seed=1, fractions=(0.4, 0.2, 0.4), overwrite=True)
    whole = root / "set_b"
    make_synthetic_polyps(whole, n=5, size=(32, 32), seed=2, fractions=(0.6, 0.2, 0.2), overwrite=True)
    datalist = json.loads((whole / "datalist.json").read_text())
    del datalist["test"]
    (whole / "datalist.json").write_text(json.dumps(datalist))
    return {"data": data, "a": with_test, "b": whole}


@pytest.fixture(scope="module")
def planned(tmp_path_factory) -> dict:
    """A comparison run through --plan, --only_job (teacher, none:0, none:1), --collect, with two --eval_sets."""
    root = tmp_path_factory.mktemp("planned")
    sets = _make_sets(root)
    out = root / "out"
    common = ["--bundle", "polyp_kdas", "--methods", "none", "--dataset_dir", str(sets["data"]), "--out", str(out)]
    fast = ["--epochs", "1", "--image_size", "32", "32", "--batch_size", "4", "--num_workers", "0"]
    evals = ["--eval_sets", f"a={sets['a']}", f"b={sets['b']}"]
    assert compare_methods.main([*common, *fast, *evals, "--seeds", "0", "1", "--no_mlflow", "--plan"]) == 0
    commands = [
        shlex.split(line) for line in (out / "jobs.sh").read_text().splitlines() if line and not line.startswith("#")
    ]
    assert compare_methods.main(commands[-1][2:]) == 1  # --collect before any job: every job missing
    early = json.loads((out / "results.json").read_text())
    for command in commands[:-1]:
        assert compare_methods.main(command[2:]) == 0
    assert compare_methods.main(commands[-1][2:]) == 0
    return {"out": out, "sets": sets, "commands": commands, "early": early}


def test_plan_writes_one_command_per_job_and_collect_builds_the_tables(planned):
    out, commands = planned["out"], planned["commands"]
    jobs = [c[c.index("--only_job") + 1] for c in commands if "--only_job" in c]
    assert jobs == ["teacher", "none:0", "none:1"] and "--collect" in commands[-1]
    assert {tuple(c[:2]) for c in commands} == {("python", str(REPO / "scripts" / "compare_methods.py"))}
    assert planned["early"]["missing_jobs"] == jobs and planned["early"]["rows"] == []
    results = json.loads((out / "results.json").read_text())
    assert results["missing_jobs"] == [] and results["settings"]["seeds"] == [0, 1]
    assert [r["model"] for r in results["rows"]] == ["teacher", "student: none"]
    assert sorted((r["job"], r["seed"]) for r in results["runs"]) == [("none:0", 0), ("none:1", 1), ("teacher", 0)]
    for job, folder in (("none:0", "none/seed0"), ("none:1", "none/seed1"), ("teacher", "teacher")):
        assert json.loads((out / folder / "result.json").read_text())["job"] == job
    none = results["rows"][1]["sets"]["test"]["metrics"]["mean_dice"]
    assert len(none["per_seed"]) == 2 and none["verdict"] == ""  # the reference has no Δ
    run = next(r for r in results["runs"] if r["job"] == "none:1")
    cases = run["sets"]["test"]["per_case"]["cases"]
    assert cases and all(c.startswith("images/") for c in cases)  # named relative to the dataset folder
    assert len(run["sets"]["test"]["per_case"]["metrics"]["mean_dice"]) == len(cases)
    report = (out / "results.md").read_text()
    assert "## test:" in report and "## a:" in report and "## b:" in report and "Teacher − student alone" in report
    assert all((out / f"results_{name}.png").stat().st_size > 0 for name in ("test", "a", "b"))


def test_plan_creates_the_tracking_store_before_any_job(tmp_path):
    """``--plan`` creates the MLflow store and the comparison's experiment, so jobs started at the same moment never
    race to create a new SQLite store's tables (one of two such jobs failed before); with ``--no_mlflow`` no store."""
    data = tmp_path / "data"
    make_synthetic_polyps(data, n=8, size=(32, 32), seed=0, overwrite=True)
    common = ["--bundle", "polyp_kdas", "--methods", "none", "--dataset_dir", str(data), "--image_size", "32", "32"]
    assert compare_methods.main([*common, "--out", str(tmp_path / "off"), "--no_mlflow", "--plan"]) == 0
    assert not (tmp_path / "off" / "mlruns.db").exists()
    assert compare_methods.main([*common, "--out", str(tmp_path / "on"), "--plan"]) == 0
    plan = json.loads((tmp_path / "on" / "plan.json").read_text())
    experiment = MlflowClient(plan["tracking_uri"]).get_experiment_by_name(plan["experiment_name"])
    assert experiment is not None and experiment.artifact_location.endswith("mlruns")


def test_eval_sets_evaluate_every_model_on_their_test_split_or_whole(planned):
    out, sets = planned["out"], planned["sets"]
    results = json.loads((out / "results.json").read_text())
    plan = results["settings"]
    assert plan["sets"]["a"]["split"] == "test" and plan["sets"]["b"]["split"] == "all labelled items"
    a_test = json.loads((sets["a"] / "datalist.json").read_text())["test"]
    b_splits = json.loads((sets["b"] / "datalist.json").read_text())
    b_items = json.loads((out / "eval_sets" / "b" / "datalist.json").read_text())["test"]
    assert len(b_items) == len(b_splits["training"]) + len(b_splits["validation"])  # the set without a test split
    for run in results["runs"]:  # the teacher included
        assert len(run["sets"]["a"]["per_case"]["cases"]) == len(a_test)
        assert len(run["sets"]["b"]["per_case"]["cases"]) == len(b_items)
    teacher_row = results["rows"][0]
    assert set(teacher_row["sets"]) == {"test", "a", "b"}
    assert teacher_row["sets"]["b"]["metrics"]["mean_dice"]["n_paired"] > 0  # a Δ (the gap) on every set
    assert (out / "teacher" / "eval_sets" / "b" / "val_mean_dice_raw.csv").is_file()


def test_same_seed_gives_the_same_run_and_different_seeds_different_runs(planned):
    out = planned["out"]
    first = json.loads((out / "none" / "seed0" / "result.json").read_text())
    other = json.loads((out / "none" / "seed1" / "result.json").read_text())
    assert first["weights_md5"] != other["weights_md5"]  # different seeds: different runs
    torch.rand(1000)  # whatever ran before in this process must not matter
    again = run_job(out, "none:0")
    assert again["weights_md5"] == first["weights_md5"]
    assert again["sets"]["test"]["per_case"] == first["sets"]["test"]["per_case"]
    assert again["environment"]["threads"] == first["environment"]["threads"]


def test_only_job_and_collect_read_the_plan(planned):
    out = planned["out"]
    with pytest.raises(SystemExit, match="take their settings from"):
        compare_methods.main(["--out", str(out), "--only_job", "none:0", "--epochs", "3"])
    with pytest.raises(SystemExit, match="unknown job 'kdas:0'"):
        compare_methods.main(["--out", str(out), "--only_job", "kdas:0"])
    with pytest.raises(SystemExit, match="no plan.json"):
        compare_methods.main(["--out", str(out / "elsewhere"), "--collect"])


def test_empty_predictions_are_counted_and_penalised_with_the_diagonal(tmp_path):
    data = tmp_path / "data"
    make_synthetic_polyps(data, n=20, size=(32, 32), seed=0, fractions=(0.5, 0.1, 0.4), overwrite=True)
    network = _workflow(POLYP, ["train.json"], "train").parser.get_parsed_content("network_def")
    for parameter in network.parameters():  # equal logits everywhere: argmax is the background, nothing predicted
        torch.nn.init.zeros_(parameter)
    torch.save(network.state_dict(), tmp_path / "model.pt")
    result = evaluate_stage(
        POLYP,
        ["train.json"],
        tmp_path / "eval",
        case_root=data,
        dataset_dir=str(data),
        ckpt_dir=str(tmp_path),
        image_size=[32, 32],
        num_workers=0,
    )
    per_case = result["per_case"]
    labels = json.loads((data / "datalist.json").read_text())["test"]
    has_polyp = [bool(np.asarray(Image.open(data / item["label"])).any()) for item in labels]
    assert any(has_polyp) and per_case["cases"] == [item["image"] for item in labels]
    assert per_case["hd95_penalised"] == [int(h) for h in has_polyp]  # every labelled case missed, counted
    diagonal = math.hypot(32, 32)
    for value, polyp in zip(per_case["metrics"]["hd95"], has_polyp):
        assert value == pytest.approx(diagonal) if polyp else math.isnan(value)
    assert per_case["hd95_nonfinite"] == has_polyp.count(False)
    assert result["hd95"] == pytest.approx(diagonal)  # the mean no longer drops the missed cases


def _teacher_files(root: Path) -> dict[str, Path]:
    """Two checkpoints of polyp_kdas's teacher_def with the same random features: ``zero`` (an output block of
    zeros: equal logits, nothing predicted) and ``polyp`` (a last bias that predicts the polyp everywhere)."""
    root.mkdir(parents=True, exist_ok=True)
    teacher = _workflow(POLYP, ["train.json"], "train").parser.get_parsed_content("teacher_def")
    with torch.no_grad():
        for parameter in teacher.model[2].parameters():  # the last up-sampling block and its residual unit
            parameter.zero_()
    zero = teacher.state_dict()
    polyp = {**zero, "model.2.1.conv.unit0.conv.bias": torch.tensor([-20.0, 20.0])}
    files = {"zero": root / "zero.pt", "polyp": root / "polyp.pt"}
    torch.save(zero, files["zero"])
    torch.save(polyp, files["polyp"])
    return files


def test_several_teacher_checkpoints_make_an_ensemble_plan_and_one_keeps_the_earlier_format(tmp_path):
    data = tmp_path / "data"
    make_synthetic_polyps(data, n=12, size=(32, 32), seed=0, overwrite=True)
    files = _teacher_files(tmp_path / "teachers")
    out = tmp_path / "out"
    members = [str(files["zero"]), str(files["polyp"])]
    common = ["--bundle", "polyp_kdas", "--methods", "none", "kdas", "--dataset_dir", str(data), "--out", str(out)]
    assert compare_methods.main([*common, "--teacher_ckpt", *members, "--no_mlflow", "--plan"]) == 0
    plan = read_plan(out)
    assert plan["teacher_ckpt"] == members and plan["train_teacher"] is False
    assert teacher_checkpoints(plan) == [files["zero"], files["polyp"]]
    assert plan_jobs(plan) == ["teacher", "none:0", "kdas:0"]
    report = markdown_report(collect(out, write=False))
    assert f"Teacher: an ensemble of 2 (mean of logits, feature taps of the first): {', '.join(members)}" in report

    single = make_plan("polyp_kdas", ["none"], data, tmp_path / "one", teacher_ckpt=[files["zero"]])
    assert single["teacher_ckpt"] == str(files["zero"])  # a plain path, as in plans written before ensembles
    assert teacher_checkpoints(single) == [files["zero"]]
    with pytest.raises(SystemExit, match=r"ensemble member 1 .*missing\.pt not found"):
        make_plan("polyp_kdas", ["none"], data, tmp_path / "bad", teacher_ckpt=[files["zero"], tmp_path / "missing.pt"])
    with pytest.raises(SystemExit, match="more than once"):
        make_plan("polyp_kdas", ["none"], data, tmp_path / "bad", teacher_ckpt=[files["zero"]] * 2)


def test_ensemble_overrides_replace_the_teacher_unless_the_method_has_none():
    members = ["/t/a.pt", "/t/b.pt"]
    kdas = ensemble_overrides(POLYP, method_configs(POLYP, "kdas"), members)
    assert kdas == {
        "teacher": "$kd_components.load_ensemble_teacher(@teacher_def, ['/t/a.pt', '/t/b.pt'], @device, "
        "tap_member=0, hint=@teacher_hint)"
    }
    assert ensemble_overrides(POLYP, method_configs(POLYP, "none"), members) == {}
    evaluated = ensemble_overrides(POLYP, ["train.json", "train_teacher.json"], members, True)
    assert evaluated["network"] == kdas["teacher"]
    handlers = json.loads((POLYP / "configs" / "evaluate.json").read_text())["validate#handlers"]
    loader = next(i for i, h in enumerate(handlers) if h["_target_"] == "CheckpointLoader")
    assert {k for k in evaluated if k.endswith("_disabled_")} == {f"validate#handlers#{loader}#_disabled_"}


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory) -> dict:
    """A comparison whose teacher is the ensemble of a network predicting nothing (the tap member) and one
    predicting the polyp everywhere: the teacher job and a KDAS student distilled from the ensemble."""
    root = tmp_path_factory.mktemp("ensemble")
    data = root / "data"
    make_synthetic_polyps(data, n=12, size=(32, 32), seed=0, overwrite=True)
    files = _teacher_files(root / "teachers")
    fast = {"epochs": 1, "image_size": [32, 32], "batch_size": 4, "num_workers": 0}
    plan = make_plan(
        "polyp_kdas", ["kdas"], data, root / "out", teacher_ckpt=[files["zero"], files["polyp"]], track=False, **fast
    )
    teacher = run_job(plan["out"], "teacher")
    student = run_job(plan["out"], "kdas:0")
    return {"root": root, "data": data, "files": files, "plan": plan, "teacher": teacher, "student": student}


def test_the_teacher_job_evaluates_the_ensemble_not_its_first_member(ensemble_run):
    data, files, teacher = ensemble_run["data"], ensemble_run["files"], ensemble_run["teacher"]
    fast = {"image_size": [32, 32], "num_workers": 0, "dataset_dir": str(data)}
    alone = {}
    for name in ("zero", "polyp"):
        alone[name] = evaluate_stage(
            POLYP,
            ["train.json", "train_teacher.json"],
            ensemble_run["root"] / f"eval_{name}",
            case_root=data,
            ckpt_dir=str(files[name].parent),
            ckpt_name=files[name].name,
            **fast,
        )
    assert alone["zero"]["mean_dice"] == 0.0 and alone["polyp"]["mean_dice"] > 0.0
    # mean of logits: (0 + polyp logits) / 2 predicts what the polyp member predicts, not the empty tap member
    ensemble = teacher["sets"]["test"]
    assert ensemble["per_case"]["cases"] == alone["polyp"]["per_case"]["cases"]
    assert ensemble["per_case"]["metrics"]["mean_dice"] == pytest.approx(
        alone["polyp"]["per_case"]["metrics"]["mean_dice"]
    )
    single = _parameters(POLYP, "teacher_def")
    assert teacher["params"] == 2 * single
    assert teacher["weights"] == [str(files["zero"]), str(files["polyp"])]
    assert teacher["weights_md5"] not in (None, _weights_digest(files["zero"]))


def test_a_student_job_distils_from_the_ensemble(ensemble_run):
    plan, files = ensemble_run["plan"], ensemble_run["files"]
    names = method_configs(POLYP, "kdas")
    stage = {
        **plan["override"],
        "dataset_dir": plan["sets"]["test"]["dataset_dir"],
        "teacher_ckpt": str(files["zero"]),
        **ensemble_overrides(POLYP, names, teacher_checkpoints(plan)),
    }
    teacher = _workflow(POLYP, names, "train", **stage).parser.get_parsed_content("teacher")
    assert isinstance(teacher, EnsembleTeacher) and teacher.num_members == 2 and teacher.tap_member == 0
    student = ensemble_run["student"]
    assert student["model"] == "student: kdas" and 0.0 <= student["sets"]["test"]["mean_dice"] <= 1.0
    assert Path(student["weights"]).is_file()
    rows = collect(plan["out"], write=False)["rows"]
    assert [r["model"] for r in rows] == ["teacher", "student: kdas"] and rows[0]["params"] == ensemble_run["teacher"][
        "params"
    ]
    files["polyp"].rename(files["polyp"].with_suffix(".gone"))  # the student job loads every member
    try:
        with pytest.raises(RuntimeError) as failed:  # MONAI's config error, caused by the loader's
            run_job(plan["out"], "kdas:0")
        assert "ensemble teacher member 1 of 2" in str(failed.value.__cause__)
    finally:
        files["polyp"].with_suffix(".gone").rename(files["polyp"])


def _write_results(plan: dict, runs: dict) -> None:
    """Write fake job results (``_fake_run``) where ``run_job`` would, stamped with the plan's id."""
    for job, run in runs.items():
        folder = job_dir(plan, job)
        folder.mkdir(parents=True, exist_ok=True)
        method = job.partition(":")[0]
        model = method if method == TEACHER_JOB else f"student: {method}"
        record = {**run, "job": job, "plan_id": plan["plan_id"], "method": method, "model": model}
        (folder / RESULT_FILE).write_text(json.dumps(record))


def test_join_adds_another_plans_students_as_rows_paired_with_the_same_baseline(tmp_path):
    data = tmp_path / "data"
    make_synthetic_polyps(data, n=12, size=(32, 32), seed=0, overwrite=True)
    files = _teacher_files(tmp_path / "teachers")
    copy = tmp_path / "teachers" / "copy.pt"
    shutil.copy(files["zero"], copy)  # the same weights in another file: the same teacher
    settings = {"seeds": [0, 1], "track": False, "n_resamples": 2000, "epochs": 3}
    plan_a = make_plan("polyp_kdas", ["none", "kdas"], data, tmp_path / "a", teacher_ckpt=files["zero"], **settings)
    plan_b = make_plan("polyp_kdas", ["kdas"], data, tmp_path / "b", teacher_ckpt=copy, **{**settings, "lr": 0.01})
    plan, results = _fake_comparison()
    good = {k.replace("good", "kdas"): v for k, v in results.items() if k.split(":")[0] in ("teacher", "none", "good")}
    _write_results(plan_a, good)
    _write_results(plan_b, {"kdas:0": results["bad:0"]})  # seed 1 not finished

    joined = collect(tmp_path / "a", join=[tmp_path / "b"])
    label = "kdas [lr=0.01]"
    assert [r["model"] for r in joined["rows"]] == ["teacher", "student: none", "student: kdas", f"student: {label}"]
    assert joined["missing_jobs"] == ["b/kdas:1"]
    assert joined["joined"] == [{"out": plan_b["out"], "plan_id": plan_b["plan_id"], "rows": {"kdas": label}}]
    # the joined row is the same statistic as if its runs had been a method of the first plan
    direct = summarize(
        {**plan, "methods": ["none", "bad"], "seeds": [0, 1]},
        {k: v for k, v in results.items() if k in ("teacher", "none:0", "none:1", "bad:0")},
        n_resamples=2000,
    )
    assert joined["rows"][3]["sets"]["test"]["metrics"]["mean_dice"]["delta"] == pytest.approx(
        direct[2]["sets"]["test"]["metrics"]["mean_dice"]["delta"]
    )
    assert joined["rows"][3]["sets"]["test"]["metrics"]["mean_dice"]["verdict"] == "worse"
    assert joined["rows"][3]["seeds"] == [0]
    versus = {(e["set"], e["metric"]): e for e in joined["versus_own_method"]}  # the joined row against kdas
    own = versus[("test", "mean_dice")]
    assert own["row"] == label and own["against"] == "kdas" and own["verdict"] == "worse"
    assert own["delta"] == pytest.approx(-0.08, abs=0.01) and own["ci_low"] < -0.08 < own["ci_high"] < 0
    assert versus[("test", "hd95")]["delta"] == pytest.approx(5.0) and versus[("test", "hd95")]["verdict"] == "worse"
    report = (tmp_path / "a" / "joined" / "results.md").read_text()
    assert f"Joined from {plan_b['out']} (plan {plan_b['plan_id']}" in report and f"| student: {label} |" in report
    assert f"| {label} | kdas | test | mean Dice | -0.08" in report
    assert not (tmp_path / "a" / "results.md").exists()  # the first plan's own report is not replaced

    other_teacher = make_plan("polyp_kdas", ["kdas"], data, tmp_path / "c", teacher_ckpt=files["polyp"], **settings)
    with pytest.raises(SystemExit, match="their teachers differ"):
        collect(tmp_path / "a", write=False, join=[other_teacher["out"]])
    other_unit = make_plan(
        "polyp_kdas", ["kdas"], data, tmp_path / "d", teacher_ckpt=files["zero"], **settings, hd95_unit="mm"
    )
    with pytest.raises(SystemExit, match="their hd95_unit differ"):
        collect(tmp_path / "a", write=False, join=[other_unit["out"]])
    with pytest.raises(SystemExit, match="already in the table"):
        collect(tmp_path / "a", write=False, join=[tmp_path / "b", tmp_path / "b"])
    with pytest.raises(SystemExit, match="add --collect"):
        compare_methods.main(["--out", str(tmp_path / "a"), "--only_job", "none:0", "--join", str(tmp_path / "b")])
    assert compare_methods.main(["--out", str(tmp_path / "a"), "--collect", "--join", str(tmp_path / "b")]) == 1
    long = {**plan_b, "override": {**plan_b["override"], "distill#schedule": {"_target_": "x" * 40}}}
    assert join_label(plan_a, long, "kdas") == 'kdas [lr=0.01, distill#schedule={"_target_": "xxxxxxx...]'


def test_extend_adds_seeds_and_methods_and_keeps_the_finished_jobs(tmp_path):
    """A one-seed screen grows to three seeds and one more method without re-running its job; any other change,
    or dropping a planned job, is refused; --extend needs --plan."""
    data = tmp_path / "data"
    make_synthetic_polyps(data, n=12, size=(32, 32), seed=0, overwrite=True)
    fast = {"epochs": 1, "image_size": [32, 32], "batch_size": 4, "num_workers": 0, "track": False}
    out = tmp_path / "out"
    screen = make_plan("polyp_kdas", ["none"], data, out, seeds=[0], **fast)
    run_job(out, "teacher")
    run_job(out, "none:0")
    grown = make_plan("polyp_kdas", ["none", "logit_kd"], data, out, seeds=[0, 1, 2], extend=True, **fast)
    assert grown["plan_id"] == screen["plan_id"] and read_plan(out) == grown
    assert plan_jobs(grown) == ["teacher", "none:0", "logit_kd:0", "none:1", "logit_kd:1", "none:2", "logit_kd:2"]
    assert (
        make_plan("polyp_kdas", ["none"], data, tmp_path / "fresh", seeds=[0, 1, 2], **fast)["plan_id"]
        != (screen["plan_id"])
    )  # without --extend the seeds are part of the plan's identity
    missing = collect(out)["missing_jobs"]
    assert "none:0" not in missing and "teacher" not in missing and "none:1" in missing
    with pytest.raises(SystemExit, match="other override"):
        make_plan("polyp_kdas", ["none"], data, out, seeds=[0, 1, 2], extend=True, **{**fast, "epochs": 2})
    with pytest.raises(SystemExit, match=r"add back the seeds \[2\]"):
        make_plan("polyp_kdas", ["none", "logit_kd"], data, out, seeds=[0, 1], extend=True, **fast)
    assert read_plan(out) == grown  # a refused extension leaves the plan as it was
    with pytest.raises(SystemExit, match="no plan.json"):
        make_plan("polyp_kdas", ["none"], data, tmp_path / "empty", extend=True, **fast)
    with pytest.raises(SystemExit, match="--extend goes with --plan"):
        compare_methods.main(["--out", str(out), "--collect", "--extend"])
