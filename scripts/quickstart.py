"""The main job on an embedded default: what distillation is for, measured with seeds and a confidence interval.

Scenario (low-label regime, synthetic polyps generated locally, no download): a large teacher (UNet, 6.5 M
parameters) was trained with the labels of every training image. A small student (UNet, 0.41 M, 6.3 %) is to be
trained where only ``--labelled_fraction`` of those images (default 10 %) have labels. The student alone can only
learn from the labelled images; the distilled student learns from them too and, through KDAS (the ``polyp_kdas``
bundle's method) and the teacher's per-pixel answers (``semisupervised.json``'s ``pixel_kd``), from the teacher's
predictions on every training image. Both students take the same number of
optimizer steps (the labelled images are repeated to the length of the whole training list), with the same
augmentations, epochs and seeds. The script prints the teacher, the student alone and the distilled student on
the same test split, the difference with its 95 % paired bootstrap CI over test cases, and the fraction of the
teacher-student gap that distillation closes. About four minutes on a 2-core CPU (3 min 40 s measured)::

    python scripts/quickstart.py                        # writes outputs/quickstart/
    python scripts/quickstart.py --labelled_fraction 1  # every label: the student alone is then close to the teacher

With ``--kvasir`` it prepares the real Kvasir-SEG release (official layout) instead of synthetic data. The jobs
(teacher, then each method and seed) run as independent processes of ``scripts/compare_methods.py``, two at a
time on a 2-core machine; each job's log is ``<out>/<method>/seed<k>/log.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python scripts/quickstart.py` from anywhere
    sys.path.insert(0, str(REPO))

from kd_components.data.common import DATALIST_NAME  # noqa: E402
from scripts.comparison.collect import collect  # noqa: E402
from scripts.comparison.jobs import RESULT_FILE, job_command, job_dir, plan_jobs  # noqa: E402
from scripts.comparison.plan import make_plan  # noqa: E402
from scripts.comparison.report import markdown_report  # noqa: E402

EPOCH_LINE = re.compile(r"Epoch\[(\d+)\] Metrics -- .*val_mean_dice: ([0-9.]+)")
STUDENT_ALONE = "none+labelled_only"
DISTILLED = "kdas+semisupervised"


def prepare_data(out: Path, kvasir: str | None, n: int, size: Sequence[int], seed: int) -> Path:
    """Create the dataset folder once; later runs reuse it (nothing is overwritten)."""
    data = out / ("kvasir" if kvasir else "synthetic")
    if (data / DATALIST_NAME).is_file():
        print(f"reusing the prepared data in {data}")
        return data
    if kvasir:
        from kd_components.data.polyp import prepare_polyp_data

        prepare_polyp_data(data, kvasir_dir=kvasir, max_size=max(size) * 2, seed=seed)
    else:
        from kd_components.data.synthetic import make_synthetic_polyps

        make_synthetic_polyps(data, n=n, size=tuple(size), seed=seed)
    return data


class _Job:
    """One ``compare_methods.py --only_job`` process, its log file and the epoch lines already printed."""

    def __init__(self, plan: dict, job: str, threads: int, epochs: int) -> None:
        self.run_dir = job_dir(plan, job)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.job, self.log, self.epochs, self.seen = job, self.run_dir / "log.txt", epochs, 0
        self.start = time.perf_counter()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        command = [sys.executable, *shlex.split(job_command(plan, job, threads))[1:]]
        self.handle = self.log.open("w")
        self.process = subprocess.Popen(command, stdout=self.handle, stderr=subprocess.STDOUT, env=env)

    def progress(self) -> None:
        """Print one line per validation epoch that the job logged since the last call."""
        lines = list(EPOCH_LINE.finditer(self.log.read_text(errors="replace")))[: self.epochs]  # then: evaluation
        for match in lines[self.seen :]:
            print(f"  {self.job:<24} epoch {match.group(1):>3}/{self.epochs}  validation Dice {match.group(2)}")
        self.seen = len(lines)

    def finished(self) -> bool:
        if self.process.poll() is None:
            return False
        self.progress()
        self.handle.close()
        if self.process.returncode != 0:
            tail = "".join(self.log.read_text(errors="replace").splitlines(keepends=True)[-25:])
            raise SystemExit(f"job {self.job} failed (exit {self.process.returncode}); end of {self.log}:\n{tail}")
        result = json.loads((self.run_dir / RESULT_FILE).read_text())
        test = result["sets"]["test"]["mean_dice"]
        print(f"  {self.job:<24} done in {time.perf_counter() - self.start:.0f} s, test Dice {test:.4f}")
        return True


def run_jobs(plan: dict, workers: int, teacher_epochs: int, epochs: int) -> None:
    """Run the teacher job with every core, then the students' jobs ``workers`` at a time, printing progress."""
    cores = os.cpu_count() or 1
    jobs = plan_jobs(plan)
    teacher = _Job(plan, jobs[0], cores, teacher_epochs)
    print(f"[1/{len(jobs)}] training the teacher on every label ({teacher_epochs} epochs)")
    while not teacher.finished():
        teacher.progress()
        time.sleep(1.0)
    pending = list(jobs[1:])
    running: list[_Job] = []
    threads = max(1, cores // workers)
    done = 1
    while pending or running:
        while pending and len(running) < workers:
            job = pending.pop(0)
            method, _, seed = job.rpartition(":")
            done += 1
            print(f"[{done}/{len(jobs)}] student {method}, seed {seed}")
            running.append(_Job(plan, job, threads, epochs))
        time.sleep(1.0)
        for job in list(running):
            job.progress()
            if job.finished():
                running.remove(job)


def summary(results: dict) -> str:
    """Plain sentences: the teacher-student gap, the gain of distillation with its CI, the gap closed."""
    rows = {r["method"]: r["sets"]["test"]["metrics"]["mean_dice"] for r in results["rows"] if "test" in r["sets"]}
    teacher, alone, distilled = rows.get("teacher"), rows.get(STUDENT_ALONE), rows.get(DISTILLED)
    if not (teacher and alone and distilled):
        return "some jobs did not finish: " + ", ".join(results.get("missing_jobs", []))
    lines = [
        f"mean Dice over seeds: teacher {teacher['mean']:.3f}, student alone {alone['mean']:.3f}, "
        f"distilled student {distilled['mean']:.3f}.",
        f"teacher - student alone: {teacher['delta']:+.3f} (95 % CI [{teacher['ci_low']:+.3f}, "
        f"{teacher['ci_high']:+.3f}]).",
        f"distilled - student alone: {distilled['delta']:+.3f} (95 % CI [{distilled['ci_low']:+.3f}, "
        f"{distilled['ci_high']:+.3f}]): {distilled['verdict']}; "
        + (
            f"it closes {100 * distilled['gap_closed']:.0f} % of the teacher-student gap."
            if distilled["gap_closed"] == distilled["gap_closed"]
            else "the teacher is not better than the student alone, so there is no gap to close."
        ),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/quickstart", help="output folder (default: outputs/quickstart)")
    parser.add_argument("--kvasir", default=None, help="a Kvasir-SEG folder (official layout) instead of synthetic")
    parser.add_argument("--n", type=int, default=200, help="synthetic images to generate (80 %% for training)")
    parser.add_argument("--image_size", type=int, nargs=2, default=[64, 64])
    parser.add_argument(
        "--labelled_fraction", type=float, default=0.1, help="training images the students see labelled"
    )
    parser.add_argument("--epochs", type=int, default=12, help="epochs of each student")
    parser.add_argument("--teacher_epochs", type=int, default=12)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=None, help="student jobs at a time (default: one per core)")
    parser.add_argument("--no_mlflow", action="store_true", help="do not record MLflow runs")
    args = parser.parse_args(argv)

    out = Path(args.out).resolve()
    data = prepare_data(out, args.kvasir, args.n, args.image_size, args.seeds[0])
    plan = make_plan(
        "polyp_kdas",
        [STUDENT_ALONE, DISTILLED],
        data,
        out,
        seeds=args.seeds,
        teacher_epochs=args.teacher_epochs,
        track=not args.no_mlflow,
        epochs=args.epochs,
        image_size=list(args.image_size),
        batch_size=args.batch_size,
        num_workers=0,
        learning_rate=1e-3,
        labelled_fraction=args.labelled_fraction,
    )
    start = time.perf_counter()
    run_jobs(plan, args.workers or max(1, min(2, os.cpu_count() or 1)), args.teacher_epochs, args.epochs)
    results = collect(out)
    print(
        f"\npolyp_kdas, {'Kvasir-SEG' if args.kvasir else 'synthetic polyps'}: students see "
        f"{100 * args.labelled_fraction:.0f} % of the labels; {len(args.seeds)} seeds; "
        f"{time.perf_counter() - start:.0f} s\n"
    )
    print(markdown_report(results))
    print("\n" + summary(results))
    print(f"\nTables: {out / 'results.md'}; MLflow: mlflow ui --backend-store-uri sqlite:///{out / 'mlruns.db'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
