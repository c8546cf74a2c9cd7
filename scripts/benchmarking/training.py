"""Training benchmark: the plain student step, the teacher forward and each distillation method's iteration."""

from __future__ import annotations

import inspect
import math
import pydoc
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Events
from monai.bundle import ConfigParser
from monai.engines import SupervisedTrainer

from kd_components.trainer import DistillationTrainer

from .bundles import config_parser
from .measure import autocast, paired_ratio, peak_memory_mib, ratio, summarize, time_interleaved

__all__ = [
    "DISTILLATION_ARGS",
    "PLAIN_ID",
    "trainer_config",
    "is_distillation_trainer",
    "add_plain_trainer",
    "run_iteration",
    "lever_cycle",
    "per_iteration",
    "run_cycle",
    "benchmark_loader",
    "benchmark_training",
]

# arguments of DistillationTrainer that SupervisedTrainer does not take
DISTILLATION_ARGS = ("teacher", "distiller", "supervised_weight", "check_finite", "train_handlers")
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


def lever_cycle(trainer: SupervisedTrainer) -> int:
    """Iterations after which a trainer's amortised critic schedule repeats (1 without one).

    With ``critic_every = n``, ``gp_every = k`` and ``discriminator_steps = s``, the critic updates every ``n``
    iterations and its penalty runs every ``k`` critic steps, so the pattern repeats after
    ``n · k / gcd(s, k)`` iterations. Timing and peak memory over one such cycle measure what the schedule costs on
    average and at its worst iteration; a single iteration would measure whichever iteration it happened to be.
    """
    step = getattr(trainer, "adversarial", None)
    if step is None or step.steps == 0:
        return 1
    return step.critic_every * step.gp_every // math.gcd(step.steps, step.gp_every)


def run_cycle(trainer: SupervisedTrainer, iterations: int, next_batch: Callable[[], Any]) -> None:
    """``iterations`` consecutive training iterations, each on the next batch."""
    for _ in range(iterations):
        run_iteration(trainer, next_batch())


def per_iteration(timing: dict[str, Any], iterations: int) -> dict[str, Any]:
    """A timing of calls of ``iterations`` iterations each, as the mean iteration of each call."""
    if iterations == 1:
        return timing
    seconds = [ms / 1e3 / iterations for ms in timing["samples_ms"]]
    return {**summarize(seconds), "page_faults": timing["page_faults"] / iterations}


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
        methods: method names (``configs/methods/<name>.json``); methods the bundle does not have, methods whose
            trainer is not a ``DistillationTrainer`` and methods without distillation terms or teacher (``none``:
            the student alone, i.e. step (a)) are listed as skipped.
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
        parser = config_parser(names, override)
        config = trainer_config(parser)
        if not is_distillation_trainer(config):
            target = config.get("_target_") if isinstance(config, dict) else config
            skipped[name] = f"its trainer ({target}) is not a DistillationTrainer"
            continue
        if parser.get("distill#terms", None) == [] or parser.get("teacher", "") is None:
            skipped[name] = "no distillation term (the student alone: step (a))"
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

    cycles = {name: lever_cycle(trainer) for name, trainer in trainers.items()}
    for trainer in [plain, *trainers.values()]:
        _reset_state(trainer, epoch_length=(warmup + repeats) * 4 * max(cycles.values()))
    teacher = reference.teacher

    def teacher_forward() -> None:
        batch = next_batch()
        image = reference.prepare_batch(batch, device, reference.non_blocking)[0]
        with torch.no_grad(), autocast(device, reference.amp):
            reference.inferer(image.as_tensor() if hasattr(image, "as_tensor") else image, teacher)

    calls: dict[str, Callable[[], None]] = {
        "student_step": lambda: run_iteration(plain, next_batch()),
        "teacher_forward": teacher_forward,
    }
    for name, trainer in trainers.items():
        calls[f"method:{name}"] = lambda trainer=trainer, n=cycles[name]: run_cycle(trainer, n, next_batch)
    timings = time_interleaved(calls, warmup, repeats, device)
    for name, n in cycles.items():  # a sample is the mean iteration of its cycle
        timings[f"method:{name}"] = per_iteration(timings[f"method:{name}"], n)
    peaks = {name: peak_memory_mib(fn, device) for name, fn in calls.items()}  # methods: the cycle's worst iteration

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
            "ratio_of_medians": ratio(timings[key]["median_ms"], base),
            "lever_cycle": cycles[name],
            "terms": [t.name for t in trainer._terms.terms],
            "student_taps": list(trainer.student_taps.names),
            "teacher_taps": list(trainer.teacher_taps.names),
        }
    for trainer in trainers.values():  # release the forward hooks
        trainer.student_taps.remove()
        trainer.teacher_taps.remove()
    return result
