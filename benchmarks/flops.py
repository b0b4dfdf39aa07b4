"""Training speed against the hardware: the default model's FLOP/s as a fraction of this machine's matmul peak.

    python benchmarks/flops.py                      # peak + FLOPs per image of every registry model
    python benchmarks/flops.py --images-per-second 5000 --model fastnet   # + the fraction of peak

FLOPs per training image are counted by torch's own FlopCounterMode over one forward + backward
(convolutions, matmuls; element-wise ops are not counted, as is usual): the trainer's own count
(distributed/metrics.py), which its MFU figure uses. Give the peak printed here as `--peak-flops` to the
trainer for an MFU figure on the CPU. The peak is the best of a
few fp32 `torch.mm` runs of square matrices with every core this process may use.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distributed.metrics import training_flops_per_image  # noqa: E402
from distributed.models import MODELS, build_model  # noqa: E402


def matmul_peak(n: int = 2048, repeats: int = 5, device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """Best FLOP/s of an n x n x n matmul."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)  # warm-up: thread pool, kernels
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def model_flops_per_image(model_name: str, num_classes: int = 10) -> float:
    return training_flops_per_image(build_model(model_name, num_classes), (1, 28, 28), num_classes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fastnet", choices=list(MODELS))
    parser.add_argument("--images-per-second", type=float, help="measured training images/s (all ranks)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    peak = matmul_peak(device=args.device)
    print(f"fp32 matmul peak ({args.device}, {cores} cores, {torch.get_num_threads()} threads): "
          f"{peak / 1e9:,.1f} GFLOP/s")
    print(f"{'model':<10} {'MFLOP/image (fwd+bwd)':>22} {'images/s at peak':>17}")
    for name in MODELS:
        flops = model_flops_per_image(name)
        print(f"{name:<10} {flops / 1e6:>22.2f} {peak / flops:>17,.0f}")
    if args.images_per_second:
        flops = model_flops_per_image(args.model)
        achieved = flops * args.images_per_second
        print(f"{args.model} at {args.images_per_second:,.0f} images/s: {achieved / 1e9:,.1f} GFLOP/s = "
              f"{achieved / peak:.0%} of the matmul peak")
    return 0


if __name__ == "__main__":
    sys.exit(main())
