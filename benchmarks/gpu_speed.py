"""GPU speed: time to 99% digits and training images/s, by model, precision, per-rank batch and --compile.

    python benchmarks/gpu_speed.py --data-dir data                  # the full grid (one GPU, ~10 minutes)
    python benchmarks/gpu_speed.py --data-dir data --quick          # fewer rows
    python benchmarks/gpu_speed.py --data-dir data --check          # launch/gpu_check.sh's rows (~3 minutes)
    python benchmarks/gpu_speed.py --data-dir data --rehearse       # one tiny CPU row: the plumbing, no GPU

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


def run(data_dir: str, args: list[str], device: str = "cuda", timeout: float | None = None) -> dict:
    with tempfile.TemporaryDirectory() as run_dir:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               "-m", "distributed.train", "--device", device, "--data-dir", data_dir, "--run-dir", run_dir,
               "--log-every", "1000000", "--test-every-epoch", *args]  # "to 99%" reads every epoch's test score
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:g} s", "wall_s": time.perf_counter() - start}
        wall = time.perf_counter() - start
        if proc.returncode != 0:  # the trainer's own one-line error, not torchrun's report after it
            lines = proc.stderr.strip().splitlines() or ["?"]
            return {"error": next((x for x in lines if x.startswith("error:")), lines[-1])[:120], "wall_s": wall}
        m = json.loads((Path(run_dir) / "metrics.json").read_text())
    first = next((h for h in m["history"] if h.get("test_accuracy", 0) >= 0.99), None)
    return {"acc": m["test_accuracy"], "img_s": m["train_images_per_second"], "train_s": m["train_seconds"],
            "to99_s": first["train_seconds"] if first else None, "wall_s": wall,
            "last_epoch_img_s": m["history"][-1]["images_per_second"]}


def grid(args: argparse.Namespace) -> list[list[str]]:
    """Each row's flags: the full grid, --quick, or --check (samnet and the default model; bf16, fp16 and off;
    two per-rank batch sizes; one --compile row)."""
    models = {"samnet": ["--model", "samnet"], "fastnet": ["--model", "fastnet"]}
    amps = ["off", "bf16", "fp16"]
    batches = ["512", "4096"] if args.quick or args.check else ["64", "512", "4096"]
    compiles = [[]] if args.check else [[], ["--compile"]]
    rows = [[*flags, "--amp", amp, "--batch-size", batch, *compiled]
            for (_, flags), amp, batch, compiled in itertools.product(models.items(), amps, batches, compiles)]
    if args.check:
        rows.append([*models["fastnet"], "--amp", "bf16", "--batch-size", "512", "--compile"])
    return rows


def main() -> int:
    import torch
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="data")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--check", action="store_true", help="the device check's rows")
    p.add_argument("--rehearse", action="store_true", help="one tiny row on the CPU: the script's plumbing")
    p.add_argument("--row-timeout", type=float, default=None, help="seconds one row may take")
    args = p.parse_args()
    device = "cpu" if args.rehearse else "cuda"
    if not args.rehearse and not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU (see docs/PERFORMANCE.md for the CPU numbers)")
        return 1
    print(f"{torch.cuda.get_device_name() if device == 'cuda' else 'CPU (rehearsal)'}, torch {torch.__version__}")
    rows = [["--model", "mlp", "--amp", "off", "--batch-size", "64", "--overfit-batches", "2", "--val-size", "0"]] \
        if args.rehearse \
        else grid(args)
    print("| model | amp | batch/rank | compile | epochs | test acc | to 99% s | train s | img/s | last-epoch img/s | whole s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    failed = 0
    for flags in rows:
        name, amp, batch = (flags[flags.index(f) + 1] for f in ("--model", "--amp", "--batch-size"))
        epochs = "1" if args.rehearse else "3" if name == "fastnet" else "2"
        # larger batches take fewer steps: scale the peak learning rate with the square root of the batch
        lr = f"{5e-3 * (int(batch) / 64) ** 0.5:.3g}"
        r = run(args.data_dir, [*flags, "--lr", lr, "--epochs", epochs, "--task", "digits"], device, args.row_timeout)
        label = f"| {name} | {amp} | {batch} | {'yes' if '--compile' in flags else 'no'} | {epochs} |"
        if "error" in r:
            failed += 1
            print(f"{label} failed: {r['error']} |", flush=True)
            continue
        to99 = f"{r['to99_s']:.2f}" if r["to99_s"] is not None else "-"
        print(f"{label} {r['acc']:.2%} | {to99} | {r['train_s']:.2f} | {r['img_s']:,.0f} | "
              f"{r['last_epoch_img_s']:,.0f} | {r['wall_s']:.1f} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
