"""The quickstart end to end at a tiny size: teacher, both students over two seeds as parallel jobs, the summary."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import quickstart  # noqa: E402


def test_quickstart_runs_every_job_and_reports_the_comparison(tmp_path, capsys):
    out = tmp_path / "qs"
    argv = ["--out", str(out), "--n", "30", "--image_size", "32", "32", "--epochs", "2", "--teacher_epochs", "2"]
    argv += ["--seeds", "0", "1", "--labelled_fraction", "0.25", "--no_mlflow", "--workers", "2"]
    assert quickstart.main(argv) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["missing_jobs"] == []
    rows = {row["method"]: row for row in results["rows"]}
    assert set(rows) == {"teacher", quickstart.STUDENT_ALONE, quickstart.DISTILLED}
    for method in (quickstart.STUDENT_ALONE, quickstart.DISTILLED):
        assert rows[method]["seeds"] == [0, 1]
        assert (out / method / "seed1" / "log.txt").is_file(), "each job keeps its own log"
    assert "epoch   2/2" in printed, "one progress line per epoch"
    assert "distilled - student alone" in printed and "95 % CI" in printed
    # the summary quotes the comparison's own numbers
    dice = rows[quickstart.DISTILLED]["sets"]["test"]["metrics"]["mean_dice"]
    assert f"{dice['delta']:+.3f}" in printed
    # the printed summary is built from results.json
    assert quickstart.summary(results) in printed
