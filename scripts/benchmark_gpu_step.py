"""Time one training step (forward, backward, AdamW, AMP) of a bundle's teacher and student on a GPU.

Measures whether a network's step is bound by its arithmetic or by kernel launches: on a GPU, a student whose step
costs about as much as its much larger teacher's is launch-bound, so shrinking it further buys no speed there.
Each setting is timed over ``--iterations`` steps after ``--warmup`` steps, with ``torch.cuda.synchronize`` around
the timed loop; cuDNN is run both deterministic (what ``monai.utils.set_determinism`` selects, as the bundles do)
and with its autotuner, and once with channels-last tensors.

Usage (on a machine with a CUDA GPU)::

    python scripts/benchmark_gpu_step.py --bundle polyp_kdas --image_size 352 352 --batch_size 8
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from monai.bundle import ConfigParser

REPO = Path(__file__).resolve().parents[1]


def step_ms(
    network: torch.nn.Module,
    batch: tuple[int, ...],
    num_classes: int,
    deterministic: bool,
    channels_last: bool,
    iterations: int,
    warmup: int,
) -> float:
    """Mean milliseconds of one AMP training step of ``network`` on random data.

    Args:
        network: the network, on the GPU.
        batch: the input shape, (B, C, H, W).
        num_classes: output channels (the cross-entropy target takes values below it).
        deterministic: cuDNN deterministic algorithms (else its autotuner, ``cudnn.benchmark``).
        channels_last: run the network and input in channels-last memory format.
        iterations: timed steps.
        warmup: untimed steps first.
    """
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    network = network.to(memory_format=fmt)
    optimizer = torch.optim.AdamW(network.parameters(), 1e-4)
    scaler = torch.amp.GradScaler()
    x = torch.randn(batch, device="cuda").to(memory_format=fmt)
    y = torch.randint(0, num_classes, (batch[0], *batch[2:]), device="cuda")
    for i in range(warmup + iterations):
        if i == warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = torch.nn.functional.cross_entropy(network(x), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start) / iterations


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default="polyp_kdas", help="bundle folder name under bundles/")
    parser.add_argument("--image_size", type=int, nargs="+", default=[352, 352])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU: this benchmark times GPU steps (scripts/benchmark.py measures CPU costs)", file=sys.stderr)
        return 2
    config = ConfigParser()
    config.read_config(str(REPO / "bundles" / args.bundle / "configs" / "train.json"))
    config["image_size"] = list(args.image_size)
    num_classes = int(config.get_parsed_content("num_classes"))
    print(f"{args.bundle}, {torch.cuda.get_device_name()}, batch {args.batch_size} x {args.image_size}, AMP fp16")
    for key in ("teacher_def", "network_def"):
        net = config.get_parsed_content(key, instantiate=True).cuda()
        batch = (args.batch_size, net.in_channels, *args.image_size)
        params = sum(p.numel() for p in net.parameters())
        for deterministic, channels_last in ((True, False), (False, False), (False, True)):
            ms = step_ms(net, batch, num_classes, deterministic, channels_last, args.iterations, args.warmup)
            print(
                f"{key:<12} {params / 1e6:5.2f} M  deterministic={deterministic!s:<5} "
                f"channels_last={channels_last!s:<5} {ms:6.1f} ms/step"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
