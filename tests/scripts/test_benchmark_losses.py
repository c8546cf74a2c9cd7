"""scripts/benchmark_losses.py on tiny shapes: every exported loss is benchmarked; well-formed table and JSON.

No timing assertions: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import json
import math

import torch

from scripts import benchmark_losses as bl


def test_every_exported_loss_is_covered() -> None:
    assert set(bl.exported_losses()) <= bl.covered_losses()


def test_quick_run_table_and_json(tmp_path) -> None:
    assert bl.main(["--quick", "--threads", "1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "losses.json").read_text())
    rows = data["rows"]
    assert {r["dims"] for r in rows} == {2, 3} and len(rows) == 2 * len(bl.SPECS)
    for row in rows:
        assert "error" not in row, row
        assert math.isfinite(row["time"]["median_ms"]) and row["time"]["median_ms"] > 0, row["loss"]
        assert row["peak_mib"] >= 0 and row["trainable_params"] >= 0
    trainable = {r["loss"] for r in rows if r["trainable_params"] > 0}
    assert {"FitNetLoss (1×1 adapter)", "MGDLoss"} <= trainable
    text = (tmp_path / "losses.md").read_text()
    assert "| loss | grid (positions) | fwd+bwd median (ms) | IQR (ms) | peak memory (MiB) |" in text
    assert "#### 2D: batch 2, 8 feature channels" in text and "#### 3D: batch 1, 4 feature channels" in text
    for spec in bl.SPECS:
        assert f"| {spec.name} |" in text


def test_too_costly_default_grid_runs_smaller_and_says_why() -> None:
    spec = next(s for s in bl.SPECS if s.name == "KDASAttentionLoss")
    shape = bl.Shape(1, 4, (16, 16, 16))
    row = bl.run_spec(spec, shape, torch.device("cpu"), warmup=0, repeats=1, max_cost=1e5)
    assert row["grid"] < 32 and row["cost"] <= 1e5 < row["cost_at_default"]
    assert "too costly" in row["note"] and "B·N²" in row["note"] and "less work" in row["note"]
