"""Deployment latency: the exported student (TorchScript, ONNX Runtime) against the eager teacher, on CPU.

For each bundle (default: every folder under ``bundles/`` with ``configs/inference.json`` and a ``teacher_def`` in
``configs/train.json``), in one process, on one input of the bundle's inference size (``image_size`` of
``inference.json``, batch ``--batch``, default 1; i.e. one window of a sliding-window inferer):

* **teacher, eager**: ``teacher_def`` of ``train.json``, eval mode, ``torch.no_grad``;
* **student, eager**: ``network_def`` of ``inference.json``, the same way;
* **student, TorchScript**: written and checked against eager by ``scripts/export_student.py``'s
  :func:`export_torchscript`, then loaded with ``torch.jit.load`` and run under ``torch.no_grad``;
* **student, ONNX Runtime**: written and checked by :func:`export_onnx` (opset 18, dynamic batch), run by an
  ``onnxruntime.InferenceSession`` on the CPU provider with ``intra_op_num_threads = --threads``,
  ``inter_op_num_threads = 1``, sequential execution and every graph optimisation.

Weights are random (saved and loaded as ``export_student`` does; the cost does not depend on them). The four are
timed interleaved round by round (rotated order, after warm-up runs), so other processes' load affects them alike:
quote the ratios. Reported: median latency and its inter-quartile range, images per second, and the speed-up over
the eager teacher (median over rounds of teacher / runtime, paired by round). ONNX needs ``onnx``, ``onnxscript``
and ``onnxruntime`` (the ``export`` extra); without them that row says so.

Usage::

    OMP_NUM_THREADS=1 python scripts/benchmark_deploy.py --threads 1 --out outputs/benchmark_deploy
    python scripts/benchmark_deploy.py --bundle polyp_kdas --batch 4 --repeats 21
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python scripts/benchmark_deploy.py` from anywhere
    sys.path.insert(0, str(REPO))

from scripts.benchmarking.bundles import BUNDLES, config_parser  # noqa: E402
from scripts.benchmarking.measure import paired_ratio, ratio, time_interleaved  # noqa: E402
from scripts.benchmarking.report import fmt  # noqa: E402
from scripts.export_student import export_onnx, export_torchscript, load_student  # noqa: E402

__all__ = ["RUNTIMES", "deploy_bundles", "onnx_available", "benchmark_deploy", "markdown_report", "main"]

RUNTIMES = ("teacher_eager", "student_eager", "student_torchscript", "student_onnxruntime")
LABELS = {
    "teacher_eager": "teacher, eager PyTorch",
    "student_eager": "student, eager PyTorch",
    "student_torchscript": "student, TorchScript",
    "student_onnxruntime": "student, ONNX Runtime (CPU)",
}


def deploy_bundles(root: Path = BUNDLES) -> list[str]:
    """Bundles with ``configs/inference.json`` and a ``teacher_def`` in ``configs/train.json``, sorted."""
    names = []
    for infer in sorted(root.glob("*/configs/inference.json")):
        train = infer.parent / "train.json"
        if train.is_file() and "teacher_def" in json.loads(train.read_text()):
            names.append(infer.parent.parent.name)
    return names


def onnx_available() -> bool:
    """Whether ``onnx``, ``onnxscript`` and ``onnxruntime`` are importable."""
    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))


def _onnx_session(path: Path, threads: int) -> Any:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def benchmark_deploy(
    bundle: str, batch: int, threads: int, warmup: int, repeats: int, work: Path, image_size: Sequence[int] | None
) -> dict[str, Any]:
    """Latency of the four runtimes on one bundle (see the module docstring).

    Args:
        bundle: a bundle name under ``bundles/``.
        batch: images per call.
        threads: ONNX Runtime's intra-op threads (set torch's with ``torch.set_num_threads`` before).
        warmup: untimed runs of each runtime first.
        repeats: timed rounds.
        work: a folder for the weights and the exported files.
        image_size: the spatial size (default: the bundle's inference size).

    Returns:
        ``{"bundle", "input_shape", "runtimes": {name: summary}, "speedup_over_teacher": {name: ...},
        "max_abs_diff": {format: float}, "skipped": {name: reason}}``.
    """
    bundle_dir = BUNDLES / bundle
    work.mkdir(parents=True, exist_ok=True)
    infer = config_parser([bundle_dir / "configs" / "inference.json"], {"bundle_root": str(bundle_dir)})
    torch.save(infer.get_parsed_content("network_def").state_dict(), work / "model.pt")
    student, shape = load_student(bundle, work / "model.pt", image_size)
    shape = [batch, *shape[1:]]
    train = config_parser([bundle_dir / "configs" / "train.json"], {"bundle_root": str(bundle_dir)})
    teacher = train.get_parsed_content("teacher_def").eval()
    example = torch.rand(*shape)
    calls: dict[str, Callable[[], Any]] = {}
    skipped: dict[str, str] = {}
    diffs: dict[str, float] = {}

    def eager(net: torch.nn.Module) -> Callable[[], Any]:
        def run() -> Any:
            with torch.no_grad():
                return net(example)

        return run

    calls["teacher_eager"] = eager(teacher)
    calls["student_eager"] = eager(student)
    diffs["torchscript"] = export_torchscript(student, shape, work / "model.ts")
    calls["student_torchscript"] = eager(torch.jit.load(str(work / "model.ts"), map_location="cpu").eval())
    if onnx_available():
        diffs["onnx"] = export_onnx(student, shape, work / "model.onnx")
        session, feed = _onnx_session(work / "model.onnx", threads), {"image": example.numpy()}
        calls["student_onnxruntime"] = lambda: session.run(["pred"], feed)
    else:
        skipped["student_onnxruntime"] = "onnx, onnxscript or onnxruntime is not installed"
    timings = time_interleaved(calls, warmup, repeats, torch.device("cpu"))
    teacher_ms = timings["teacher_eager"]["samples_ms"]
    result: dict[str, Any] = {
        "bundle": bundle,
        "input_shape": shape,
        "runtimes": {},
        "speedup_over_teacher": {},
        "max_abs_diff": diffs,
        "skipped": skipped,
    }
    for name, timing in timings.items():
        result["runtimes"][name] = {**timing, "images_per_s": ratio(batch * 1e3, timing["median_ms"])}
        result["speedup_over_teacher"][name] = paired_ratio(teacher_ms, timing["samples_ms"])["median"]
    return result


def markdown_report(results: dict[str, Any]) -> str:
    """One table per bundle of :func:`main`'s results."""
    machine = results["machine"]
    lines = [
        f"Machine: {machine['platform']}; torch {machine['torch']} with {machine['torch_threads']} intra-op "
        f"threads, onnxruntime {machine.get('onnxruntime', 'n/a')} with {machine['ort_threads']} intra-op thread(s), "
        "inter-op 1.",
        "",
    ]
    for item in results["bundles"]:
        shape = item["input_shape"]
        lines += [
            f"#### {item['bundle']}: batch {shape[0]}, {shape[1]} channels, {'×'.join(map(str, shape[2:]))}",
            "",
            "| runtime | latency median (ms) | IQR (ms) | images / s | speed-up over the eager teacher |",
            "|---|---:|---:|---:|---:|",
        ]
        for name in RUNTIMES:
            if name in item["skipped"]:
                lines.append(f"| {LABELS[name]} | not measured: {item['skipped'][name]} | | | |")
                continue
            r = item["runtimes"][name]
            lines.append(
                f"| {LABELS[name]} | {fmt(r['median_ms'])} | {fmt(r['iqr_ms'])} | {fmt(r['images_per_s'])} | "
                f"**{fmt(item['speedup_over_teacher'][name], 2)}×** |"
            )
        diffs = ", ".join(f"{k} {v:.1e}" for k, v in item["max_abs_diff"].items())
        lines += ["", f"Max abs difference of the exported student to eager (logits): {diffs}.", ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", nargs="+", default=None, help="bundle names (default: every bundle)")
    parser.add_argument("--batch", type=int, default=1, help="images per call (default: 1)")
    parser.add_argument("--image_size", type=int, nargs="+", default=None, help="default: each bundle's")
    parser.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime intra-op threads (default 1)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs of each runtime (default: 3)")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds (default: 15)")
    parser.add_argument("--out", default=None, help="folder for benchmark_deploy.json / .md (default: print only)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Export, time and print the tables; write them to ``--out`` when given."""
    import platform

    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    names = args.bundle or deploy_bundles()
    unknown = sorted(set(names) - set(deploy_bundles()))
    if unknown:
        raise SystemExit(f"no deployable bundle {unknown} (available: {deploy_bundles()})")
    machine = {
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "ort_threads": args.threads,
    }
    if onnx_available():
        import onnxruntime

        machine["onnxruntime"] = onnxruntime.__version__
    results: dict[str, Any] = {
        "command": "python scripts/benchmark_deploy.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine,
        "bundles": [],
    }
    with tempfile.TemporaryDirectory(prefix="kd_benchmark_deploy_") as work:
        for name in names:
            results["bundles"].append(
                benchmark_deploy(
                    name, args.batch, args.threads, args.warmup, args.repeats, Path(work) / name, args.image_size
                )
            )
    report = markdown_report(results)
    print(report)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "benchmark_deploy.json").write_text(json.dumps(results, indent=2, default=str))
        (out / "benchmark_deploy.md").write_text(f"Command: `{results['command']}`\n\n{report}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
