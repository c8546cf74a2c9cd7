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
report the ratios. A method named with ``--methods`` that a bundle does not have, or whose trainer is not a
``DistillationTrainer`` (``none``: the student alone, i.e. step (a)), is listed as not measured.

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
initialised paraphrasers: the ``torch.save(...)`` statements that end that stage's ``run`` are evaluated untrained,
with ``paraphraser_dir`` in the temporary folder, and the methods load them from there (see
:func:`make_paraphrasers`).

On CUDA, AMP follows the bundle (``amp``) and every measurement synchronises the device; on CPU AMP is off.
Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` minus what was allocated before the call; on CPU the peak
of the tensor memory torch allocates during the call (sum of the profiler's allocation / free events), which
excludes memory held before the call (e.g. weights) and allocator overhead.

Examples::

    python scripts/benchmark.py                                   # every bundle, writes outputs/benchmark/
    python scripts/benchmark.py --bundle polyp_kdas --image_size 256 256 --batch_size 4 --out /tmp/bench
    python scripts/benchmark.py --quick                           # tiny setting (tests)
    python scripts/benchmark.py --quick --bundle pathology_coco --methods none coco --dataset_dir <prepared MoNuSeg>
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import os
import platform
import pydoc
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Events
from monai.bundle import ConfigParser
from monai.engines import SupervisedTrainer
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
if str(REPO) not in sys.path:  # `python scripts/benchmark.py` from anywhere
    sys.path.insert(0, str(REPO))

from kd_components.trainer import DistillationTrainer  # noqa: E402
from kd_components.utils import count_parameters  # noqa: E402

__all__ = [
    "SYNTHETIC_DATA",
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
    "flops_per_input",
    "peak_memory_mib",
    "benchmark_inference",
    "benchmark_training",
    "synthetic_data_kind",
    "make_paraphrasers",
    "benchmark_bundle",
    "markdown_report",
    "main",
]

logger = logging.getLogger("benchmark")

MIB = 2.0**20
QUICK = {"image_size": [32, 32], "batch_size": 2, "warmup": 1, "repeats": 3, "num_workers": 0, "loader_batches": 3}
# arguments of DistillationTrainer that SupervisedTrainer does not take
DISTILLATION_ARGS = ("teacher", "distiller", "supervised_weight", "check_finite", "train_handlers")
# synthetic data each bundle is benchmarked on without --dataset_dir (see _synthetic_data): "polyps" (RGB PNG images
# and 0/1 labels, the layout of prepared Kvasir-SEG and of prepared MoNuSeg tiles), "vessels" (grey X-ray-like for a
# 1-channel bundle, fundus-like for 3 channels), "volumes" (ACDC-like NIfTI volumes, prepared with their 2D slices);
# a bundle not listed here gets "polyps" when it is 2D with 3 input channels
SYNTHETIC_DATA = {
    "polyp_kdas": "polyps",
    "pathology_coco": "polyps",
    "vessel_lightvessel": "vessels",
    "multiorgan_graphflow": "volumes",
}


# --------------------------------------------------------------------------------------------------- measurement


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (CUDA); nothing on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize(seconds: Sequence[float]) -> dict[str, Any]:
    """Median, quartiles and inter-quartile range, in milliseconds, of repeated timings given in seconds (the
    samples are kept, in order, under ``"samples_ms"``)."""
    samples = [1e3 * s for s in seconds]
    ms = sorted(samples)
    if len(ms) >= 2:
        q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
    else:
        q1 = q3 = ms[0]
    return {
        "median_ms": statistics.median(ms),
        "q1_ms": q1,
        "q3_ms": q3,
        "iqr_ms": q3 - q1,
        "n": len(ms),
        "samples_ms": samples,
    }


def time_interleaved(
    calls: dict[str, Callable[[], Any]], warmup: int, repeats: int, device: torch.device
) -> dict[str, dict[str, Any]]:
    """Time every call ``repeats`` times after ``warmup`` untimed runs, one call of each per round.

    Interleaving spreads the load of other processes over all calls alike, so their ratios stay meaningful on a
    shared machine; the order is rotated by one call each round so that no call always runs first or last.

    Returns:
        ``{name: summarize(seconds)}``; ``samples_ms[r]`` of every call comes from round ``r``.
    """
    names = list(calls)
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in calls}
    faults: dict[str, list[int]] = {name: [] for name in calls}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            faults_before = _minor_faults()
            start = time.perf_counter()
            calls[name]()
            synchronize(device)
            samples[name].append(time.perf_counter() - start)
            faults[name].append(_minor_faults() - faults_before)
    return {name: {**summarize(s), "page_faults": statistics.median(faults[name])} for name, s in samples.items()}


def _minor_faults() -> int:
    """Minor page faults of this process so far (0 where ``resource`` is not available)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def keep_freed_memory(limit: int = 1 << 30) -> bool:
    """Ask glibc's allocator to keep freed memory instead of returning it to the system (Linux only).

    Sets ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` to ``limit`` bytes with ``mallopt``, as the environment
    variables ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` would: large tensors are then reused from the
    heap rather than mapped, zero-filled page by page (minor page faults) and unmapped at every step. Returns
    whether both settings were accepted.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, limit)) and bool(libc.mallopt(m_trim_threshold, limit))
    except (OSError, AttributeError):
        return False


def paired_ratio(numerator: Sequence[float], *denominator: Sequence[float]) -> dict[str, float]:
    """Median and quartiles over rounds of ``numerator[r] / sum(d[r] for d in denominator)``.

    Pairing the calls of one round cancels slow changes of the machine's load between rounds.
    """
    ratios = sorted(n / sum(d) for n, *d in zip(numerator, *denominator))
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) >= 2 else (ratios[0],) * 3
    return {"median": statistics.median(ratios), "q1": q1, "q3": q3}


def flops_per_input(network: nn.Module, example: torch.Tensor, amp: bool = False) -> float:
    """FLOPs of one forward pass per input item (``FlopCounterMode`` counts, divided by the batch size)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), _autocast(example.device, amp), counter:
        network(example)
    return counter.get_total_flops() / example.shape[0]


def peak_memory_mib(fn: Callable[[], Any], device: torch.device) -> float:
    """Peak memory (MiB) allocated by ``fn()`` beyond what was allocated before it.

    CUDA: ``torch.cuda.max_memory_allocated`` after a peak reset, minus the memory allocated before. CPU: the
    running sum of the profiler's memory events (allocations and frees of tensor memory) during the call, at its
    maximum; allocations made before the call are not counted.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / MIB
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        if event.device_type() == torch.device("cpu").type or str(event.device_type()).endswith("CPU"):
            current += event.nbytes()
            peak = max(peak, current)
    return peak / MIB


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device_type=device.type, enabled=True) if enabled else nullcontext()


def _ratio(num: float, den: float) -> float:
    return num / den if den and math.isfinite(num) and math.isfinite(den) else float("nan")


# ----------------------------------------------------------------------------------------------------- bundles


def bundle_names(root: Path = BUNDLES) -> list[str]:
    """Folders under ``root`` that have ``configs/train.json``, sorted."""
    return sorted(p.parent.parent.name for p in root.glob("*/configs/train.json"))


def method_names(bundle: Path) -> list[str]:
    """The bundle's method override files (``configs/methods/<name>.json``), sorted by name."""
    return sorted(p.stem for p in (bundle / "configs" / "methods").glob("*.json"))


def _parser(files: Sequence[Path], override: dict[str, Any]) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    parser.update(override)
    return parser


def _input_channels(bundle: Path, parser: ConfigParser) -> int:
    meta = bundle / "configs" / "metadata.json"
    if meta.is_file():
        inputs = json.loads(meta.read_text()).get("network_data_format", {}).get("inputs", {})
        for item in inputs.values():
            if "num_channels" in item:
                return int(item["num_channels"])
    return int(parser.get("network_def#in_channels", 1))


def _device_override(device: torch.device, amp: bool) -> dict[str, Any]:
    return {"device": f"$torch.device('{device}')", "amp": amp}


# --------------------------------------------------------------------------------------------------- inference


def benchmark_inference(
    networks: dict[str, nn.Module],
    input_shape: Sequence[int],
    device: torch.device,
    amp: bool,
    warmup: int,
    repeats: int,
) -> dict[str, Any]:
    """Parameters, FLOPs per input, latency, throughput and peak memory of each network (eval, no gradients).

    Args:
        networks: ``{"teacher": ..., "student": ...}``.
        input_shape: the input shape with batch and channels, e.g. ``(1, 3, 352, 352)``.
        device: where to run.
        amp: run under autocast.
        warmup: untimed runs first.
        repeats: timed runs (interleaved between the networks).

    Returns:
        ``{name: {...}, "ratios": {student / teacher for each quantity}}`` when both names are given.
    """
    example = torch.rand(*input_shape, device=device)
    calls = {}
    result: dict[str, Any] = {}
    for name, net in networks.items():
        net.to(device).eval()

        def forward(net: nn.Module = net) -> None:
            with torch.no_grad(), _autocast(device, amp):
                net(example)

        calls[name] = forward
        result[name] = {
            "params": count_parameters(net),
            "gflops_per_input": flops_per_input(net, example, amp) / 1e9,
        }
    timings = time_interleaved(calls, warmup, repeats, device)
    for name, fn in calls.items():
        latency = timings[name]
        result[name]["latency"] = latency
        result[name]["images_per_s"] = _ratio(input_shape[0] * 1e3, latency["median_ms"])
        result[name]["peak_mib"] = peak_memory_mib(fn, device)
    if "teacher" in result and "student" in result:
        s, t = result["student"], result["teacher"]
        result["ratios"] = {
            "params": _ratio(s["params"], t["params"]),
            "gflops_per_input": _ratio(s["gflops_per_input"], t["gflops_per_input"]),
            "latency": _ratio(s["latency"]["median_ms"], t["latency"]["median_ms"]),
            "images_per_s": _ratio(s["images_per_s"], t["images_per_s"]),
            "peak_mib": _ratio(s["peak_mib"], t["peak_mib"]),
        }
    return result


# ---------------------------------------------------------------------------------------------------- training


PLAIN_ID = "benchmark_plain_trainer"


def trainer_config(parser: ConfigParser, trainer_id: str = "train#trainer") -> Any:
    """The raw config of the trainer entry, following ``"@id"`` references and ``"%id"`` macros (e.g.
    ``"@train#supervised_trainer"``)."""
    config = parser.get(trainer_id)
    seen: set[str] = set()
    while isinstance(config, str) and config.startswith(("@", "%")) and config not in seen:
        seen.add(config)
        config = parser.get(config[1:])
    return config


def is_distillation_trainer(config: Any) -> bool:
    """Whether a raw trainer config builds a :class:`DistillationTrainer` (or a subclass), without building it."""
    target = config.get("_target_") if isinstance(config, dict) else None
    cls = pydoc.locate(target) if isinstance(target, str) else None
    return isinstance(cls, type) and issubclass(cls, DistillationTrainer)


def add_plain_trainer(parser: ConfigParser, trainer_id: str = "train#trainer") -> str:
    """Add to ``parser`` a ``SupervisedTrainer`` entry made from the bundle's trainer entry without the
    distillation arguments; returns its id.

    Call it before anything is parsed: resolved from the same parser, the plain trainer then shares the student,
    optimizer, supervised loss, inferer, AMP setting and postprocessing objects of the distillation trainer, i.e.
    it is the plain step of the same run.
    """
    config = dict(trainer_config(parser, trainer_id))
    accepted = inspect.signature(SupervisedTrainer.__init__).parameters
    for key in list(config):
        if key in DISTILLATION_ARGS or not (key.startswith("_") or key in accepted):
            config.pop(key)  # also the arguments of subclasses, e.g. an adversarial trainer's discriminators
    config["_target_"] = "monai.engines.SupervisedTrainer"
    parser[PLAIN_ID] = config
    return PLAIN_ID


def run_iteration(trainer: SupervisedTrainer, batch: Any) -> None:
    """One training iteration as the engine runs it: ``ITERATION_STARTED`` handlers, then ``_iteration``.

    The outputs are released afterwards (the engine would keep them until the next iteration).
    """
    trainer.state.iteration += 1
    trainer.state.batch = batch
    trainer.fire_event(Events.ITERATION_STARTED)
    trainer._iteration(trainer, batch)
    trainer.state.batch = trainer.state.output = None


def _reset_state(trainer: SupervisedTrainer, epoch_length: int) -> None:
    trainer.state.iteration = 0
    trainer.state.epoch = 1
    trainer.state.epoch_length = epoch_length
    trainer.state.max_epochs = 1


def benchmark_loader(loader: Any, batches: int) -> tuple[dict[str, Any], list[Any]]:
    """Time the training data loader: its first batch (worker start-up included), then ``batches`` more, over as
    many epochs as needed; also returns up to ``batches`` of the batches read, to feed the training steps."""
    times: list[float] = []
    first: float | None = None
    kept: list[Any] = []
    while len(times) < batches:
        read = 0
        start = time.perf_counter()
        for batch in loader:
            elapsed = time.perf_counter() - start
            read += 1
            if first is None:
                first = elapsed
            else:
                times.append(elapsed)
            if len(kept) < batches and (not kept or _batch_len(batch) == _batch_len(kept[0])):
                kept.append(batch)  # full batches only (an epoch's last batch may be smaller)
            if len(times) >= batches:
                break
            start = time.perf_counter()
        if read == 0:
            raise ValueError("the training data loader is empty")
    return {
        "first_batch_s": first,
        "per_batch": summarize(times),
        "num_workers": getattr(loader, "num_workers", 0),
    }, kept


def _batch_len(batch: Any) -> int:
    first = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    return len(first)


def benchmark_training(
    bundle: Path,
    methods: Sequence[str],
    override: dict[str, Any],
    device: torch.device,
    warmup: int,
    repeats: int,
    loader_batches: int,
    extra_methods: Sequence[Path] = (),
) -> dict[str, Any]:
    """Per-iteration cost of the plain student step, the teacher forward and each distillation method.

    Args:
        bundle: the bundle folder.
        methods: method names (``configs/methods/<name>.json``); methods the bundle does not have and methods whose
            trainer is not a ``DistillationTrainer`` (e.g. ``none``, the student alone) are listed as skipped.
        override: config overrides (data, checkpoints, sizes, device, AMP).
        device: where the trainers run.
        warmup: untimed iterations of each call first.
        repeats: timed iterations of each call (interleaved).
        loader_batches: batches to time the loader on (and to feed the steps).
        extra_methods: more override files (any path), reported under their file stem.

    Returns:
        ``{"student_step", "teacher_forward", "methods": {name: {...}}, "loader", "skipped"}``.
    """
    configs = bundle / "configs"
    files = {m: [configs / "train.json", configs / "methods" / f"{m}.json"] for m in methods}
    files.update({Path(p).stem: [configs / "train.json", Path(p)] for p in extra_methods})
    if not files:
        files = {"train": [configs / "train.json"]}
    trainers: dict[str, DistillationTrainer] = {}
    skipped: dict[str, str] = {}
    first_parser: ConfigParser | None = None
    plain: SupervisedTrainer | None = None
    build_s: dict[str, float] = {}
    for name, names in files.items():
        if not names[-1].is_file():  # e.g. a method of another bundle, in a run over several bundles
            skipped[name] = f"the bundle has no {names[-1].relative_to(bundle.parent)}"
            continue
        parser = _parser(names, override)
        config = trainer_config(parser)
        if not is_distillation_trainer(config):
            target = config.get("_target_") if isinstance(config, dict) else config
            skipped[name] = f"its trainer ({target}) is not a DistillationTrainer"
            continue
        plain_id = add_plain_trainer(parser) if plain is None else None
        start = time.perf_counter()
        trainer = parser.get_parsed_content("train#trainer")
        build_s[name] = time.perf_counter() - start
        trainers[name] = trainer
        if plain_id is not None:
            plain = parser.get_parsed_content(plain_id)
            first_parser = parser
    if not trainers:
        return {"skipped": skipped, "methods": {}}
    reference = next(iter(trainers.values()))
    batch_size = int(first_parser.get_parsed_content("batch_size"))
    size = list(first_parser.get_parsed_content("image_size"))
    loader_stats, batches = benchmark_loader(reference.data_loader, loader_batches)
    loader_stats["cache_and_build_s"] = build_s[next(iter(trainers))]

    counter = {"i": 0}

    def next_batch() -> Any:
        counter["i"] += 1
        return batches[counter["i"] % len(batches)]

    for trainer in [plain, *trainers.values()]:
        _reset_state(trainer, epoch_length=(warmup + repeats) * 4)
    teacher = reference.teacher

    def teacher_forward() -> None:
        batch = next_batch()
        image = reference.prepare_batch(batch, device, reference.non_blocking)[0]
        with torch.no_grad(), _autocast(device, reference.amp):
            reference.inferer(image.as_tensor() if hasattr(image, "as_tensor") else image, teacher)

    calls: dict[str, Callable[[], None]] = {
        "student_step": lambda: run_iteration(plain, next_batch()),
        "teacher_forward": teacher_forward,
    }
    for name, trainer in trainers.items():
        calls[f"method:{name}"] = lambda trainer=trainer: run_iteration(trainer, next_batch())
    timings = time_interleaved(calls, warmup, repeats, device)
    peaks = {name: peak_memory_mib(fn, device) for name, fn in calls.items()}

    base = timings["student_step"]["median_ms"] + timings["teacher_forward"]["median_ms"]
    result: dict[str, Any] = {
        "image_size": size,
        "batch_size": batch_size,
        "batch_items": _batch_len(batches[0]),
        "amp": bool(reference.amp),
        "student_step": {**timings["student_step"], "peak_mib": peaks["student_step"]},
        "teacher_forward": {**timings["teacher_forward"], "peak_mib": peaks["teacher_forward"]},
        "ideal_ms": base,
        "methods": {},
        "loader": loader_stats,
        "skipped": skipped,
    }
    for name, trainer in trainers.items():
        key = f"method:{name}"
        result["methods"][name] = {
            **timings[key],
            "peak_mib": peaks[key],
            "overhead_ratio": paired_ratio(
                timings[key]["samples_ms"],
                timings["student_step"]["samples_ms"],
                timings["teacher_forward"]["samples_ms"],
            )["median"],
            "overhead_ratio_quartiles": paired_ratio(
                timings[key]["samples_ms"],
                timings["student_step"]["samples_ms"],
                timings["teacher_forward"]["samples_ms"],
            ),
            "ratio_of_medians": _ratio(timings[key]["median_ms"], base),
            "terms": [t.name for t in trainer._terms.terms],
            "student_taps": list(trainer.student_taps.names),
            "teacher_taps": list(trainer.teacher_taps.names),
        }
    for trainer in trainers.values():  # release the forward hooks
        trainer.student_taps.remove()
        trainer.teacher_taps.remove()
    return result


# ------------------------------------------------------------------------------------------------------ bundle


def synthetic_data_kind(name: str, channels: int, spatial_dims: int) -> str:
    """Which synthetic data the bundle ``name`` is benchmarked on without ``--dataset_dir`` (see
    :data:`SYNTHETIC_DATA`): its entry there, else ``"polyps"`` for a 2D bundle with 3 input channels.

    Raises:
        ValueError: for any other bundle, saying to give ``--dataset_dir`` or to add it to ``SYNTHETIC_DATA``.
    """
    if name in SYNTHETIC_DATA:
        return SYNTHETIC_DATA[name]
    if spatial_dims == 2 and channels == 3:
        return "polyps"
    raise ValueError(
        f"no synthetic data for bundle {name!r} ({spatial_dims}D, {channels} input channels): give --dataset_dir "
        f"(a dataset prepared for it) or add it to SYNTHETIC_DATA in scripts/benchmark.py (kinds: "
        f"{sorted(set(SYNTHETIC_DATA.values()))})"
    )


def _synthetic_data(
    kind: str, out: Path, size: Sequence[int], batch_size: int, batches: int, channels: int = 3
) -> Path:
    """Write tiny synthetic data of ``kind`` (:data:`SYNTHETIC_DATA`) in ``out`` with enough training items for
    ``batches + 1`` full batches; returns the folder to pass as ``dataset_dir``."""
    n = max(10, math.ceil(batch_size * (batches + 1) / 0.8) + 2)  # the training split holds 80%
    height, width = int(size[0]), int(size[1])
    if kind == "polyps":
        from kd_components.data.synthetic import make_synthetic_polyps

        make_synthetic_polyps(out, n=n, size=(height, width), seed=0, overwrite=True)
    elif kind == "vessels":
        from kd_components.data.synthetic_vessels import make_synthetic_vessels

        modality = "xray" if channels == 1 else "fundus"
        make_synthetic_vessels(out, n=n, size=(height, width), seed=0, overwrite=True, modality=modality)
    elif kind == "volumes":
        from kd_components.data.synthetic_volumes import make_synthetic_volumes
        from kd_components.data.volumes import prepare_acdc_data, write_slices

        depth = 4  # slices per volume, two volumes per patient; 1/9 of the "train" patients go to the test split
        patients = max(5, math.ceil(batch_size * (batches + 1) / (2 * depth) * 9 / 8) + 2)
        raw = make_synthetic_volumes(out.parent / f"{out.name}_raw", patients, (height, width, depth), val=(2,))
        write_slices(prepare_acdc_data(raw, out, overwrite=True), overwrite=True)
    else:
        raise ValueError(f"unknown synthetic data kind {kind!r} (kinds: {sorted(set(SYNTHETIC_DATA.values()))})")
    return out


def make_paraphrasers(bundle: Path, override: dict[str, Any], out_dir: Path) -> list[str]:
    """Save randomly initialised paraphrasers where the bundle's distillation methods load them from ``out_dir``.

    The bundle's paraphraser stage (``configs/train.json`` + ``configs/train_paraphraser.json``) ends by saving each
    trained paraphraser, ``"$kd_components.save_state_dict(@<network>, @<checkpoint path>)"`` (or ``torch.save``) in
    its ``run`` list; these statements are evaluated as they are, with ``paraphraser_dir`` set to ``out_dir`` and
    without training (weights do not change the cost, as for the teacher). Returns the names of the files written
    (none without the stage).

    Raises:
        ValueError: when the stage's ``run`` saves nothing with ``kd_components.save_state_dict`` / ``torch.save``.
    """
    configs = bundle / "configs"
    stage = configs / "train_paraphraser.json"
    if not stage.is_file():
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    parser = _parser([configs / "train.json", stage], {**override, "paraphraser_dir": str(out_dir)})
    save = r"^\$\s*(torch\.save|kd_components\.save_state_dict)\("
    saves = [e for e in parser.get("run", []) if isinstance(e, str) and re.match(save, e)]
    if not saves:
        raise ValueError(f"{stage} saves no paraphraser (torch.save / kd_components.save_state_dict) in its run list")
    parser["benchmark_save_paraphrasers"] = "$[" + ", ".join(e.strip()[1:] for e in saves) + "]"
    before = {p.name for p in out_dir.iterdir()}
    parser.get_parsed_content("benchmark_save_paraphrasers")
    return sorted(p.name for p in out_dir.iterdir() if p.name not in before)


def benchmark_bundle(name: str, args: argparse.Namespace, device: torch.device, work: Path) -> dict[str, Any]:
    """Inference and training benchmarks of one bundle (see the module docstring)."""
    bundle = BUNDLES / name
    configs = bundle / "configs"
    train = _parser([configs / "train.json"], {"bundle_root": str(bundle)})
    amp = bool(args.amp) if args.amp is not None else device.type == "cuda"
    amp = amp and device.type == "cuda"
    infer_file = configs / "inference.json"
    infer = _parser([infer_file], {"bundle_root": str(bundle)}) if infer_file.is_file() else train
    infer_size = list(args.image_size or infer.get_parsed_content("image_size"))
    channels = _input_channels(bundle, train)
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
        **_device_override(device, amp),
    }
    if args.num_workers is not None:
        override["num_workers"] = args.num_workers
    if args.dataset_dir:
        override["dataset_dir"] = str(Path(args.dataset_dir).resolve())
        data = "given (--dataset_dir)"
    else:
        data = synthetic_data_kind(name, channels, len(train_size))
        override["dataset_dir"] = str(
            _synthetic_data(data, tmp / "data", train_size, batch_size, args.loader_batches, channels)
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


# ----------------------------------------------------------------------------------------------------- reports


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _size(size: Sequence[int]) -> str:
    return "×".join(str(s) for s in size)


def _items(training: dict[str, Any]) -> str:
    """`` (N patches per iteration)`` when the loader's batches hold N != batch size items (random crops)."""
    items = training.get("batch_items", training["batch_size"])
    return f" ({items} patches per iteration)" if items != training["batch_size"] else ""


def markdown_report(results: dict[str, Any]) -> str:
    """Markdown tables (inference, training) of every bundle in ``results`` (the JSON written by :func:`main`)."""
    machine = results["machine"]
    lines = [
        f"Machine: {machine.get('gpu', machine['platform'])}, device {machine['device']}, "
        f"{machine['torch_threads']} torch threads, torch {machine['torch']}"
        + (", glibc keeping freed memory (mallopt)." if machine.get("keep_freed_memory") else "."),
        "",
    ]
    for item in results["bundles"]:
        inf, tr = item["inference"], item["training"]
        lines += [
            f"### {item['bundle']}: inference ({_size(inf['image_size'])}, batch {inf['batch']}, "
            f"AMP {'on' if inf['amp'] else 'off'})",
            "",
            "| network | params | GFLOPs / input | latency median (ms) | latency IQR (ms) | images / s "
            "| peak memory (MiB) |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name in ("teacher", "student"):
            r = inf[name]
            lines.append(
                f"| {name} | {_fmt(r['params'])} | {_fmt(r['gflops_per_input'], 2)} | "
                f"{_fmt(r['latency']['median_ms'])} | {_fmt(r['latency']['iqr_ms'])} | {_fmt(r['images_per_s'])} | "
                f"{_fmt(r['peak_mib'])} |"
            )
        if "ratios" in inf:
            q = inf["ratios"]
            lines.append(
                f"| student / teacher | {_fmt(q['params'], 3)} | {_fmt(q['gflops_per_input'], 3)} | "
                f"{_fmt(q['latency'], 3)} | | {_fmt(q['images_per_s'], 2)} | {_fmt(q['peak_mib'], 3)} |"
            )
        lines.append("")
        if not tr.get("methods"):
            lines += [f"Training: no distillation method to measure ({tr.get('skipped')}).", ""]
            continue
        lines += [
            f"### {item['bundle']}: training iteration ({_size(tr['image_size'])}, batch {tr['batch_size']}"
            + _items(tr)
            + f", AMP {'on' if tr['amp'] else 'off'})",
            "",
            "| step | median (ms) | IQR (ms) | peak memory (MiB) | minor page faults | overhead (c) / ((a) + (b)) "
            "| its IQR over rounds |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        a, b = tr["student_step"], tr["teacher_forward"]
        lines.append(
            f"| (a) student step (forward + backward + optimizer) | {_fmt(a['median_ms'])} | {_fmt(a['iqr_ms'])} | "
            f"{_fmt(a['peak_mib'])} | {_fmt(a.get('page_faults'), 0)} | | |"
        )
        lines.append(
            f"| (b) teacher forward, no gradients | {_fmt(b['median_ms'])} | {_fmt(b['iqr_ms'])} | "
            f"{_fmt(b['peak_mib'])} | {_fmt(b.get('page_faults'), 0)} | | |"
        )
        lines.append(f"| (a) + (b) | {_fmt(tr['ideal_ms'])} | | | | 1.000 (ideal) | |")
        for name, m in tr["methods"].items():
            lines.append(
                f"| (c) {name}: DistillationTrainer iteration ({', '.join(m['terms'])}) | {_fmt(m['median_ms'])} | "
                f"{_fmt(m['iqr_ms'])} | {_fmt(m['peak_mib'])} | {_fmt(m.get('page_faults'), 0)} | "
                f"**{_fmt(m['overhead_ratio'], 3)}** | "
                f"{_fmt(m['overhead_ratio_quartiles']['q3'] - m['overhead_ratio_quartiles']['q1'], 3)} |"
            )
        loader = tr["loader"]
        if "per_batch" in loader:
            p = loader["per_batch"]
            lines.append(
                f"| data loader, per batch ({loader['num_workers']} workers; first batch "
                f"{_fmt(loader['first_batch_s'], 2)} s, dataset cache + trainer build "
                f"{_fmt(loader['cache_and_build_s'], 2)} s) | {_fmt(p['median_ms'])} | {_fmt(p['iqr_ms'])} | | | | |"
            )
        else:
            lines.append(f"| data loader | {loader.get('skipped', 'n/a')} | | | | | |")
        if tr.get("skipped"):
            lines.append("")
            lines.append("Not measured: " + "; ".join(f"{k} ({v})" for k, v in tr["skipped"].items()) + ".")
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------- CLI


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
            train = _parser([BUNDLES / name / "configs" / "train.json"], {"bundle_root": str(BUNDLES / name)})
            size = args.train_image_size or train.get_parsed_content("image_size")
            try:
                synthetic_data_kind(name, _input_channels(BUNDLES / name, train), len(size))
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
