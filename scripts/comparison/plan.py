"""The plan of a comparison (``<out>/plan.json``): every setting, checked before any training; the evaluated sets;
the teacher (one checkpoint, or several that make an ensemble) and the config overrides that use the ensemble."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .stages import BUNDLES, PARAPHRASER_CONFIG, _workflow, available_methods, method_configs
from .tracking import _experiment_id, _tracking

__all__ = ["PLAN_FILE", "PRIMARY_SET", "make_plan", "read_plan", "teacher_checkpoints", "ensemble_overrides"]

PLAN_FILE = "plan.json"
PRIMARY_SET = "test"
"""The name of the ``--dataset_dir`` test split among the evaluated sets."""


def _student_seeds(seeds: Sequence[int] | None, override: dict[str, Any]) -> list[int]:
    """The seeds: ``seeds``, else the ``seed`` override (removed from ``override``), else 0."""
    single = override.pop("seed", None)
    if seeds is None or len(seeds) == 0:
        seeds = [0 if single is None else int(single)]
    seeds = [int(s) for s in seeds]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds are repeated: {seeds}")
    return seeds


def _parse_eval_sets(eval_sets: Mapping[str, str | Path] | Sequence[str] | None) -> dict[str, Path]:
    """``{name: folder}`` from a mapping or ``name=path`` strings."""
    if not eval_sets:
        return {}
    if not isinstance(eval_sets, Mapping):
        parsed: dict[str, str] = {}
        for item in eval_sets:
            name, sep, path = str(item).partition("=")
            if not sep or not name or not path:
                raise SystemExit(f"--eval_sets takes name=path pairs, got {item!r}")
            if name in parsed:
                raise SystemExit(f"--eval_sets names {name!r} twice")
            parsed[name] = path
        eval_sets = parsed
    out = {}
    for name, path in eval_sets.items():
        if not name.replace("_", "").replace("-", "").isalnum() or name == PRIMARY_SET:
            raise SystemExit(
                f"an --eval_sets name must be letters, digits, '_' or '-', and not {PRIMARY_SET!r}: {name!r}"
            )
        folder = Path(path).resolve()
        if not (folder / "datalist.json").is_file():
            raise SystemExit(f"--eval_sets {name}: {folder} holds no datalist.json (prepare the dataset first)")
        out[name] = folder
    return out


def _absolute_item(item: Mapping[str, Any], root: Path) -> dict[str, Any]:
    """A datalist item with every relative path that exists under ``root`` made absolute."""
    out = {}
    for key, value in item.items():
        if isinstance(value, str) and not os.path.isabs(value) and (root / value).exists():
            value = str((root / value).resolve())
        out[key] = value
    return out


def _eval_set_entry(name: str, folder: Path, out: Path) -> dict[str, str]:
    """How a set is evaluated: its own ``datalist.json`` when it has a non-empty ``test`` split; else a datalist
    written to ``<out>/eval_sets/<name>/datalist.json`` whose ``test`` split holds every labelled item of all its
    splits (absolute paths; other top-level entries, e.g. ``metadata``, are kept)."""
    datalist = json.loads((folder / "datalist.json").read_text())
    if isinstance(datalist.get("test"), list) and datalist["test"]:
        return {"dataset_dir": str(folder), "datalist": str(folder / "datalist.json"), "split": "test"}
    items = [
        _absolute_item(item, folder)
        for value in datalist.values()
        if isinstance(value, list)
        for item in value
        if isinstance(item, Mapping) and "label" in item
    ]
    if not items:
        raise SystemExit(f"--eval_sets {name}: {folder / 'datalist.json'} has no labelled item to evaluate")
    derived = {k: v for k, v in datalist.items() if not isinstance(v, list)}
    derived["test"] = items
    path = out / "eval_sets" / name / "datalist.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(derived, indent=2))
    return {"dataset_dir": str(folder), "datalist": str(path), "split": "all labelled items"}


def _plan_id(plan: Mapping[str, Any]) -> str:
    content = {k: v for k, v in plan.items() if k not in ("plan_id", "created")}
    return hashlib.sha1(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:12]


def make_plan(
    bundle_name: str,
    methods: Sequence[str],
    dataset_dir: str | Path,
    out: str | Path,
    seeds: Sequence[int] | None = None,
    teacher_ckpt: str | Path | Sequence[str | Path] | None = None,
    teacher_epochs: int | None = None,
    track: bool = True,
    paraphraser_dir: str | Path | None = None,
    hd95_unit: str = "px",
    eval_sets: Mapping[str, str | Path] | Sequence[str] | None = None,
    n_resamples: int = 10000,
    tracking_uri: str | None = None,
    deterministic: bool = True,
    extend: bool = False,
    **override: Any,
) -> dict[str, Any]:
    """Check the settings of a comparison and write them to ``<out>/plan.json``; trains nothing.

    Args:
        bundle_name: a folder under ``bundles/``.
        methods: method names (``configs/methods/<name>.json``, ``a+b`` merges two; ``["all"]``: every method).
        dataset_dir: the prepared data folder (holding ``datalist.json``); its ``test`` split is the main set.
        out: the output folder.
        seeds: the students' seeds (one run per method and seed); None: the ``seed`` override, else 0. The teacher
            and paraphrasers are trained once, with the first seed.
        teacher_ckpt: an already trained teacher, or several checkpoints of ``teacher_def`` that make an ensemble
            teacher (see :func:`ensemble_overrides`); trained into ``<out>/teacher`` when None. The plan's
            ``teacher_ckpt`` is one path (a single checkpoint, as in earlier plans) or a list of paths (an ensemble).
        teacher_epochs: the teacher's epochs (default: the same as the students').
        track: record each training as an MLflow run in the experiment ``compare_<bundle>``.
        paraphraser_dir: paraphrasers already trained for this teacher; when None and the bundle has a
            ``train_paraphraser.json``, they are trained once, after the teacher.
        hd95_unit: the unit of the HD95 column: ``"px"``, ``"vox"`` (volumes of unknown spacing) or ``"mm"``.
        eval_sets: further prepared datasets, ``{name: folder}`` or ``["name=folder", ...]``.
        n_resamples: bootstrap resamples of the CIs.
        tracking_uri: the MLflow store; None: ``sqlite:///<out>/mlruns.db``.
        deterministic: run the jobs with ``torch.use_deterministic_algorithms(True, warn_only=True)``.
        extend: add methods or seeds to the plan already in ``out`` (e.g. two more seeds after a one-seed screen):
            every other setting must be the same and every planned job must stay; the plan keeps its ``plan_id``, so
            the jobs that have finished still count.
        override: config overrides shared by every stage (``epochs``, ``image_size``, ``batch_size``...).

    Returns:
        the plan (also in ``<out>/plan.json``).
    """
    bundle = BUNDLES / bundle_name
    if not (bundle / "configs" / "train.json").is_file():
        raise SystemExit(f"no bundle {bundle_name!r} in {BUNDLES}")
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    override = dict(override)
    seeds = _student_seeds(seeds, override)
    methods = list(methods)
    if methods == ["all"]:
        methods = available_methods(bundle)
    if not methods or len(set(methods)) != len(methods):
        raise SystemExit(f"--methods must name each method once, got {methods}")
    for method in methods:  # fail before hours of training, not after
        method_configs(bundle, method)
    dataset_dir = Path(dataset_dir).resolve()
    if not (dataset_dir / "datalist.json").is_file():
        raise SystemExit(f"--dataset_dir {dataset_dir} holds no datalist.json (prepare the data first)")
    sets = {
        PRIMARY_SET: {"dataset_dir": str(dataset_dir), "datalist": str(dataset_dir / "datalist.json"), "split": "test"}
    }
    for name, folder in _parse_eval_sets(eval_sets).items():
        sets[name] = _eval_set_entry(name, folder, out)
    if isinstance(teacher_ckpt, (str, Path)):
        teacher_ckpt = [teacher_ckpt]
    trained_teacher = teacher_ckpt is None or len(teacher_ckpt) == 0
    if trained_teacher:
        teacher_paths = [out / "teacher" / "models" / "teacher.pt"]
    else:
        teacher_paths = [Path(p).resolve() for p in teacher_ckpt]
        for i, path in enumerate(teacher_paths):
            if not path.is_file():
                which = f"teacher checkpoint {path}" if len(teacher_paths) == 1 else f"ensemble member {i} {path}"
                raise SystemExit(f"{which} not found: train it first or omit --teacher_ckpt")
        repeated = sorted({str(p) for p in teacher_paths if teacher_paths.count(p) > 1})
        if repeated:
            raise SystemExit(f"--teacher_ckpt lists {repeated} more than once: give each ensemble member once")
    teacher_path = teacher_paths[0]
    train_paraphraser = paraphraser_dir is None and (bundle / "configs" / PARAPHRASER_CONFIG).is_file()
    if train_paraphraser:
        paraphraser_dir = teacher_path.parent if trained_teacher else out / "paraphraser" / "models"
    plan: dict[str, Any] = {
        "bundle": bundle_name,
        "methods": methods,
        "seeds": seeds,
        "sets": sets,
        # one path: the plain teacher (the format of earlier plans); several: an ensemble of those checkpoints
        "teacher_ckpt": str(teacher_path) if len(teacher_paths) == 1 else [str(p) for p in teacher_paths],
        "train_teacher": trained_teacher,
        "teacher_epochs": teacher_epochs,
        "paraphraser_dir": None if paraphraser_dir is None else str(Path(paraphraser_dir).resolve()),
        "train_paraphraser": train_paraphraser,
        "hd95_unit": hd95_unit,
        "n_resamples": int(n_resamples),
        "track": bool(track),
        "tracking_uri": tracking_uri or f"sqlite:///{out / 'mlruns.db'}",
        "experiment_name": f"compare_{bundle_name}",
        "deterministic": bool(deterministic),
        "override": override,
        "out": str(out),
    }
    plan["plan_id"] = _extended_plan_id(plan, out) if extend else _plan_id(plan)
    (out / PLAN_FILE).write_text(json.dumps(plan, indent=2))
    if plan["track"]:
        # create the MLflow store and the experiment now, once: jobs started at the same moment on a new SQLite
        # store race to create its tables, and all but one fail
        _experiment_id(_tracking(plan), out / "mlruns")
    return plan


EXTENDABLE = ("methods", "seeds")
"""The plan settings that ``extend`` may grow; any other change makes a new plan."""


def _extended_plan_id(plan: Mapping[str, Any], out: Path) -> str:
    """The ``plan_id`` of the plan in ``out`` that ``plan`` extends with more methods or seeds.

    Raises:
        SystemExit: when ``out`` has no plan, a setting other than the methods and seeds differs, or a planned
            method or seed is left out.
    """
    old = read_plan(out)
    new = json.loads(json.dumps(plan))  # the types the plan has once written
    differ = sorted(k for k in {*new, *old} - {*EXTENDABLE, "plan_id"} if new.get(k) != old.get(k))
    if differ:
        raise SystemExit(
            f"--extend: the plan in {out} has other {', '.join(differ)}; only --methods and --seeds can grow "
            "(plan into a new --out to change anything else)"
        )
    dropped = [f"{k} {sorted(set(old[k]) - set(new[k]))}" for k in EXTENDABLE if not set(old[k]) <= set(new[k])]
    if dropped:
        raise SystemExit(f"--extend keeps every job of the plan in {out}: add back the {'; '.join(dropped)}")
    return old["plan_id"]


def read_plan(out: str | Path) -> dict[str, Any]:
    """The plan of a comparison folder (written by :func:`make_plan`, ``--plan`` or a sequential run).

    Args:
        out: the comparison's output folder.
    """
    path = Path(out).resolve() / PLAN_FILE
    if not path.is_file():
        raise SystemExit(
            f"no {PLAN_FILE} in {path.parent}: write one with --plan (or run the comparison once without --plan)"
        )
    return json.loads(path.read_text())


def teacher_checkpoints(plan: Mapping[str, Any]) -> list[Path]:
    """The teacher checkpoint(s) of a plan: one path for a plain teacher, several for an ensemble teacher.

    Args:
        plan: a plan from :func:`make_plan` / :func:`read_plan` (its ``teacher_ckpt`` is a path or a list of paths).
    """
    value = plan["teacher_ckpt"]
    return [Path(value)] if isinstance(value, str) else [Path(p) for p in value]


def ensemble_overrides(
    bundle: Path, names: Sequence[str], checkpoints: Sequence[str | Path], evaluated: bool = False
) -> dict[str, Any]:
    """Config overrides that make the ensemble of ``checkpoints`` the teacher of a bundle's stage.

    The bundle's ``teacher`` becomes ``kd_components.load_ensemble_teacher(@teacher_def, [checkpoints], @device,
    tap_member=0, hint=@teacher_hint)`` (the mean of the members' logits, the first member's feature taps), unless
    the merged configs set ``"teacher": null`` (the student alone keeps no teacher). With ``evaluated``, the
    ensemble is also the network that ``evaluate.json`` evaluates: ``network`` is overridden by it, and each
    ``CheckpointLoader`` of ``validate#handlers`` that loads into ``@network`` is disabled (``_disabled_``: the
    members are loaded from their own files; one file loaded into the ensemble would not fit it).

    Args:
        bundle: the bundle folder.
        names: the stage's config files under ``configs/`` (``evaluate.json`` is appended with ``evaluated``).
        checkpoints: the members' state-dict files of ``teacher_def``, tap member first.
        evaluated: override the evaluated network too (the teacher job's evaluation of the ensemble).

    Returns:
        ``{"teacher": ...}`` (or ``{}`` when the configs set no teacher), and with ``evaluated`` also
        ``{"network": ..., "validate#handlers#<i>#_disabled_": True}``.
    """
    members = repr([str(p) for p in checkpoints])
    ensemble = (
        f"$kd_components.load_ensemble_teacher(@teacher_def, {members}, @device, tap_member=0, hint=@teacher_hint)"
    )
    configs = [*names, "evaluate.json"] if evaluated else list(names)
    parser = _workflow(bundle, configs, "eval" if evaluated else "train").parser
    override: dict[str, Any] = {} if parser.get("teacher", "") is None else {"teacher": ensemble}
    if not evaluated:
        return override
    override["network"] = ensemble
    handlers = parser.get("validate#handlers", [])
    for i, handler in enumerate(handlers if isinstance(handlers, list) else []):
        target = str(handler.get("_target_", "")) if isinstance(handler, Mapping) else ""
        load_dict = handler.get("load_dict") if isinstance(handler, Mapping) else None
        if target.rsplit(".", 1)[-1] == "CheckpointLoader" and "@network" in dict(load_dict or {}).values():
            override[f"validate#handlers#{i}#_disabled_"] = True
    return override
