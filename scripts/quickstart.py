"""The main job on an embedded default: teacher -> plain student -> KDAS-distilled student -> evaluation.

Generates a synthetic polyp dataset locally (no download), then runs the ``polyp_kdas`` bundle's stages with
``scripts/compare_methods.py``: it trains the teacher, the student alone (``none``) and the student distilled with
KDAS (``kdas``) under the same seed, split and budget, evaluates all three on the same test split and prints
their Dice, IoU, HD95 and parameter counts. A few minutes on a 2-core CPU::

    python scripts/quickstart.py                       # writes outputs/quickstart/
    python scripts/quickstart.py --kvasir /data/Kvasir-SEG --epochs 30 --image_size 128 128

With ``--kvasir`` it prepares the real Kvasir-SEG release (official layout) instead of synthetic data.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_methods import compare, markdown_table  # noqa: E402

from kd_components.data.common import DATALIST_NAME  # noqa: E402


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/quickstart", help="output folder (default: outputs/quickstart)")
    parser.add_argument("--kvasir", default=None, help="a Kvasir-SEG folder (official layout) instead of synthetic")
    parser.add_argument("--n", type=int, default=160, help="synthetic images to generate")
    parser.add_argument("--image_size", type=int, nargs=2, default=[64, 64])
    parser.add_argument("--epochs", type=int, default=12, help="epochs of each student")
    parser.add_argument("--teacher_epochs", type=int, default=12)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    out = Path(args.out).resolve()
    data = prepare_data(out, args.kvasir, args.n, args.image_size, args.seed)
    rows = compare(
        "polyp_kdas",
        ["none", "kdas"],
        data,
        out,
        teacher_epochs=args.teacher_epochs,
        epochs=args.epochs,
        image_size=list(args.image_size),
        batch_size=args.batch_size,
        num_workers=0,
        seed=args.seed,
        learning_rate=1e-3,
    )
    device = "GPU" if torch.cuda.is_available() else "CPU"
    print(f"\npolyp_kdas on {'Kvasir-SEG' if args.kvasir else 'synthetic polyps'} ({device}), test split:\n")
    print(markdown_table(rows))
    print(f"\nTables: {out / 'results.md'}; MLflow: mlflow ui --backend-store-uri sqlite:///{out / 'mlruns.db'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
