"""Micro-benchmark of every distillation loss in ``kd_components.losses``: forward + backward time and peak memory.

Each loss runs on random student / teacher tensors in 2D (default 8 x 64 x 128^2: batch x channels x space) and
3D (default 2 x 32 x 64^3), at its default settings:

* logit losses get logits with ``--classes`` channels (two for the binary KDAS / structure losses);
* feature losses get features of ``channels`` channels (student and teacher alike, except the trainable FitNet
  (1x1 adapter) and MGD, whose students have half the teacher's width); their parameters count as trainable;
* losses that need labels get a random label map; the four-tap losses (CrossLayerCorrelation, GraphFlow, FSD)
  get two feature pairs (shallow at full size and deep at half size; FSD: an encoder / decoder pair per network);
* the adversarial term uses a SAGAN-style discriminator on the logits (generator term), and its discriminator
  step (WGAN-GP) is a separate row.

Pairwise losses cost O(N^2) (CoCo's matrix product: O(N·C^2) while its taps have C < N channels, else O(N^3))
in the number N of grid positions, and a grid of g
per dim gives N = g^3 in 3D. Where the estimated cost at the default grid exceeds ``--max_cost`` (entries of the
pairwise matrices, or multiply-adds), the loss is not run there: the table says why and how much the default would
cost, and the loss runs at the largest smaller grid (halving) under the budget instead; halving the grid divides
N by 8 in 3D, so the N^2 work by 64 (the N^3 work by 512).

Peak memory: CUDA ``max_memory_allocated`` beyond what was allocated before; CPU: peak of the tensor memory torch
allocates during the call (profiler memory events), inputs excluded. Examples::

    python scripts/benchmark_losses.py                     # markdown tables on stdout
    python scripts/benchmark_losses.py --quick             # tiny shapes (tests)
    python scripts/benchmark_losses.py --dims 3 --max_cost 1e10 --out /tmp/losses
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from monai.losses import DiceCELoss
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python scripts/benchmark_losses.py` from anywhere
    sys.path.insert(0, str(REPO))

import kd_components.losses as losses  # noqa: E402
from kd_components.modules import SelfAttentionDiscriminator  # noqa: E402
from scripts.benchmarking.measure import peak_memory_mib, summarize, synchronize  # noqa: E402

__all__ = ["LossSpec", "SPECS", "Shape", "make_inputs", "run_spec", "benchmark", "markdown_table", "main"]

DEFAULT_SHAPES = {2: (8, 64, (128, 128)), 3: (2, 32, (64, 64, 64))}
QUICK_SHAPES = {2: (2, 8, (16, 16)), 3: (1, 4, (8, 8, 8))}


@dataclass(frozen=True)
class Shape:
    """Batch, channels and spatial size of the benchmark inputs, and the number of classes of the logits."""

    batch: int
    channels: int
    spatial: tuple[int, ...]
    classes: int = 2

    @property
    def dims(self) -> int:
        return len(self.spatial)


def _grid_positions(grid: int, spatial: Sequence[int]) -> int:
    return math.prod(min(grid, s) for s in spatial)


@dataclass
class LossSpec:
    """How to build and feed one loss.

    Args:
        name: the row name.
        build: ``(shape, grid or None) -> loss module``; ``grid=None`` means the loss's default.
        inputs: ``"logits"``, ``"logits2"`` (two classes), ``"logits2+label"``, ``"features"``,
            ``"features+label"``, ``"adapter"`` (student at half width), ``"four"`` (two feature pairs), ``"fsd"``
            (encoder / decoder pairs) or ``"discriminator"`` (the adversarial discriminator step).
        default_grid: the loss's default grid, for the pairwise ones.
        cost: ``(shape, grid) -> estimated work`` (pairwise entries or multiply-adds) for the pairwise ones.
        complexity: how the cost grows, as written in the table.
    """

    name: str
    build: Callable[[Shape, int | None], nn.Module]
    inputs: str
    default_grid: int | None = None
    cost: Callable[[Shape, int], float] | None = None
    complexity: str = ""
    covers: tuple[str, ...] = field(default_factory=tuple)


def _positions(spec: LossSpec, shape: Shape, grid: int) -> int:
    """Grid positions N of a pairwise loss (the four-tap losses pool to the deep, half-size taps' grid)."""
    spatial = [max(1, n // 2) for n in shape.spatial] if spec.inputs == "four" else shape.spatial
    return _grid_positions(grid, spatial)


def _kwargs_grid(grid: int | None) -> dict[str, int]:
    return {} if grid is None else {"grid": grid}


def _discriminator(shape: Shape) -> nn.Module:
    return SelfAttentionDiscriminator(shape.dims, shape.classes, tanh_inputs=True)


def _pairwise(shape: Shape, grid: int) -> float:  # B * N^2 * C: the (N, N) similarity products
    return shape.batch * _grid_positions(grid, shape.spatial) ** 2 * shape.channels


def _cross_layer(shape: Shape, grid: int) -> float:
    """CoCo's matmul correlation: B·N·C² through channel×channel products while C < N, else B·N³ (N×N matrices)."""
    n = _grid_positions(grid, [max(1, s // 2) for s in shape.spatial])
    return shape.batch * (n * shape.channels**2 if shape.channels < n else n**3)


SPECS: list[LossSpec] = [
    LossSpec("LogitKDLoss", lambda s, g: losses.LogitKDLoss(), "logits"),
    LossSpec("PixelWiseKDLoss", lambda s, g: losses.PixelWiseKDLoss(), "logits"),
    LossSpec("ChannelWiseDistillationLoss", lambda s, g: losses.ChannelWiseDistillationLoss(), "logits"),
    LossSpec("DISTLoss", lambda s, g: losses.DISTLoss(), "logits"),
    LossSpec(
        "PseudoLabelLoss", lambda s, g: losses.PseudoLabelLoss(DiceCELoss(to_onehot_y=True, softmax=True)), "logits"
    ),
    LossSpec(
        "KDASAttentionLoss",
        lambda s, g: losses.KDASAttentionLoss(**_kwargs_grid(g)),
        "logits2",
        default_grid=32,
        cost=lambda s, g: s.batch * _grid_positions(g, s.spatial) ** 2,
        complexity="B·N² (N = grid positions)",
    ),
    LossSpec("KDASSGMLoss", lambda s, g: losses.KDASSGMLoss(), "logits2"),
    LossSpec("StructureLoss", lambda s, g: losses.StructureLoss(), "logits2+label"),
    LossSpec("AttentionTransferLoss", lambda s, g: losses.AttentionTransferLoss(), "features"),
    LossSpec(
        "FitNetLoss (1×1 adapter)", lambda s, g: losses.FitNetLoss(s.channels // 2, s.channels, s.dims), "adapter"
    ),
    LossSpec("MGDLoss", lambda s, g: losses.MGDLoss(s.channels // 2, s.channels, s.dims), "adapter"),
    LossSpec("FactorTransferLoss", lambda s, g: losses.FactorTransferLoss(), "features"),
    LossSpec("StageSpaceLoss (projected student)", lambda s, g: losses.StageSpaceLoss(), "features"),
    LossSpec(
        "PairWiseAffinityLoss",
        lambda s, g: losses.PairWiseAffinityLoss(**_kwargs_grid(g)),
        "features",
        default_grid=16,
        cost=_pairwise,
        complexity="B·N²·C",
    ),
    LossSpec(
        "CIRKDLoss",
        lambda s, g: losses.CIRKDLoss(**_kwargs_grid(g)),
        "features",
        default_grid=16,
        cost=lambda s, g: s.batch**2 * _grid_positions(g, s.spatial) ** 2 * s.channels,
        complexity="B²·N²·C",
    ),
    LossSpec(
        "CrossLayerCorrelationLoss",
        lambda s, g: losses.CrossLayerCorrelationLoss(**_kwargs_grid(g)),
        "four",
        default_grid=16,
        cost=_cross_layer,
        complexity="B·N·C² (channel×channel products; B·N³ when C ≥ N)",
    ),
    LossSpec(
        "GraphFlowLoss",
        lambda s, g: losses.GraphFlowLoss(**_kwargs_grid(g)),
        "four",
        default_grid=4,
        cost=lambda s, g: s.batch * s.channels**2 * _grid_positions(g, [n // 2 for n in s.spatial]),
        complexity="B·C²·N",
    ),
    LossSpec("FeatureSimilarityDistillationLoss", lambda s, g: losses.FeatureSimilarityDistillationLoss(), "fsd"),
    LossSpec("IFVDLoss", lambda s, g: losses.IFVDLoss(s.classes), "features+label"),
    LossSpec("InterClassDistanceLoss", lambda s, g: losses.InterClassDistanceLoss(s.classes), "features+label"),
    LossSpec("PositionInformationLoss", lambda s, g: losses.PositionInformationLoss(), "features"),
    LossSpec("EMKDRegionAffinityLoss", lambda s, g: losses.EMKDRegionAffinityLoss(), "features+label"),
    LossSpec(
        "AdversarialDistillationLoss (generator term)",
        lambda s, g: losses.AdversarialDistillationLoss(_discriminator(s)),
        "logits",
        covers=("AdversarialDistillationLoss",),
    ),
    LossSpec(
        "AdversarialDistillationLoss (discriminator step, WGAN-GP)",
        lambda s, g: losses.AdversarialDistillationLoss(_discriminator(s), "wgan-gp"),
        "discriminator",
        covers=("AdversarialDistillationLoss", "WGANGPObjective"),
    ),
]


def exported_losses() -> list[str]:
    """Names of the loss classes (``nn.Module`` subclasses) exported by ``kd_components.losses``."""
    return sorted(
        n for n, o in vars(losses).items() if inspect.isclass(o) and issubclass(o, nn.Module) and not n.startswith("_")
    )


def covered_losses(specs: Sequence[LossSpec] = SPECS) -> set[str]:
    """The exported loss classes the specs exercise."""
    names = set()
    for spec in specs:
        names.update(spec.covers or (spec.name.split(" ")[0],))
    return names


def make_inputs(spec: LossSpec, shape: Shape, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs of the loss's kind; student tensors record gradients."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    b, c, size = shape.batch, shape.channels, shape.spatial
    half = tuple(max(1, n // 2) for n in size)

    def rand(*dims: int, grad: bool = False) -> torch.Tensor:
        return torch.randn(*dims, generator=g).to(device).requires_grad_(grad)

    label = torch.randint(0, shape.classes, (b, 1, *size), generator=g).to(device)
    kind = spec.inputs
    if kind in ("logits", "discriminator"):
        out = {"student": rand(b, shape.classes, *size, grad=True), "teacher": rand(b, shape.classes, *size)}
    elif kind == "logits2":
        out = {"student": rand(b, 2, *size, grad=True), "teacher": rand(b, 2, *size)}
    elif kind == "logits2+label":
        out = {"student": rand(b, 2, *size, grad=True), "label": label}
    elif kind == "features":
        out = {"student": rand(b, c, *size, grad=True), "teacher": rand(b, c, *size)}
    elif kind == "features+label":
        out = {"student": rand(b, c, *size, grad=True), "teacher": rand(b, c, *size), "label": label}
    elif kind == "adapter":
        out = {"student": rand(b, max(1, c // 2), *size, grad=True), "teacher": rand(b, c, *size)}
    elif kind == "four":
        out = {
            "student_shallow": rand(b, c, *size, grad=True),
            "student_deep": rand(b, c, *half, grad=True),
            "teacher_shallow": rand(b, c, *size),
            "teacher_deep": rand(b, c, *half),
        }
    elif kind == "fsd":
        out = {
            "student_encoder": rand(b, c, *size, grad=True),
            "student_decoder": rand(b, c, *size, grad=True),
            "teacher_encoder": rand(b, c, *size),
            "teacher_decoder": rand(b, c, *size),
        }
    else:
        raise ValueError(f"unknown input kind {kind!r}")
    return out


def _trainable(spec: LossSpec, loss: nn.Module) -> list[nn.Parameter]:
    """The parameters the measured step trains: the discriminator's in the discriminator step, otherwise the loss's
    own less an adversarial loss's discriminator (trained in its own step, not by the student's optimizer)."""
    discriminator = getattr(loss, "discriminator", None)
    if spec.inputs == "discriminator":
        return list(discriminator.parameters())
    own_step = {id(p) for p in discriminator.parameters()} if discriminator is not None else set()
    return [p for p in loss.parameters() if p.requires_grad and id(p) not in own_step]


def _step(spec: LossSpec, loss: nn.Module, inputs: dict[str, torch.Tensor]) -> Callable[[], None]:
    """Forward + backward of the loss (of the discriminator step for ``"discriminator"``), gradients dropped."""
    leaves = [x for x in inputs.values() if x.requires_grad] + _trainable(spec, loss)

    def run() -> None:
        if spec.inputs == "discriminator":
            value = loss.discriminator_step_loss(inputs["student"], inputs["teacher"])
        else:
            value = loss(**inputs)
        value.backward()
        for leaf in leaves:
            leaf.grad = None

    return run


def _time(fn: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> dict[str, float]:
    import time

    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return summarize(seconds)


def run_spec(
    spec: LossSpec, shape: Shape, device: torch.device, warmup: int, repeats: int, max_cost: float
) -> dict[str, Any]:
    """Benchmark one loss at one shape: at its default grid, or at a smaller one when the default is too costly."""
    row: dict[str, Any] = {"loss": spec.name, "dims": shape.dims, "inputs": spec.inputs, "grid": spec.default_grid}
    grid = spec.default_grid
    if spec.cost is not None and grid is not None:
        default_cost = spec.cost(shape, grid)
        row["cost_at_default"] = default_cost
        if default_cost > max_cost:
            smaller = grid
            while smaller > 1 and spec.cost(shape, smaller) > max_cost:
                smaller //= 2
            n_default = _positions(spec, shape, grid)
            n_small = _positions(spec, shape, smaller)
            row["note"] = (
                f"default grid {grid} too costly: {spec.complexity} = {default_cost:.2g} "
                f"(N = {n_default}) > budget {max_cost:.2g}; run at grid {smaller} (N = {n_small}, "
                f"{default_cost / spec.cost(shape, smaller):,.0f}x less work)"
            )
            grid = smaller
        row["grid"] = grid
        row["positions"] = _positions(spec, shape, grid)
        row["cost"] = spec.cost(shape, grid)
    loss = spec.build(shape, grid if grid != spec.default_grid else None).to(device)
    inputs = make_inputs(spec, shape, device)
    row["trainable_params"] = sum(p.numel() for p in _trainable(spec, loss))
    fn = _step(spec, loss, inputs)
    try:
        row["time"] = _time(fn, device, warmup, repeats)
        row["peak_mib"] = peak_memory_mib(fn, device)
    except (RuntimeError, MemoryError) as err:  # out of memory on a small device: report, go on
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    return row


def benchmark(
    shapes: dict[int, Shape],
    device: torch.device,
    warmup: int,
    repeats: int,
    max_cost: float,
    names: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Run every spec (or those whose name starts with one of ``names``) at every shape; one row each."""
    specs = [s for s in SPECS if not names or any(s.name.startswith(n) for n in names)]
    return [run_spec(spec, shape, device, warmup, repeats, max_cost) for shape in shapes.values() for spec in specs]


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def markdown_table(rows: Sequence[dict[str, Any]], shapes: dict[int, Shape]) -> str:
    """One markdown table per dimension: loss, grid, time (median, IQR), peak memory, trainable parameters, note."""
    lines: list[str] = []
    for dims, shape in shapes.items():
        sel = [r for r in rows if r["dims"] == dims]
        if not sel:
            continue
        size = "×".join(map(str, shape.spatial))
        lines += [
            f"#### {dims}D: batch {shape.batch}, {shape.channels} feature channels, {shape.classes} classes, {size}",
            "",
            "| loss | grid (positions) | fwd+bwd median (ms) | IQR (ms) | peak memory (MiB) | trainable params "
            "| note |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in sel:
            t = r.get("time", {})
            note = r.get("error") or r.get("note", "")
            grid = "" if r.get("grid") is None else f"{r['grid']} (N = {_fmt(r.get('positions'))})"
            lines.append(
                f"| {r['loss']} | {grid} | {_fmt(t.get('median_ms'))} | {_fmt(t.get('iqr_ms'))} | "
                f"{_fmt(r.get('peak_mib'))} | {_fmt(r.get('trainable_params'))} | {note} |"
            )
        lines.append("")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``python scripts/benchmark_losses.py``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 3], choices=[2, 3], help="2D and/or 3D")
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="batch per dims (default 8 / 2)")
    parser.add_argument("--channels", type=int, nargs="+", default=None, help="feature channels per dims (64 / 32)")
    parser.add_argument("--size", type=int, nargs="+", default=None, help="spatial side per dims (128 / 64)")
    parser.add_argument("--classes", type=int, default=2, help="logit channels of the logit losses (default 2)")
    parser.add_argument("--losses", nargs="*", default=None, help="only losses whose name starts with one of these")
    parser.add_argument("--max_cost", type=float, default=5e8, help="budget of the pairwise losses (default 5e8)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs (default 2; quick 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (default 7; quick 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", default=None, help="also write losses.md and losses.json there")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: 2 x 8 x 16^2 and 1 x 4 x 8^3")
    return parser


def _shapes(args: argparse.Namespace) -> dict[int, Shape]:
    base = QUICK_SHAPES if args.quick else DEFAULT_SHAPES
    shapes = {}
    for i, dims in enumerate(args.dims):
        batch, channels, spatial = base[dims]
        if args.batch:
            batch = args.batch[min(i, len(args.batch) - 1)]
        if args.channels:
            channels = args.channels[min(i, len(args.channels) - 1)]
        if args.size:
            spatial = (args.size[min(i, len(args.size) - 1)],) * dims
        shapes[dims] = Shape(batch, channels, tuple(spatial), args.classes)
    return shapes


def main(argv: Sequence[str] | None = None) -> int:
    """Run the loss benchmark; print the markdown tables (and write them with ``--out``).

    Args:
        argv: arguments without the program name; None reads ``sys.argv``.
    """
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 7)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shapes = _shapes(args)
    rows = benchmark(shapes, device, warmup, repeats, args.max_cost, args.losses)
    command = "python scripts/benchmark_losses.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = f"Device {device}, {torch.get_num_threads()} torch threads, torch {torch.__version__}."
    table = markdown_table(rows, shapes)
    print(f"{header}\n\n{table}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "losses.md").write_text(f"Command: `{command}`\n\n{header}\n\n{table}\n")
        payload = {"command": command, "device": str(device), "threads": torch.get_num_threads(), "rows": rows}
        (out / "losses.json").write_text(json.dumps(payload, indent=2))
        print(f"written: {out / 'losses.md'}, {out / 'losses.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
