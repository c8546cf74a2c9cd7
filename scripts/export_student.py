"""Export a bundle's student to TorchScript and ONNX, and check both against the eager network.

The student is ``network_def`` of the bundle's ``configs/inference.json`` with the trained weights (strictly
loaded), in eval mode. The input is ``[batch, in_channels, *image_size]`` with the image size the student was
trained at (``<weights stem>_settings.json`` beside the weights, else ``inference.json``'s ``image_size``); the
batch dimension is dynamic in the ONNX graph (sliding-window and slice inferers send several windows at once), the
spatial size is the trained one.

Checks, on random inputs with batch sizes 1 and 3 (eval mode, so batch norm uses its running statistics):

* TorchScript (``torch.jit.script``, as ``monai.bundle ckpt_export`` does) against eager: max abs difference
  <= ``--ts_atol`` (default 1e-5);
* ONNX (``torch.onnx.export``, opset 18, run with onnxruntime's CPU provider) against eager: max abs difference
  <= ``--onnx_atol`` (default 1e-4 on logits; float32 kernels differ in summation order).

Writes ``<out>/model.ts``, ``<out>/model.onnx`` and ``<out>/export.json`` (shapes, tolerances, measured
differences). ONNX needs ``pip install onnx onnxscript onnxruntime`` (the ``export`` extra). Usage::

    python scripts/export_student.py --bundle polyp_kdas --weights bundles/polyp_kdas/models/model.pt --out export
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
FORMATS = ("torchscript", "onnx")
TS_ATOL = 1e-5
ONNX_ATOL = 1e-4
ONNX_OPSET = 18

__all__ = ["load_student", "export_torchscript", "export_onnx", "export_student", "main"]


def _bundle_dir(bundle: str | Path) -> Path:
    path = Path(bundle) if Path(bundle).is_dir() else BUNDLES / str(bundle)
    if not (path / "configs" / "inference.json").is_file():
        raise FileNotFoundError(f"no bundle with configs/inference.json at {path}")
    return path


def load_student(
    bundle: str | Path, weights: str | Path, image_size: Sequence[int] | None = None
) -> tuple[torch.nn.Module, list[int]]:
    """The bundle's student with ``weights`` loaded strictly, in eval mode, and its input shape (batch 1).

    Args:
        bundle: a bundle name under ``bundles/`` or a bundle folder.
        weights: the student state dict (``models/model.pt``).
        image_size: the spatial input size; default: the trained one recorded beside ``weights``, else
            ``inference.json``'s ``image_size``.
    """
    bundle_dir = _bundle_dir(bundle)
    weights = Path(weights)
    parser = ConfigParser()
    parser.read_config(str(bundle_dir / "configs" / "inference.json"))
    parser.update({"bundle_root": str(bundle_dir), "ckpt_path": str(weights)})
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    net.eval()
    size = list(image_size) if image_size is not None else list(parser.get_parsed_content("image_size"))
    in_channels = int(getattr(net, "in_channels", parser.get_parsed_content("network_def#in_channels")))
    return net, [1, in_channels, *map(int, size)]


def _inputs(shape: Sequence[int], seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(batch, *shape[1:], generator=generator) for batch in (1, 3)]


def export_torchscript(net: torch.nn.Module, shape: Sequence[int], path: Path) -> float:
    """Script ``net`` to ``path``; returns the max abs difference to eager over the check inputs."""
    scripted = torch.jit.script(net)
    torch.jit.save(scripted, str(path))
    loaded = torch.jit.load(str(path), map_location="cpu").eval()
    with torch.no_grad():
        return max(float((loaded(x) - net(x)).abs().max()) for x in _inputs(shape))


def export_onnx(net: torch.nn.Module, shape: Sequence[int], path: Path) -> float:
    """Export ``net`` to ONNX (dynamic batch) at ``path``; returns the max abs difference of onnxruntime's output
    to eager over the check inputs.

    Raises:
        ImportError: when onnx, onnxscript or onnxruntime is missing (``pip install kd-components[export]``).
    """
    import onnxruntime

    example = torch.rand(*shape)
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(
        net,
        (example,),
        str(path),
        input_names=["image"],
        output_names=["pred"],
        dynamic_shapes=({0: batch},),
        opset_version=ONNX_OPSET,
        dynamo=True,
        verbose=False,
    )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    diffs = []
    with torch.no_grad():
        for x in _inputs(shape):
            (out,) = session.run(["pred"], {"image": x.numpy()})
            diffs.append(float(np.abs(out - net(x).numpy()).max()))
    return max(diffs)


def export_student(
    bundle: str | Path,
    weights: str | Path,
    out: str | Path,
    formats: Sequence[str] = FORMATS,
    image_size: Sequence[int] | None = None,
    ts_atol: float = TS_ATOL,
    onnx_atol: float = ONNX_ATOL,
) -> dict[str, Any]:
    """Export the student in ``formats`` into ``out`` and check each against eager; returns the report.

    Raises:
        AssertionError: when an export differs from eager by more than its tolerance (the files stay for
            inspection; the report says by how much).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    net, shape = load_student(bundle, weights, image_size)
    report: dict[str, Any] = {"bundle": _bundle_dir(bundle).name, "input_shape": shape, "dynamic": ["batch"]}
    failures = []
    for fmt in formats:
        if fmt == "torchscript":
            diff, atol, path = export_torchscript(net, shape, out / "model.ts"), ts_atol, out / "model.ts"
        elif fmt == "onnx":
            diff, atol, path = export_onnx(net, shape, out / "model.onnx"), onnx_atol, out / "model.onnx"
        else:
            raise ValueError(f"unknown format {fmt!r}; choose from {FORMATS}")
        report[fmt] = {"file": str(path), "max_abs_diff": diff, "atol": atol, "ok": diff <= atol}
        if diff > atol:
            failures.append(f"{fmt}: max abs difference to eager {diff:.3g} > {atol:g}")
    (out / "export.json").write_text(json.dumps(report, indent=4) + "\n")
    if failures:
        raise AssertionError("; ".join(failures))
    return report


def build_parser() -> argparse.ArgumentParser:
    """The command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True, help="bundle name under bundles/, or a bundle folder")
    parser.add_argument("--weights", required=True, help="the trained student state dict (models/model.pt)")
    parser.add_argument("--out", required=True, help="output folder for model.ts, model.onnx and export.json")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--image_size", type=int, nargs="+", default=None, help="default: the trained size")
    parser.add_argument("--ts_atol", type=float, default=TS_ATOL)
    parser.add_argument("--onnx_atol", type=float, default=ONNX_ATOL)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Export and check; prints the report as JSON. Exit code 1 when an export is off by more than its tolerance."""
    args = build_parser().parse_args(argv)
    try:
        report = export_student(
            args.bundle, args.weights, args.out, args.formats, args.image_size, args.ts_atol, args.onnx_atol
        )
    except (AssertionError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=4))
    return 0


if __name__ == "__main__":
    sys.exit(main())
