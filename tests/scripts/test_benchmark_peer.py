"""scripts/benchmark_peer.py: skipped cleanly without torchdistill; with it (its own environment, see the script),
the same step in both libraries on a tiny setting: equal losses, finite ratios. No timing assertions."""

from __future__ import annotations

import json
import math

import pytest

from scripts import benchmark_peer

HAS_TORCHDISTILL = benchmark_peer.torchdistill_version() is not None


@pytest.mark.skipif(HAS_TORCHDISTILL, reason="torchdistill is importable here")
def test_skipped_without_torchdistill(tmp_path, capsys) -> None:
    assert benchmark_peer.main(["--quick", "--out", str(tmp_path)]) == 0
    assert "torchdistill is not importable" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not HAS_TORCHDISTILL, reason="torchdistill is not importable (see scripts/benchmark_peer.py)")
def test_same_step_in_both_libraries(tmp_path) -> None:
    assert benchmark_peer.main(["--quick", "--threads", "1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "benchmark_peer.json").read_text())
    assert data["image_size"] == [32, 32] and data["batch_size"] == 2
    assert set(data["methods"]) == set(benchmark_peer.METHODS)
    for method in data["methods"].values():
        check = method["same_step"]
        assert check["loss_ours"] == pytest.approx(check["loss_theirs"], rel=1e-5)
        assert check["max_weight_diff"] <= 1e-3  # AdamW's first step is lr * sign(g): a rounding may flip a tiny g
        for key in ("ours_over_floor", "theirs_over_floor"):
            assert math.isfinite(method[key]) and method[key] > 0
        assert method["ours_over_theirs"]["median"] > 0
    assert "| logit_kd |" in (tmp_path / "benchmark_peer.md").read_text()
