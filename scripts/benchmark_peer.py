"""Side by side with torchdistill: the same distillation step in our trainer and in torchdistill's DistillationBox.

For each method (default: logit KD and attention transfer, AT), in one process:

* **ours**: one iteration of the ``polyp_kdas`` bundle's own ``DistillationTrainer`` (``configs/train.json`` +
  ``configs/methods/<method>.json``, built with ``monai.bundle.ConfigParser``; the same call as
  ``scripts/benchmark.py``: ``ITERATION_STARTED`` handlers, then ``trainer._iteration``);
* **theirs**: one step of ``torchdistill.core.distillation.DistillationBox`` (torchdistill 1.1.5) as its training
  loops run it: ``pre_forward_process``, ``forward_process`` (teacher under ``no_grad``, student, the criterion),
  ``post_forward_process`` (backward, optimizer step, ``zero_grad``);

with the same networks (deep copies of our trainer's student and teacher, so the weights are equal at the start
and the forward hooks of one library never run in the other's step), the same batches (from the bundle's training
data loader), the same optimizer (AdamW, the bundle's learning rate and weight decay) and the same loss:

* supervised term: our ``StructureLoss`` (the bundle's), in torchdistill wrapped in its ``SimpleLossWrapper``;
* ``logit_kd``: ours ``LogitKDLoss(temperature=4)`` (the mean over pixels of the KL divergence, times tau^2);
  theirs ``KDLoss(temperature=4, alpha=0)`` (``KLDivLoss`` with ``batchmean``: the sum over pixels per
  image), weighted tau^2 / pixels so that both are the same number;
* ``at``: ours ``AttentionTransferLoss(p=2)``, weight 500; theirs ``ATLoss(mode="code")`` on the same module path
  (a forward hook of torchdistill's), weight 500: the same formula.

Before timing, both take one step from the same weights on the same batch: their loss values and the student
weights after the optimizer step must agree (reported as ``same_step``). Then the calls are timed interleaved round
by round (rotated order), with the floor of ``scripts/benchmark.py`` beside them: (a) a plain student step and
(b) the teacher forward. The result is the median over rounds of ours / theirs for each method; 1.0 means the same
speed, < 1 ours is faster.

torchdistill needs torchvision, whose PyPI wheels need the matching CUDA build of torch (with the CPU torch,
``torchvision::nms`` is missing), so run this in an environment of its own; the CUDA torch runs on CPU::

    python -m venv /work/venvs/peer
    /work/venvs/peer/bin/pip install torch torchvision torchdistill==1.1.5 monai==1.6.1 pytorch-ignite
    /work/venvs/peer/bin/pip install -e . --no-deps
    OMP_NUM_THREADS=1 /work/venvs/peer/bin/python scripts/benchmark_peer.py --threads 1 --out outputs/benchmark_peer

Without torchdistill the script says so and exits 0 (nothing is measured).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python scripts/benchmark_peer.py` from anywhere
    sys.path.insert(0, str(REPO))

from scripts.benchmarking.bundles import BUNDLES, config_parser, device_override, synthetic_data  # noqa: E402
from scripts.benchmarking.measure import (  # noqa: E402
    autocast,
    keep_freed_memory,
    paired_ratio,
    peak_memory_mib,
    synchronize,
    time_interleaved,
)
from scripts.benchmarking.report import fmt  # noqa: E402
from scripts.benchmarking.training import add_plain_trainer, benchmark_loader, run_iteration  # noqa: E402

__all__ = [
    "METHODS",
    "torchdistill_version",
    "peer_criterion",
    "build_peer_box",
    "peer_step",
    "operator_profile",
    "same_step",
    "benchmark_peer",
    "markdown_report",
    "main",
]

BUNDLE = "polyp_kdas"
# method -> the tap both libraries read (None: logits only); the same path in teacher and student
METHODS: dict[str, str | None] = {"logit_kd": None, "at": "model.1.submodule.1.submodule.0"}
QUICK = {"image_size": [32, 32], "batch_size": 2, "warmup": 1, "repeats": 3}


def torchdistill_version() -> str | None:
    """torchdistill's version when it imports (with torchvision), else None."""
    try:
        import torchdistill
        from torchdistill.core.distillation import DistillationBox  # noqa: F401
    except Exception:  # ImportError, or torchvision's missing operators with a mismatched torch (RuntimeError)
        return None
    return str(torchdistill.__version__)


def _term(trainer: Any, name: str) -> Any:
    (term,) = [t for t in trainer._terms.terms if t.name == name]
    return term


def peer_criterion(trainer: Any, method: str, pixels: int) -> dict[str, Any]:
    """torchdistill's criterion config (``WeightedSumLoss``) equal to our trainer's loss for ``method``.

    Args:
        trainer: our ``DistillationTrainer`` of the method (its supervised loss, weights and term are read).
        method: ``"logit_kd"`` or ``"at"``.
        pixels: spatial positions per image (``KDLoss`` sums over them, ours averages).
    """
    from torchdistill.losses.mid_level import SimpleLossWrapper

    # the supervised loss: ``supervised_loss`` where the trainer wraps ``loss_function``, else ``loss_function``
    supervised = SimpleLossWrapper(
        getattr(trainer, "supervised_loss", None) or trainer.loss_function,
        input={"is_from_teacher": False, "module_path": ".", "io": "output"},
        target={"uses_label": True},
    )
    term = _term(trainer, method)
    weight = float(term.weight_at(1, 1))
    if method == "logit_kd":
        tau = float(term.loss.temperature)
        kd = {
            "criterion": {
                "key": "KDLoss",
                "kwargs": {
                    "student_module_path": ".",
                    "student_module_io": "output",
                    "teacher_module_path": ".",
                    "teacher_module_io": "output",
                    "temperature": tau,
                    "alpha": 0.0,  # 0: the soft term alone (KL, batchmean), no cross-entropy
                },
            },
            "weight": weight * tau**2 / pixels,
        }
    elif method == "at":
        if float(term.loss.p) != 2.0:
            raise ValueError(f"torchdistill's ATLoss squares the features; our term has p={term.loss.p}")
        pair = {"io": "output", "path": METHODS["at"]}
        kd = {
            "criterion": {
                "key": "ATLoss",
                "kwargs": {"at_pairs": {"pair": {"student": pair, "teacher": pair, "weight": 1}}, "mode": "code"},
            },
            "weight": weight,
        }
    else:
        raise ValueError(f"no torchdistill counterpart for {method!r} (methods: {sorted(METHODS)})")
    return {
        "key": "WeightedSumLoss",
        "kwargs": {
            "sub_terms": {
                "supervised": {"criterion": supervised, "weight": float(trainer.supervised_weight)},
                method: kd,
            }
        },
    }


def build_peer_box(trainer: Any, method: str, pixels: int, device: torch.device) -> Any:
    """A torchdistill ``DistillationBox`` on copies of ``trainer``'s student and teacher, with its optimizer's
    settings and the loss of :func:`peer_criterion`; the student in train mode, the teacher frozen in eval mode."""
    from torchdistill.core.distillation import DistillationBox
    from torchdistill.core.interfaces import forward_proc  # noqa: F401  registers "forward_batch_only"

    group = trainer.optimizer.param_groups[0]
    tap = METHODS[method]
    hooks: dict[str, Any] = {"forward_proc": "forward_batch_only"}  # model(images)
    if tap:
        hooks["forward_hook"] = {"output": [tap]}
    train_config = {
        "num_epochs": 1,
        "teacher": {**hooks, "requires_grad": False},
        "student": {**hooks, "requires_grad": True},
        "optimizer": {
            "key": type(trainer.optimizer).__name__,
            "kwargs": {"lr": group["lr"], "weight_decay": group["weight_decay"], "betas": group["betas"]},
        },
        "criterion": peer_criterion(trainer, method, pixels),
    }
    teacher = copy.deepcopy(trainer.teacher).to(device).eval()
    student = copy.deepcopy(trainer.network).to(device)
    box = DistillationBox(teacher, student, {}, train_config, device, None, False, 1)
    box.pre_epoch_process(epoch=0)  # clears the I/O dicts, student.train()
    box.teacher_model.eval()
    return box


def operator_profile(fn: Any, steps: int, rows: int = 12) -> str:
    """The ``torch.profiler`` operator table (top ``rows`` by self CPU time) of ``steps`` calls of ``fn``."""
    from torch.profiler import profile

    with profile() as prof:
        for _ in range(steps):
            fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def _tensor(x: Any, device: torch.device) -> torch.Tensor:
    return (x.as_tensor() if hasattr(x, "as_tensor") else x).to(device)


def peer_step(box: Any, batch: dict[str, Any], device: torch.device) -> torch.Tensor:
    """One torchdistill training step on ``batch`` (``{"image", "label"}``); returns the (detached) loss."""
    image, label = _tensor(batch["image"], device), _tensor(batch["label"], device)
    box.pre_forward_process()
    loss = box.forward_process(image, label, supp_dict={})
    box.post_forward_process(loss)
    return loss.detach()


def _our_step(trainer: Any, batch: Any) -> float:
    from ignite.engine import Events
    from monai.utils import CommonKeys

    trainer.state.iteration += 1
    trainer.state.batch = batch
    trainer.fire_event(Events.ITERATION_STARTED)
    output = trainer._iteration(trainer, batch)
    if isinstance(output, list):  # decollated by the postprocessing: every item carries the batch's loss
        output = output[0]
    value = float(output[CommonKeys.LOSS])
    trainer.state.batch = trainer.state.output = None
    return value


def same_step(trainer: Any, box: Any, batch: Any, device: torch.device) -> dict[str, float]:
    """One step of each from the same weights on ``batch``: both loss values and the largest difference between
    the two students' weights after the optimizer step (call before anything else has stepped either)."""
    ours = _our_step(trainer, batch)
    theirs = float(peer_step(box, batch, device))
    ours_w, theirs_w = trainer.network.state_dict(), box.student_model.state_dict()
    diff = max(float((ours_w[k].double() - theirs_w[k].double()).abs().max()) for k in ours_w)
    return {"loss_ours": ours, "loss_theirs": theirs, "max_weight_diff": diff}


def benchmark_peer(
    methods: Sequence[str],
    image_size: Sequence[int] | None,
    batch_size: int | None,
    warmup: int,
    repeats: int,
    device: torch.device,
    work: Path,
    profile: bool = False,
) -> dict[str, Any]:
    """Ours / theirs per method on the ``polyp_kdas`` bundle (see the module docstring).

    Args:
        methods: names in :data:`METHODS`.
        image_size: training size (default: the bundle's, 352×352).
        batch_size: training batch (default: the bundle's, 8).
        warmup: untimed rounds first.
        repeats: timed rounds.
        device: where both run (AMP off on CPU, the bundle's on CUDA for ours; theirs without autocast).
        work: a temporary folder (synthetic data, the random teacher's checkpoint).
        profile: also profile two steps of ours and theirs per method (``torch.profiler``; the operator table is
            in the result under ``"profiles"``).
    """
    bundle = BUNDLES / BUNDLE
    configs = bundle / "configs"
    train = config_parser([configs / "train.json"], {"bundle_root": str(bundle)})
    size = list(image_size or train.get_parsed_content("image_size"))
    batch = int(batch_size or train.get_parsed_content("batch_size"))
    teacher_ckpt = work / "teacher.pt"
    torch.save(train.get_parsed_content("teacher_def").state_dict(), teacher_ckpt)
    override = {
        "bundle_root": str(bundle),
        "teacher_ckpt": str(teacher_ckpt),
        "ckpt_dir": str(work / "models"),
        "output_dir": str(work / "eval"),
        "image_size": size,
        "batch_size": batch,
        "num_workers": 0,
        "dataset_dir": str(synthetic_data("polyps", work / "data", size, batch, 4)),
        **device_override(device, False),
    }
    trainers, boxes, plain, checks = {}, {}, None, {}
    for method in methods:
        parser = config_parser([configs / "train.json", configs / "methods" / f"{method}.json"], override)
        plain_id = add_plain_trainer(parser) if plain is None else None
        trainers[method] = parser.get_parsed_content("train#trainer")
        if plain_id is not None:
            plain = parser.get_parsed_content(plain_id)
        boxes[method] = build_peer_box(trainers[method], method, size[0] * size[1], device)
    reference = next(iter(trainers.values()))
    _, batches = benchmark_loader(reference.data_loader, 4)
    for method in methods:
        checks[method] = same_step(trainers[method], boxes[method], batches[0], device)
    counter = {"i": 0}

    def next_batch() -> Any:
        counter["i"] += 1
        return batches[counter["i"] % len(batches)]

    teacher = reference.teacher

    def teacher_forward() -> None:
        image = _tensor(next_batch()["image"], device)
        with torch.no_grad(), autocast(device, reference.amp):
            teacher(image)

    calls = {"student_step": lambda: run_iteration(plain, next_batch()), "teacher_forward": teacher_forward}
    for method in methods:
        calls[f"ours:{method}"] = lambda t=trainers[method]: run_iteration(t, next_batch())
        calls[f"theirs:{method}"] = lambda b=boxes[method]: peer_step(b, next_batch(), device)
    for trainer in [plain, *trainers.values()]:
        trainer.state.epoch, trainer.state.max_epochs = 1, 1
        trainer.state.epoch_length = 4 * (warmup + repeats + 2)
    timings = time_interleaved(calls, warmup, repeats, device)
    synchronize(device)
    peaks = {name: peak_memory_mib(fn, device) for name, fn in calls.items()}
    profiles = {name: operator_profile(fn, 2) for name, fn in calls.items() if ":" in name} if profile else {}
    a, b = timings["student_step"]["samples_ms"], timings["teacher_forward"]["samples_ms"]
    result: dict[str, Any] = {
        "bundle": BUNDLE,
        "image_size": size,
        "batch_size": batch,
        "floor": {
            "student_step_ms": timings["student_step"]["median_ms"],
            "teacher_forward_ms": timings["teacher_forward"]["median_ms"],
        },
        "methods": {},
        "profiles": profiles,
    }
    for method in methods:
        ours, theirs = timings[f"ours:{method}"], timings[f"theirs:{method}"]
        result["methods"][method] = {
            "ours": {**ours, "peak_mib": peaks[f"ours:{method}"]},
            "theirs": {**theirs, "peak_mib": peaks[f"theirs:{method}"]},
            "ours_over_theirs": paired_ratio(ours["samples_ms"], theirs["samples_ms"]),
            "ours_over_floor": paired_ratio(ours["samples_ms"], a, b)["median"],
            "theirs_over_floor": paired_ratio(theirs["samples_ms"], a, b)["median"],
            "same_step": checks[method],
        }
    for trainer in trainers.values():
        trainer.student_taps.remove()
        trainer.teacher_taps.remove()
    for box in boxes.values():
        box.clean_modules()
    return result


def markdown_report(result: dict[str, Any]) -> str:
    """The table of :func:`benchmark_peer`'s result."""
    size = "×".join(map(str, result["image_size"]))
    floor = result["floor"]
    lines = [
        f"#### {result['bundle']}: ours against torchdistill {result.get('torchdistill', '')} "
        f"({size}, batch {result['batch_size']})",
        "",
        f"Floor: (a) student step {fmt(floor['student_step_ms'])} ms, (b) teacher forward "
        f"{fmt(floor['teacher_forward_ms'])} ms.",
        "",
        "| method | ours median (ms) | theirs median (ms) | **ours / theirs** (IQR over rounds) | ours / floor "
        "| theirs / floor | peak MiB ours / theirs | minor page faults ours / theirs "
        "| same step: loss ours, theirs; max weight diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, m in result["methods"].items():
        r, c = m["ours_over_theirs"], m["same_step"]
        lines.append(
            f"| {name} | {fmt(m['ours']['median_ms'])} | {fmt(m['theirs']['median_ms'])} | "
            f"**{fmt(r['median'], 3)}** ({fmt(r['q3'] - r['q1'], 3)}) | {fmt(m['ours_over_floor'], 3)} | "
            f"{fmt(m['theirs_over_floor'], 3)} | {fmt(m['ours']['peak_mib'])} / {fmt(m['theirs']['peak_mib'])} | "
            f"{fmt(m['ours']['page_faults'], 0)} / {fmt(m['theirs']['page_faults'], 0)} | "
            f"{c['loss_ours']:.6f}, {c['loss_theirs']:.6f}; {c['max_weight_diff']:.1e} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--image_size", type=int, nargs=2, default=None, help="training size (default: bundle's)")
    parser.add_argument("--batch_size", type=int, default=None, help="training batch (default: bundle's)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds (default: 2)")
    parser.add_argument("--repeats", type=int, default=11, help="timed rounds (default: 11)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default: cpu)")
    parser.add_argument(
        "--keep_freed_memory",
        action="store_true",
        help="glibc: keep freed memory in the process (mallopt), avoiding page faults on every large allocation",
    )
    parser.add_argument("--out", default=None, help="folder for benchmark_peer.json / .md (default: print only)")
    parser.add_argument("--profile", action="store_true", help="print the operator profile of two steps of each")
    parser.add_argument("--quick", action="store_true", help="tiny setting: 32x32, batch 2, 3 repeats (tests)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison and print the table; exit 0 without measuring when torchdistill is not importable."""
    args = build_parser().parse_args(argv)
    version = torchdistill_version()
    if version is None:
        print(
            "torchdistill is not importable here (it needs torchvision built for this torch): peer benchmark "
            "skipped. Install it in an environment of its own, see `python scripts/benchmark_peer.py --help`'s "
            "source docstring."
        )
        return 0
    if args.quick:
        args.image_size = args.image_size or QUICK["image_size"]
        args.batch_size = args.batch_size or QUICK["batch_size"]
        args.warmup, args.repeats = QUICK["warmup"], QUICK["repeats"]
    if args.threads:
        torch.set_num_threads(args.threads)
    kept = keep_freed_memory() if args.keep_freed_memory else False
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="kd_benchmark_peer_") as work:
        result = benchmark_peer(
            args.methods, args.image_size, args.batch_size, args.warmup, args.repeats, device, Path(work), args.profile
        )
    result["torchdistill"] = version
    result["command"] = "python scripts/benchmark_peer.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result["machine"] = {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "keep_freed_memory": kept,
    }
    report = markdown_report(result)
    for name, table in result["profiles"].items():
        print(f"operator profile, two steps of {name}:\n{table}")
    print(report)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "benchmark_peer.json").write_text(json.dumps(result, indent=2, default=str))
        (out / "benchmark_peer.md").write_text(f"Command: `{result['command']}`\n\n{report}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
