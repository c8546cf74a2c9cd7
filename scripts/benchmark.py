"""Benchmark bundles: teacher / student inference cost and the per-iteration cost of distillation.

For each bundle (default: every folder under ``bundles/`` with ``configs/train.json``), in one process:

* **inference** of the teacher (``teacher_def`` of ``train.json``) and the student (``network_def`` of
  ``inference.json``) at the bundle's inference size (``image_size`` of ``inference.json``): parameters, FLOPs per
  input (``torch.utils.flop_counter.FlopCounterMode``: convolutions and matrix products, 2 FLOPs per
  multiply-add), latency (median and inter-quartile range over repeated runs after warm-up), images per second,
  peak memory, and the student / teacher ratios;
* **training** at the bundle's training size and batch: (a) a plain student step (forward, backward, optimizer),
  (b) a teacher forward without gradients, (c) one ``DistillationTrainer`` iteration for every method the bundle
  offers (``configs/methods/<name>.json`` merged onto ``train.json``), and the overhead ratio
  ``(c) / ((a) + (b))``: 1.0 means distillation costs nothing beyond the teacher's forward pass. It is the median
  over rounds of ``c_r / (a_r + b_r)``, the three measured in the same round (the ratio of the medians is in the
  JSON too). Next to it, the time per batch of the bundle's own training data loader.

The trainers are the bundle's own, built with ``monai.bundle.ConfigParser`` (the teacher checkpoint is a randomly
initialised teacher saved in a temporary folder: weights do not change the cost). (c) is the trainer's own
iteration function, ``trainer._iteration(trainer, batch)``, after firing ``ITERATION_STARTED`` as the engine does,
so an adversarial trainer's discriminator step is included; (a) is a MONAI ``SupervisedTrainer`` built from the same
config entry without the arguments ``SupervisedTrainer`` does not take (teacher, distiller, discriminators...) and
without the training handlers, so both run the same network, optimizer, supervised loss, inferer, AMP setting and
postprocessing. Measurements are interleaved round by round, so load from other processes affects all of them alike;
report the ratios. A method named with ``--methods`` that a bundle does not have, whose trainer is not a
``DistillationTrainer``, or that has no distillation term or no teacher (``none``: the student alone, i.e. step
(a)), is listed as not measured.

Batches come from the bundle's own training data loader (its transforms, random crops included: the JSON's
``batch_items`` is the number of items per iteration, e.g. ``batch_size`` x ``num_samples`` patches), on a prepared
dataset given with ``--dataset_dir`` or else on tiny synthetic data written in the temporary folder, chosen per
bundle by ``SYNTHETIC_DATA``:

* ``polyp_kdas``, ``pathology_coco``: :func:`kd_components.data.synthetic.make_synthetic_polyps` (RGB PNG images and
  0/1 labels, the layout of both prepared Kvasir-SEG and prepared MoNuSeg tiles);
* ``vessel_lightvessel``: :func:`kd_components.data.synthetic_vessels.make_synthetic_vessels`, ``modality="xray"``
  for its default 1 input channel (``"fundus"`` for 3);
* ``multiorgan_graphflow``: :func:`kd_components.data.synthetic_volumes.make_synthetic_volumes` (ACDC-like NIfTI
  volumes, SSL4MIS layout) prepared with :func:`kd_components.data.volumes.prepare_acdc_data` and
  :func:`kd_components.data.volumes.write_slices` (2D slices for training, volumes for validation);
* any other 2D bundle with 3 input channels: synthetic polyps; any other bundle needs ``--dataset_dir``.

The synthetic images have the training size, and there are enough of them for ``--loader_batches`` + 1 full batches.
A bundle with a paraphraser stage (``configs/train_paraphraser.json``, e.g. CoCo and Graph Flow) gets randomly
initialised paraphrasers: the networks listed for it in ``PARAPHRASERS`` are saved untrained at their checkpoint
paths, with ``paraphraser_dir`` in the temporary folder, and the methods load them from there (see
:func:`make_paraphrasers`).

On CUDA, AMP follows the bundle (``amp``) and every measurement synchronises the device; on CPU AMP is off.
Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` minus what was allocated before the call; on CPU the peak
of the tensor memory torch allocates during the call (sum of the profiler's allocation / free events), which
excludes memory held before the call (e.g. weights) and allocator overhead.

The code lives in ``scripts/benchmarking/`` (measurement, bundles, inference, training, report); this file is the
command line and re-exports the names the tests and other scripts use.

Examples::

    python scripts/benchmark.py                                   # every bundle, writes outputs/benchmark/
    python scripts/benchmark.py --bundle polyp_kdas --image_size 256 256 --batch_size 4 --out /tmp/bench
    python scripts/benchmark.py --quick                           # tiny setting (tests)
    python scripts/benchmark.py --quick --bundle pathology_coco --methods none coco --dataset_dir <prepared MoNuSeg>
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python scripts/benchmark.py` from anywhere
    sys.path.insert(0, str(REPO))

from scripts.benchmarking.bundles import (  # noqa: E402
    BUNDLES,
    PARAPHRASERS,
    SYNTHETIC_DATA,
    bundle_names,
    config_parser,
    device_override,
    input_channels,
    make_paraphrasers,
    method_names,
    synthetic_data,
    synthetic_data_kind,
)
from scripts.benchmarking.inference import benchmark_inference  # noqa: E402
from scripts.benchmarking.measure import (  # noqa: E402
    flops_per_input,
    keep_freed_memory,
    paired_ratio,
    peak_memory_mib,
    summarize,
    time_interleaved,
)
from scripts.benchmarking.report import markdown_report  # noqa: E402
from scripts.benchmarking.training import (  # noqa: E402
    add_plain_trainer,
    benchmark_training,
    is_distillation_trainer,
    lever_cycle,
    per_iteration,
    run_iteration,
    trainer_config,
)

__all__ = [
    "SYNTHETIC_DATA",
    "PARAPHRASERS",
    "BUNDLES",
    "bundle_names",
    "method_names",
    "summarize",
    "time_interleaved",
    "paired_ratio",
    "keep_freed_memory",
    "trainer_config",
    "is_distillation_trainer",
    "add_plain_trainer",
    "run_iteration",
    "lever_cycle",
    "per_iteration",
    "flops_per_input",
    "peak_memory_mib",
    "benchmark_inference",
    "benchmark_training",
    "synthetic_data_kind",
    "make_paraphrasers",
    "benchmark_bundle",
    "machine_info",
    "markdown_report",
    "build_parser",
    "main",
]

logger = logging.getLogger("benchmark")

QUICK = {"image_size": [32, 32], "batch_size": 2, "warmup": 1, "repeats": 3, "num_workers": 0, "loader_batches": 3}


def benchmark_bundle(name: str, args: argparse.Namespace, device: torch.device, work: Path) -> dict[str, Any]:
    """Inference and training benchmarks of one bundle (see the module docstring)."""
    bundle = BUNDLES / name
    configs = bundle / "configs"
    train = config_parser([configs / "train.json"], {"bundle_root": str(bundle)})
    amp = bool(args.amp) if args.amp is not None else device.type == "cuda"
    amp = amp and device.type == "cuda"
    infer_file = configs / "inference.json"
    infer = config_parser([infer_file], {"bundle_root": str(bundle)}) if infer_file.is_file() else train
    infer_size = list(args.image_size or infer.get_parsed_content("image_size"))
    channels = input_channels(bundle, train)
    teacher = train.get_parsed_content("teacher_def")
    student = infer.get_parsed_content("network_def")
    inference = benchmark_inference(
        {"teacher": teacher, "student": student},
        (args.infer_batch, channels, *infer_size),
        device,
        amp,
        args.warmup,
        args.repeats,
    )
    inference.update({"image_size": infer_size, "batch": args.infer_batch, "amp": amp})

    tmp = work / name
    tmp.mkdir(parents=True, exist_ok=True)
    teacher_ckpt = tmp / "teacher.pt"
    torch.save(teacher.state_dict(), teacher_ckpt)  # random weights: the cost does not depend on them
    train_size = list(args.train_image_size or train.get_parsed_content("image_size"))
    batch_size = int(args.batch_size or train.get_parsed_content("batch_size"))
    override: dict[str, Any] = {
        "bundle_root": str(bundle),
        "teacher_ckpt": str(teacher_ckpt),
        "ckpt_dir": str(tmp / "models"),
        "output_dir": str(tmp / "eval"),
        "image_size": train_size,
        "batch_size": batch_size,
        **device_override(device, amp),
    }
    if args.num_workers is not None:
        override["num_workers"] = args.num_workers
    if args.dataset_dir:
        override["dataset_dir"] = str(Path(args.dataset_dir).resolve())
        data = "given (--dataset_dir)"
    else:
        data = synthetic_data_kind(name, channels, len(train_size))
        override["dataset_dir"] = str(
            synthetic_data(data, tmp / "data", train_size, batch_size, args.loader_batches, channels)
        )
    paraphrasers = make_paraphrasers(bundle, override, tmp / "paraphrasers")
    if paraphrasers:
        override["paraphraser_dir"] = str(tmp / "paraphrasers")
    methods = args.methods if args.methods is not None else method_names(bundle)
    training = benchmark_training(
        bundle,
        methods,
        override,
        device,
        args.warmup,
        args.repeats,
        args.loader_batches,
        args.extra_method or (),
    )
    training["data"] = data
    if paraphrasers:
        training["paraphrasers"] = paraphrasers
    return {"bundle": name, "inference": inference, "training": training}


def machine_info(device: torch.device) -> dict[str, Any]:
    """The platform, CPU/GPU, thread count and library versions of this run."""
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_1min"] = os.getloadavg()[0]  # other processes' load at the start
    try:
        import monai

        info["monai"] = monai.__version__
    except ImportError:  # pragma: no cover - monai is a dependency
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``python scripts/benchmark.py``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", nargs="+", default=None, help="bundle folder names (default: every bundle)")
    parser.add_argument("--out", default="outputs/benchmark", help="folder of benchmark.json / benchmark.md")
    parser.add_argument("--image_size", type=int, nargs="+", default=None, help="inference size (default: bundle's)")
    parser.add_argument("--infer_batch", type=int, default=1, help="inference batch size (default: 1)")
    parser.add_argument(
        "--train_image_size", type=int, nargs="+", default=None, help="training size (default: bundle's)"
    )
    parser.add_argument("--batch_size", type=int, default=None, help="training batch size (default: bundle's)")
    parser.add_argument("--methods", nargs="*", default=None, help="method names (default: configs/methods/*.json)")
    parser.add_argument("--extra_method", nargs="*", default=None, help="more override files to measure as methods")
    parser.add_argument(
        "--dataset_dir", default=None, help="a prepared dataset (default: synthetic data, see SYNTHETIC_DATA)"
    )
    parser.add_argument("--num_workers", type=int, default=None, help="loader workers (default: bundle's)")
    parser.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available)")
    amp = parser.add_mutually_exclusive_group()
    amp.add_argument("--amp", dest="amp", action="store_true", default=None, help="autocast on CUDA (default)")
    amp.add_argument("--no_amp", dest="amp", action="store_false", help="no autocast")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs of each measurement (default: 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs of each measurement (default: 7)")
    parser.add_argument("--loader_batches", type=int, default=None, help="batches to time the loader on (default: 6)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--keep_freed_memory",
        action="store_true",
        help="glibc: keep freed memory in the process (mallopt), avoiding page faults on every large allocation",
    )
    parser.add_argument("--quick", action="store_true", help="tiny setting: 32x32, batch 2, 3 repeats, no workers")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print the markdown tables and write ``benchmark.json`` and ``benchmark.md`` in ``--out``.

    Args:
        argv: arguments without the program name; None reads ``sys.argv``.
    """
    args = build_parser().parse_args(argv)
    defaults = QUICK if args.quick else {"warmup": 2, "repeats": 7, "loader_batches": 6}
    for key, value in defaults.items():
        if key == "image_size":
            args.image_size = args.image_size or value
            args.train_image_size = args.train_image_size or value
        elif getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    kept = keep_freed_memory() if args.keep_freed_memory else False
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    names = args.bundle or bundle_names()
    unknown = [n for n in names if not (BUNDLES / n / "configs" / "train.json").is_file()]
    if unknown:
        raise SystemExit(f"no bundle {unknown} under {BUNDLES} (available: {bundle_names()})")
    if not args.dataset_dir:  # fail before benchmarking anything when a bundle has no synthetic data
        for name in names:
            train = config_parser([BUNDLES / name / "configs" / "train.json"], {"bundle_root": str(BUNDLES / name)})
            size = args.train_image_size or train.get_parsed_content("image_size")
            try:
                synthetic_data_kind(name, input_channels(BUNDLES / name, train), len(size))
            except ValueError as error:
                raise SystemExit(str(error)) from None
    results: dict[str, Any] = {
        "command": "python scripts/benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {**machine_info(device), "keep_freed_memory": kept},
        "settings": {k: v for k, v in vars(args).items()},
        "bundles": [],
    }
    with tempfile.TemporaryDirectory(prefix="kd_benchmark_") as work:
        for name in names:
            logger.info("benchmarking %s", name)
            results["bundles"].append(benchmark_bundle(name, args, device, Path(work)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = markdown_report(results)
    (out / "benchmark.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "benchmark.md").write_text(f"Command: `{results['command']}`\n\n{report}\n")
    print(report)
    print(f"written: {out / 'benchmark.json'}, {out / 'benchmark.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
