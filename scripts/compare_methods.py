"""Compare distillation methods on one bundle over seeds, with confidence intervals that say if a difference is real.

For a bundle and a list of methods (``configs/methods/<name>.json`` override files; ``none`` is the student
alone), this trains the teacher once (or reuses ``--teacher_ckpt``), trains the student with each method once per
seed, evaluates the teacher and every student on the same test split (and on further datasets with
``--eval_sets``), and writes ``results.md``, ``results.json`` and one plot per evaluated set in ``--out``::

    python scripts/compare_methods.py --bundle polyp_kdas --methods none kdas --seeds 0 1 2 \\
        --dataset_dir <prepared data> --out outputs/compare_polyp --epochs 20 --image_size 128 128

    mlflow ui --backend-store-uri sqlite:///outputs/compare_polyp/mlruns.db

Runs and files
    The teacher is trained once, with the first seed, into ``<out>/teacher/`` (or ``--teacher_ckpt`` is reused);
    each method is trained once per seed into ``<out>/<method>/seed<k>/`` (``models/``, ``eval/``, ``test/`` with
    the per-case CSVs, ``result.json``). ``--methods all`` runs every override file of the bundle (``none`` first).
    A method may combine override files with ``+``: ``none+labelled_only`` merges ``methods/none.json`` then
    ``labelled_only.json`` (each part is looked up in ``configs/methods/`` first, then in ``configs/``). Bundles with
    a paraphraser stage (``configs/train_paraphraser.json``) get it run once, after the teacher, into the teacher's
    ``models`` folder (or ``<out>/paraphraser/models`` with ``--teacher_ckpt``); ``--paraphraser_dir`` reuses
    paraphrasers trained before. Every training is one MLflow run, tagged ``method`` and ``seed`` (run names
    ``teacher``, ``paraphraser``, ``<method> seed<k>``), with its test metrics and ``result.json``; one more run,
    ``comparison``, holds ``results.md``, ``results.json`` and the plots.

Ensemble teacher (``--teacher_ckpt a.pt b.pt c.pt``)
    Several checkpoints of the bundle's ``teacher_def`` (e.g. teachers trained with different seeds or folds) make
    one teacher, :func:`kd_components.load_ensemble_teacher`: the mean of the members' logits, with the feature taps
    of the first member (``tap_member=0``). Every job then uses the ensemble where the bundle's config has a
    teacher (a method that sets ``"teacher": null``, e.g. ``none``, keeps none): the students distil from it, the
    paraphrasers are trained on it, and the teacher job evaluates the ensemble itself (the bundle's
    ``evaluate.json`` with its ``network`` overridden by the ensemble and its ``CheckpointLoader`` of ``@network``
    disabled, so any bundle works), so the table's teacher row and teacher–student gap are the ensemble's. Its
    ``params`` are those of every member together. The overlays of the students' evaluations still draw the first
    member as their teacher panel. A single ``--teacher_ckpt`` is the plain teacher, as before::

        python scripts/compare_methods.py --bundle polyp_kdas --methods none kdas --seeds 0 1 2 \\
            --dataset_dir data/kvasir --out outputs/cmp_ensemble \\
            --teacher_ckpt teachers/seed0/teacher.pt teachers/seed1/teacher.pt teachers/seed2/teacher.pt

The table (``results.md``, one section per evaluated set)
    - every metric (Dice per class, mean Dice, IoU, HD95, extra metrics such as clDice) as mean ± sd over seeds of
      each run's mean over the cases;
    - Δ vs ``none`` (or else the first ``none+<override>``), with a 95 % paired bootstrap CI over test cases: each
      model's per-case metric is averaged over its seeds, then the per-case differences to the student alone are
      resampled (``--n_resamples``, default 10000, seeded, so the same results give the same interval);
    - a verdict: ``better`` / ``worse`` when the CI excludes 0 on that side (for HD95 lower is better),
      ``no evidence`` otherwise;
    - the teacher–student gap (teacher − none, with its CI, on a line above the table and in the teacher's row) and
      the fraction of it each distilled student closes, (distilled − none) / (teacher − none), n/a when the teacher
      is not better than the student alone;
    - HD95 honesty: the bundles' ``evaluate.json`` score a class whose prediction is empty while its label is not
      (or the reverse) with the image diagonal of that case (``kd_components.metrics.SpacedHausdorffDistance``
      with ``empty_penalty="diagonal"``), instead of MONAI's inf/NaN that a mean silently drops; the table counts
      those cases per run. With an ``evaluate.json`` without the penalty, the non-finite cases are counted and
      stated as left out.

Further datasets (``--eval_sets name=path ...``)
    Every trained model, the teacher included, is also evaluated on each named prepared dataset (a folder holding a
    ``datalist.json`` in the bundle's format, e.g. prepared with the same ``kd_components.data`` command as the
    training data): on its ``test`` split when it has one, otherwise on every labelled item of all its splits.
    A dataset used only for evaluation is best prepared whole as its test split (``--fractions 0 0 1``); with
    the default split only its ``test`` tenth would be evaluated (the section header names the split and the
    number of cases). Each set gets its own section with its own values, Δ, CIs and verdicts. E.g. polyp models
    trained on Kvasir-SEG, tested on CVC-ClinicDB too::

        python -m kd_components.data.polyp --kvasir <Kvasir-SEG> --out data/kvasir
        python -m kd_components.data.polyp --clinicdb <CVC-ClinicDB> --out data/cvc --fractions 0 0 1
        python scripts/compare_methods.py --bundle polyp_kdas --methods none kdas --seeds 0 1 2 \\
            --dataset_dir data/kvasir --eval_sets cvc=data/cvc --out outputs/kvasir_vs_cvc

    The images are preprocessed by the bundle's ``evaluate.json`` exactly as the test split (same size, same
    intensity scaling); the set must have the same classes and channels as the training data.

Scale-out (every (method, seed) run is an independent job)
    ``--plan`` writes ``<out>/plan.json`` (all settings) and ``<out>/jobs.sh`` (one command per job) and trains
    nothing. Run the ``teacher`` job first (it trains the teacher and the paraphrasers and evaluates the teacher),
    then the others in any order or in parallel (on your GPUs or through your scheduler), then ``--collect``::

        python scripts/compare_methods.py --bundle polyp_kdas --methods none kdas --seeds 0 1 2 \\
            --dataset_dir data/kvasir --out outputs/cmp --plan
        python scripts/compare_methods.py --out outputs/cmp --only_job teacher
        python scripts/compare_methods.py --out outputs/cmp --only_job kdas:1      # <method>:<seed>, any order
        python scripts/compare_methods.py --out outputs/cmp --collect

    Each job writes ``<out>/<method>/seed<k>/result.json`` (``<out>/teacher/result.json``) with its per-case,
    per-set metrics; ``--collect`` builds ``results.md`` / ``results.json`` / plots from the finished ones (missing
    jobs are listed). ``--only_job`` and ``--collect`` read every setting from ``plan.json``. ``--plan --extend``
    with more ``--seeds`` or ``--methods`` (every other argument as before) grows the plan in ``--out`` and keeps its
    id, so its finished jobs still count: a one-seed screen becomes a three-seed comparison. The default (no
    ``--plan``) writes the same plan and runs the jobs one after the other, then collects. Parallel jobs write to
    one MLflow store: the default ``sqlite:///<out>/mlruns.db`` is fine on one machine; across machines pass
    ``--tracking_uri`` (an MLflow server) at planning time, or ``--no_mlflow``.

Joining comparisons (``--collect --join OTHER ...``)
    A variant trained later in a plan of its own (one override changed, e.g. a cheaper critic, over the same seeds)
    is compared in one table with the first plan's student alone, teacher and methods: ``--join`` adds the other
    plans' finished students as rows named by the settings they change (``lightvessel [critic_every=2]``), paired on
    the same test cases with the same statistics, and each joined row is also compared with the same method of the
    first plan (a section of its own: Δ, CI, verdict). The plans must share the bundle, the evaluated sets and the
    teacher's weights (else it stops and says which differs). The report goes to ``<out>/joined/``::

        python scripts/compare_methods.py --out outputs/cmp --collect --join outputs/cmp_cheap_critic

Determinism
    Each stage is seeded (``monai.utils.set_determinism`` before the workflow is built, and again by the bundles'
    ``initialize``) and runs with ``torch.use_deterministic_algorithms(True, warn_only=True)``: the same seed
    gives the same numbers on the same machine, with the same number of torch threads (``--threads``; the
    default is torch's, one per core). A different thread count or another machine changes the floating-point
    summation order, and so the numbers, as much as a different seed can. Each ``result.json`` records the thread
    count, device and a digest of the trained weights.

Evaluation reads the CSVs that the bundle's ``evaluate.json`` writes with MONAI's ``MetricsSaver``:
``val_mean_dice_raw.csv`` (one ``class<i>`` column per foreground class), ``val_mean_iou_raw.csv``,
``val_hd95_raw.csv``, and any other ``val_<name>_raw.csv`` becomes one more metric (e.g. clDice). Cases are named
by their image path relative to the dataset folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # scripts.comparison and kd_components, when the script runs from elsewhere
    sys.path.insert(0, str(REPO))

# The code lives in scripts/comparison/ (one module per part); this file is the command line and re-exports the
# public names.
from scripts.comparison.collect import collect  # noqa: E402
from scripts.comparison.evaluation import evaluate_stage  # noqa: E402
from scripts.comparison.jobs import (  # noqa: E402
    JOBS_FILE,
    RESULT_FILE,
    TEACHER_JOB,
    _write_jobs_file,
    job_command,
    job_dir,
    plan_jobs,
)
from scripts.comparison.join import JOINED_DIR, join_label, join_plans, versus_own_method  # noqa: E402
from scripts.comparison.plan import (  # noqa: E402
    PLAN_FILE,
    PRIMARY_SET,
    ensemble_overrides,
    make_plan,
    read_plan,
    teacher_checkpoints,
)
from scripts.comparison.plot import plot_comparison  # noqa: E402
from scripts.comparison.report import footnotes, markdown_report, markdown_table  # noqa: E402
from scripts.comparison.runner import run_job  # noqa: E402
from scripts.comparison.sequential import compare, run_comparison  # noqa: E402
from scripts.comparison.stages import BUNDLES, available_methods, method_configs, train_stage  # noqa: E402
from scripts.comparison.summary import summarize  # noqa: E402

__all__ = [
    "available_methods",
    "method_configs",
    "train_stage",
    "evaluate_stage",
    "make_plan",
    "read_plan",
    "teacher_checkpoints",
    "ensemble_overrides",
    "plan_jobs",
    "job_command",
    "job_dir",
    "run_job",
    "collect",
    "join_plans",
    "join_label",
    "versus_own_method",
    "run_comparison",
    "compare",
    "summarize",
    "markdown_table",
    "markdown_report",
    "plot_comparison",
    "main",
    "footnotes",
    "BUNDLES",
    "PLAN_FILE",
    "JOBS_FILE",
    "RESULT_FILE",
    "TEACHER_JOB",
    "PRIMARY_SET",
    "JOINED_DIR",
]


def _parse_override(items: Sequence[str]) -> dict[str, Any]:
    override = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--override takes key=value pairs, got {item!r}")
        try:
            override[key] = json.loads(value)
        except json.JSONDecodeError:
            override[key] = value
    return override


PLAN_ARGUMENTS = (
    "bundle",
    "methods",
    "dataset_dir",
    "seeds",
    "seed",
    "teacher_ckpt",
    "epochs",
    "teacher_epochs",
    "paraphraser_dir",
    "hd95_unit",
    "image_size",
    "batch_size",
    "num_workers",
    "eval_sets",
    "n_resamples",
    "tracking_uri",
)
"""Arguments that define a plan: ``--only_job`` and ``--collect`` read them from ``plan.json`` instead."""


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; see the module docstring.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", default=None, help="bundle folder name under bundles/")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="method override names ('none' = student alone; 'all' = every configs/methods file; 'a+b' merges two)",
    )
    parser.add_argument("--dataset_dir", default=None, help="prepared data folder holding datalist.json")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="one student run per method and seed")
    parser.add_argument("--seed", type=int, default=None, help="a single seed (same as --seeds K; default 0)")
    parser.add_argument(
        "--teacher_ckpt",
        nargs="+",
        default=None,
        help="a trained teacher (skips teacher training); several checkpoints: their ensemble is the teacher "
        "(mean of logits, feature taps of the first)",
    )
    parser.add_argument("--epochs", type=int, default=None, help="epochs of every student (default: the bundle's)")
    parser.add_argument("--teacher_epochs", type=int, default=None, help="epochs of the teacher")
    parser.add_argument("--paraphraser_dir", default=None, help="paraphrasers already trained for this teacher")
    parser.add_argument("--hd95_unit", default=None, help="unit of the HD95 column: px (default), vox or mm")
    parser.add_argument("--image_size", type=int, nargs="+", default=None)
    parser.add_argument("--batch_size", type=int, default=None)
    parser.add_argument("--num_workers", type=int, default=None)
    parser.add_argument(
        "--eval_sets",
        nargs="+",
        default=None,
        metavar="NAME=PATH",
        help="further prepared datasets to evaluate every model on (their test split, else all labelled items)",
    )
    parser.add_argument("--n_resamples", type=int, default=None, help="bootstrap resamples of the CIs (10000)")
    parser.add_argument("--no_mlflow", action="store_true", help="do not record MLflow runs")
    parser.add_argument("--tracking_uri", default=None, help="MLflow store (default sqlite:///<out>/mlruns.db)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's, one per core); the same count is needed for the same numbers",
    )
    parser.add_argument(
        "--no_deterministic_algorithms",
        action="store_true",
        help="do not call torch.use_deterministic_algorithms(True, warn_only=True) (faster on some GPUs)",
    )
    parser.add_argument("--override", nargs="*", default=[], help="more config overrides, key=value (JSON value)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--plan", action="store_true", help="write <out>/plan.json and <out>/jobs.sh; train nothing")
    parser.add_argument(
        "--extend",
        action="store_true",
        help="with --plan: add methods or seeds to the plan already in --out (same other settings); its finished "
        "jobs still count",
    )
    mode.add_argument(
        "--only_job", default=None, metavar="JOB", help="run one job of <out>/plan.json: teacher or METHOD:SEED"
    )
    mode.add_argument("--collect", action="store_true", help="tables from the finished jobs of <out>/plan.json")
    parser.add_argument(
        "--join",
        nargs="+",
        default=[],
        metavar="OUT",
        help="with --collect: add the students of these comparisons (same bundle, test cases and teacher) as rows, "
        "each named by the settings it changes; the report goes to <out>/joined/",
    )
    args = parser.parse_args(argv)

    if args.join and not args.collect:
        raise SystemExit("--join adds rows to a --collect table: add --collect")
    if args.extend and not args.plan:
        raise SystemExit("--extend goes with --plan: it adds methods or seeds to the plan in --out")
    if args.only_job or args.collect:
        given = [f"--{a}" for a in PLAN_ARGUMENTS if getattr(args, a) is not None]
        given += ["--override"] if args.override else []
        given += ["--no_mlflow"] if args.no_mlflow else []
        given += ["--no_deterministic_algorithms"] if args.no_deterministic_algorithms else []
        if given:
            raise SystemExit(f"--only_job and --collect take their settings from <out>/{PLAN_FILE}; drop {given}")
        if args.only_job:
            result = run_job(args.out, args.only_job, threads=args.threads)
            print(f"{args.only_job}: written {result['result_file']}")
            return 0
        results = collect(args.out, join=args.join)
        print(markdown_report(results))
        where = Path(args.out) / (JOINED_DIR if args.join else "")
        print(f"written: {where / 'results.md'}, {where / 'results.json'}")
        return 0 if not results["missing_jobs"] else 1

    missing = [f"--{a}" for a in ("bundle", "methods", "dataset_dir") if getattr(args, a) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    override = {
        k: v
        for k, v in {
            "epochs": args.epochs,
            "image_size": args.image_size,
            "batch_size": args.batch_size,
            "num_workers": args.num_workers,
            "seed": args.seed,
        }.items()
        if v is not None
    }
    override.update(_parse_override(args.override))
    settings = {
        "seeds": args.seeds,
        "teacher_ckpt": args.teacher_ckpt,
        "teacher_epochs": args.teacher_epochs,
        "track": not args.no_mlflow,
        "paraphraser_dir": args.paraphraser_dir,
        "hd95_unit": args.hd95_unit or "px",
        "eval_sets": args.eval_sets,
        "n_resamples": args.n_resamples or 10000,
        "tracking_uri": args.tracking_uri,
        "deterministic": not args.no_deterministic_algorithms,
        **override,
    }
    if args.plan:
        plan = make_plan(args.bundle, args.methods, args.dataset_dir, args.out, extend=args.extend, **settings)
        path = _write_jobs_file(plan, args.threads)
        print(path.read_text(), end="")
        print(f"\nwritten: {Path(plan['out']) / PLAN_FILE}, {path}")
        return 0
    results = run_comparison(args.bundle, args.methods, args.dataset_dir, args.out, threads=args.threads, **settings)
    print(markdown_report(results))
    print(f"written: {Path(args.out) / 'results.md'}, {Path(args.out) / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
