"""The markdown of a comparison (``results.md``): the settings, one section of tables per evaluated set, the joined
rows against their own method, and notes on what the values, CIs and verdicts mean."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from kd_components import stats

from .jobs import TEACHER_JOB
from .plan import PRIMARY_SET, teacher_checkpoints
from .summary import BOOTSTRAP_SEED, _baseline_method

__all__ = ["EXTRA_LABELS", "footnotes", "markdown_table", "markdown_report"]


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _signed(value: float, digits: int = 4) -> str:
    """``value`` with its sign; a non-zero value too small for ``digits`` decimals in scientific notation (so
    that a CI bound just above 0 does not read ``+0.0000``)."""
    if value is None or not math.isfinite(value):
        return "n/a"
    if value != 0 and abs(value) < 0.5 * 10**-digits:
        return f"{value:+.1e}"
    return f"{value:+.{digits}f}"


EXTRA_LABELS = {"cldice": "clDice"}
"""Column titles of extra metrics (by their ``val_<name>_raw.csv`` name); others are shown as named."""


def _label(metric: str, hd95_unit: str) -> str:
    if metric == "mean_dice":
        return "mean Dice"
    if metric == "mean_iou":
        return "IoU"
    if metric == "hd95":
        return f"HD95 ({hd95_unit})"
    for prefix, title in (("dice_", "Dice "), ("iou_", "IoU "), ("hd95_", "HD95 ")):
        if metric.startswith(prefix):
            return title + metric[len(prefix) :]
    return EXTRA_LABELS.get(metric, metric)


def _digits(metric: str) -> int:
    return 2 if not stats.higher_is_better(metric) else 4


def _legacy_table(rows: Sequence[Mapping[str, Any]], hd95_unit: str) -> str:
    """The single-run table of rows without per-case statistics (as written by earlier versions)."""
    classes = list(rows[0]["dice"]) if rows else []
    extras = list(rows[0].get("extra", {})) if rows else []
    baseline = next((r for r in rows if r["model"] == "student: none"), None)
    if baseline is None:
        baseline = next((r for r in rows if r["model"].startswith("student: none+")), None)
    header = [
        "model",
        *[f"Dice {c}" for c in classes],
        "mean Dice",
        "Δ vs none",
        "IoU",
        f"HD95 ({hd95_unit})",
        *[EXTRA_LABELS.get(e, e) for e in extras],
        "params",
        "train s",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        skip = baseline is None or r is baseline or r["model"] == TEACHER_JOB
        cells = [
            r["model"],
            *[_fmt(r["dice"][c]) for c in classes],
            _fmt(r["mean_dice"]),
            "" if skip else f"{r['mean_dice'] - baseline['mean_dice']:+.4f}",
            _fmt(r["mean_iou"]),
            _fmt(r["hd95"], 2),
            *[_fmt(r.get("extra", {}).get(e, float("nan"))) for e in extras],
            f"{r['params']:,}",
            _fmt(r["train_s"], 0),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean_sd_cell(values: Mapping[str, Any], digits: int) -> str:
    if len(values["per_seed"]) > 1 and math.isfinite(values["sd"]):
        return f"{_fmt(values['mean'], digits)} ± {_fmt(values['sd'], digits)}"
    return _fmt(values["mean"], digits)


def _penalty_cell(entry: Mapping[str, Any]) -> str:
    counts = entry["hd95_penalised"] if entry["hd95_penalised"] is not None else entry["hd95_nonfinite"]
    return ", ".join(str(c) for c in counts) + f" of {entry['cases']}"


def footnotes(rows: Sequence[Mapping[str, Any]], hd95_unit: str = "px", n_resamples: int = 10000) -> str:
    """The notes under a table of :func:`markdown_table`: what the values, CIs, verdicts and HD95 penalty mean.

    Args:
        rows: result rows of :func:`summarize`.
        hd95_unit: the HD95 unit.
        n_resamples: bootstrap resamples used.
    """
    seeds = sorted({s for r in rows if r["method"] != TEACHER_JOB for s in r["seeds"] if s is not None})
    teacher = next((r for r in rows if r["method"] == TEACHER_JOB), None)
    baseline = _baseline_method([r["method"] for r in rows]) or "none"
    penalty = all(e["hd95_penalised"] is not None for r in rows for e in r["sets"].values())
    notes = [
        f"- Values: mean ± sd over the seeds {seeds} of each run's mean over the cases"
        + (
            f"; the teacher is one run (seed {teacher['seeds'][0]})."
            if teacher and teacher["seeds"] and teacher["seeds"][0] is not None
            else "; the teacher is one (given) checkpoint."
        ),
        f"- Δ vs {baseline}: mean over the cases of the per-case difference to the student alone, each model's "
        f"per-case metric averaged over its seeds first; [95 % CI]: percentile bootstrap over the cases "
        f"({n_resamples} resamples, seed {BOOTSTRAP_SEED}). Verdict: better / worse when the CI excludes 0 on that "
        "side (for HD95 lower is better), no evidence otherwise. The teacher's Δ is the teacher–student gap.",
        f"- Gap closed: (distilled − {baseline}) / (teacher − {baseline}) on the mean values; n/a when the teacher is "
        "not better than the student alone (nothing to close).",
    ]
    if penalty:
        notes.append(
            "- HD95: a class whose prediction is empty while its label is not (or the reverse) scores the diagonal "
            f"of that case's evaluated image, sqrt(Σ (size × spacing)²), in {hd95_unit}, instead of being left out; "
            "'HD95 penalised' counts those cases in each run (per seed). A class empty in both is not scored."
        )
    else:
        notes.append(
            "- HD95: this bundle's evaluate.json has no empty_penalty, so cases with an empty prediction "
            "(non-finite HD95) are LEFT OUT of the HD95 mean; 'HD95 non-finite' counts them in each run (per seed)."
        )
    return "\n".join(notes)


def markdown_table(
    rows: Sequence[Mapping[str, Any]],
    hd95_unit: str = "px",
    set_name: str = PRIMARY_SET,
    notes: bool = True,
    n_resamples: int | None = None,
) -> str:
    """The markdown tables of one evaluated set: the teacher–student gap, every metric per model (mean ± sd over
    seeds), then each model's Δ vs the student alone (``none``, else the first ``none+<override>``) per metric
    with its 95 % CI, verdict and gap closed; with ``notes``, what these mean.

    Rows without per-case statistics (earlier versions' rows) give the single-run table of earlier versions.

    Args:
        rows: result rows of :func:`compare` / :func:`summarize`.
        hd95_unit: the HD95 column's unit: ``"px"``, ``"vox"`` (volumes of unknown spacing) or ``"mm"``.
        set_name: the evaluated set (``"test"``: the ``--dataset_dir`` test split; else an ``--eval_sets`` name).
        notes: append :func:`footnotes`.
        n_resamples: the bootstrap resamples named in the notes; None: those the rows were computed with.
    """
    if not rows:
        return "(no finished run)"
    if any("sets" not in r for r in rows):
        return _legacy_table(rows, hd95_unit)
    n_resamples = n_resamples or int(rows[0].get("n_resamples", 10000))
    rows = [r for r in rows if set_name in r["sets"]]
    if not rows:
        return f"(no finished run was evaluated on {set_name!r})"
    first = rows[0]["sets"][set_name]
    metrics = [m for m in first["metrics"] if m.startswith("dice_") or m in first["main"]]
    main = set_name == PRIMARY_SET
    penalty = all(r["sets"][set_name]["hd95_penalised"] is not None for r in rows)
    baseline_method = _baseline_method([r["method"] for r in rows])
    teacher = next((r for r in rows if r["method"] == TEACHER_JOB), None)
    lines = []
    if teacher is not None and baseline_method is not None:
        gap = teacher["sets"][set_name]["metrics"].get("mean_dice")
        if gap is not None:
            judged = {
                "better": "the teacher is better than the student alone",
                "worse": "the teacher is WORSE than the student alone: nothing to distil",
                "no evidence": "no evidence that the teacher is better than the student alone: little to distil",
            }.get(gap["verdict"], "")
            lines += [
                f"Teacher − student alone ({baseline_method}), mean Dice: {_signed(gap['delta'])} "
                f"[95 % CI {_signed(gap['ci_low'])}, {_signed(gap['ci_high'])}] over {gap['n_paired']} cases: "
                f"{judged}.",
                "",
            ]
    header = ["model", *[_label(m, hd95_unit) for m in metrics], "HD95 penalised" if penalty else "HD95 non-finite"]
    if main:
        header += ["params", "train s"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        entry = r["sets"][set_name]
        cells = [r["model"]]
        cells += [_mean_sd_cell(entry["metrics"][m], _digits(m)) if m in entry["metrics"] else "n/a" for m in metrics]
        cells.append(_penalty_cell(entry))
        if main:
            cells += [f"{r['params']:,}", _fmt(r["train_s"], 0)]
        lines.append("| " + " | ".join(cells) + " |")
    if baseline_method is not None:
        delta_metrics = [
            m for m in metrics if not (m.startswith("dice_") and sum(k.startswith("dice_") for k in metrics) == 1)
        ]
        lines += [
            "",
            f"| model | metric | Δ vs {baseline_method} [95 % CI] | verdict | gap closed |",
            "|---|---|---|---|---|",
        ]
        for r in rows:
            if r["method"] == baseline_method:
                continue
            for m in delta_metrics:
                values = r["sets"][set_name]["metrics"].get(m)
                if values is None:
                    continue
                d = _digits(m)
                gap_closed = values["gap_closed"]
                gap = (
                    ""
                    if r["method"] == TEACHER_JOB
                    else ("n/a" if not math.isfinite(gap_closed) else f"{gap_closed:.0%}")
                )
                lines.append(
                    f"| {r['model']} | {_label(m, hd95_unit)} | {_signed(values['delta'], d)} "
                    f"[{_signed(values['ci_low'], d)}, {_signed(values['ci_high'], d)}] | {values['verdict']} | {gap} |"
                )
    if notes:
        lines += ["", footnotes(rows, hd95_unit, n_resamples)]
    return "\n".join(lines)


def markdown_report(results: Mapping[str, Any]) -> str:
    """The whole ``results.md``: settings, one section per evaluated set (:func:`markdown_table`), missing jobs.

    Args:
        results: the content of ``results.json`` (:func:`collect`).
    """
    plan = results["settings"]
    rows = results["rows"]
    unit = plan["hd95_unit"]
    budget = ", ".join(f"{k}={json.dumps(v)}" for k, v in plan["override"].items()) or "the bundle's defaults"
    members = teacher_checkpoints(plan)
    teacher = (
        f"an ensemble of {len(members)} (mean of logits, feature taps of the first): {', '.join(map(str, members))}"
        if len(members) > 1
        else str(members[0])
    )
    lines = [
        f"# {plan['bundle']}: {', '.join(plan['methods'])} (seeds {plan['seeds']})",
        "",
        f"Teacher: {teacher}"
        + (" (trained here, first seed)" if plan["train_teacher"] else " (given)")
        + f"; settings: {budget}"
        + (f", teacher epochs {plan['teacher_epochs']}" if plan["teacher_epochs"] else "")
        + ".",
    ]
    environments = {json.dumps(r.get("environment", {}), sort_keys=True) for r in results["runs"]}
    if len(environments) > 1:
        lines += [
            "",
            "Note: the runs used different environments (threads / device / torch): " + "; ".join(sorted(environments)),
        ]
    for record in results.get("joined", []):
        names = "; ".join(f"{m} as `{label}`" for m, label in record["rows"].items())
        lines += ["", f"Joined from {record['out']} (plan {record['plan_id']}, same teacher and test cases): {names}."]
    if results.get("missing_jobs"):
        lines += ["", f"**Missing jobs** (not finished, or from another plan): {', '.join(results['missing_jobs'])}."]
    for set_name, entry in plan["sets"].items():
        lines += [
            "",
            f"## {set_name}: {entry['dataset_dir']} ({entry['split']}, "
            f"{max((r['sets'][set_name]['cases'] for r in rows if set_name in r['sets']), default=0)} cases)",
            "",
            markdown_table(rows, unit, set_name, notes=False, n_resamples=plan["n_resamples"]),
        ]
    versus = results.get("versus_own_method", [])
    if versus:
        lines += [
            "",
            "## Joined rows against the same method of the first plan",
            "",
            "| row | against | set | metric | Δ [95 % CI] | verdict |",
            "|---|---|---|---|---|---|",
        ]
        for e in versus:
            digits = _digits(e["metric"])
            lines.append(
                f"| {e['row']} | {e['against']} | {e['set']} | {_label(e['metric'], unit)} | "
                f"{_signed(e['delta'], digits)} [{_signed(e['ci_low'], digits)}, {_signed(e['ci_high'], digits)}] | "
                f"{e['verdict']} |"
            )
    lines += ["", footnotes(rows, unit, plan["n_resamples"]) if rows and all("sets" in r for r in rows) else ""]
    return "\n".join(lines).rstrip() + "\n"
