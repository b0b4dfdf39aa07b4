"""GPU speed: time to 99% digits and training images/s, by model, precision, per-rank batch and --compile.

    python benchmarks/gpu_speed.py --data-dir data                  # the full grid (one GPU, ~10 minutes)
    python benchmarks/gpu_speed.py --data-dir data --quick          # fewer rows

Every row is the real CLI (`torchrun --nproc_per_node=1 -m distributed.train --device cuda`), read back
from metrics.json. "to 99%" is the training seconds (steps alone, compile time included) at the end of the
first epoch whose test accuracy reached 99.0%; "-" when no epoch did. Targets (docs/PERFORMANCE.md):
99% digits in <= 0.5 s of training on one GPU; >= 1,000,000 training images/s for samnet.
"""
from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(data_dir: str, args: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as run_dir:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               "-m", "distributed.train", "--device", "cuda", "--data-dir", data_dir, "--run-dir", run_dir,
               "--log-every", "1000000", *args]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:120], "wall_s": wall}
        m = json.loads((Path(run_dir) / "metrics.json").read_text())
    first = next((h for h in m["history"] if h["test_accuracy"] >= 0.99), None)
    return {"acc": m["test_accuracy"], "img_s": m["train_images_per_second"], "train_s": m["train_seconds"],
            "to99_s": first["train_seconds"] if first else None, "wall_s": wall,
            "last_epoch_img_s": m["history"][-1]["images_per_second"]}


def main() -> int:
    import torch
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="data")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU (see docs/PERFORMANCE.md for the CPU numbers)")
        return 1
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    models = {"samnet": ["--model", "samnet"], "fastnet": ["--model", "fastnet"]}
    amps = ["off", "bf16", "fp16"]
    batches = ["512", "4096"] if args.quick else ["64", "512", "4096"]
    compiles = [[], ["--compile"]]
    print("| model | amp | batch/rank | compile | epochs | test acc | to 99% s | train s | img/s | last-epoch img/s | whole s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (name, flags), amp, batch, compiled in itertools.product(models.items(), amps, batches, compiles):
        epochs = "3" if name == "fastnet" else "2"
        # larger batches take fewer steps: scale the peak learning rate with the square root of the batch
        lr = f"{5e-3 * (int(batch) / 64) ** 0.5:.3g}"
        r = run(args.data_dir, [*flags, "--amp", amp, "--batch-size", batch, "--lr", lr, "--epochs", epochs,
                                "--task", "digits", *compiled])
        label = f"| {name} | {amp} | {batch} | {'yes' if compiled else 'no'} | {epochs} |"
        if "error" in r:
            print(f"{label} failed: {r['error']} |", flush=True)
            continue
        to99 = f"{r['to99_s']:.2f}" if r["to99_s"] is not None else "-"
        print(f"{label} {r['acc']:.2%} | {to99} | {r['train_s']:.2f} | {r['img_s']:,.0f} | "
              f"{r['last_epoch_img_s']:,.0f} | {r['wall_s']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
