"""Training speed and time-to-accuracy: the seed recipe, re-created, against this project's recipes.

    python benchmarks/train_speed.py --data-dir data            # about 4 minutes on 2 CPU cores
    python benchmarks/train_speed.py --data-dir data --skip-seed

Every row runs in this one invocation on the same machine. Our rows are the real CLI
(`python -m distributed.train` / `torchrun`), read back from metrics.json; train seconds are the
training steps alone in both. The seed row is the source documents' script: torchvision MNIST with
per-sample ToTensor + Normalize, a DataLoader of batch 64, the binary `samnet`, SGD(lr=0.01,
momentum=0.5), labels remapped in a Python loop, one process.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def seed_recipe(data_dir: str, epochs: int) -> list[dict]:
    """The seed script, faithfully: what a user would otherwise run. Returns one row per epoch."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    from distributed.models import samnet

    torch.manual_seed(0)
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    train = DataLoader(datasets.MNIST(data_dir, train=True, download=True, transform=tf), batch_size=64,
                       shuffle=True)
    test = DataLoader(datasets.MNIST(data_dir, train=False, transform=tf), batch_size=1000)
    model = samnet(2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.5)
    rows, seconds, images = [], 0.0, 0
    for epoch in range(1, epochs + 1):
        model.train()
        start = time.perf_counter()
        for data, target in train:
            target = torch.tensor([0 if t < 5 else 1 for t in target])  # as the seed does it
            optimizer.zero_grad()
            F.cross_entropy(model(data), target).backward()
            optimizer.step()
            images += len(data)
        seconds += time.perf_counter() - start
        model.eval()
        correct = 0
        with torch.no_grad():
            for data, target in test:
                target = torch.tensor([0 if t < 5 else 1 for t in target])
                correct += int((model(data).argmax(1) == target).sum())
        rows.append({"name": f"seed recipe, epoch {epoch}", "world": 1, "epochs": epoch, "train_s": seconds,
                     "img_s": images / seconds, "acc": correct / len(test.dataset)})
        print(f"  seed recipe epoch {epoch}: {correct / len(test.dataset):.2%}, {seconds:.1f}s", flush=True)
    return rows


def ours(name: str, data_dir: str, args: list[str], nproc: int = 0) -> dict:
    """One run of the real CLI; nproc 0 = plain python (no torchrun)."""
    with tempfile.TemporaryDirectory() as run_dir:
        base = ["-m", "distributed.train", "--data-dir", data_dir, "--run-dir", run_dir, *args]
        cmd = [sys.executable, *base] if nproc == 0 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *base]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-2000:]}")
        m = json.loads((Path(run_dir) / "metrics.json").read_text())
    row = {"name": name, "world": m["world_size"], "epochs": m["epochs"], "train_s": m["train_seconds"],
           "img_s": m["train_images_per_second"], "acc": m["test_accuracy"], "wall_s": wall,
           "args": " ".join(args) + (f" (torchrun x{nproc})" if nproc else "")}
    print(f"  {name}: {row['acc']:.2%} in {row['train_s']:.1f}s ({row['img_s']:,.0f} img/s)", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default="data")
    p.add_argument("--seed-epochs", type=int, default=3)
    p.add_argument("--skip-seed", action="store_true", help="leave out the seed recipe (about 90 s)")
    args = p.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")

    rows = [] if args.skip_seed else seed_recipe(args.data_dir, args.seed_epochs)
    binary_fast = ["--task", "binary", "--model", "samnet", "--batch-size", "256", "--lr", "1e-2", "--epochs", "1"]
    rows.append(ours("binary samnet, fast recipe", args.data_dir, binary_fast))
    binary_mlp = ["--task", "binary", "--model", "mlp4", "--batch-size", "256", "--lr", "1e-2", "--epochs", "1"]
    rows.append(ours("binary mlp4, fast recipe", args.data_dir, binary_mlp))
    rows.append(ours("binary default", args.data_dir, ["--task", "binary", "--epochs", "1"]))
    rows.append(ours("digits default, 1 process", args.data_dir, ["--task", "digits"]))
    rows.append(ours("digits default, torchrun x1", args.data_dir, ["--task", "digits"], nproc=1))
    rows.append(ours("digits default, torchrun x2", args.data_dir, ["--task", "digits"], nproc=2))
    rows.append(ours("digits, channels-last off", args.data_dir, ["--task", "digits", "--no-channels-last"]))

    print("\n| recipe | world | epochs | train s | img/s | test acc | time vs seed |")
    print("|---|---|---|---|---|---|---|")
    seed_final = rows[args.seed_epochs - 1] if not args.skip_seed else None
    for r in rows:
        ratio = f"{seed_final['train_s'] / r['train_s']:.1f}x less" if seed_final and r is not seed_final \
            and not r["name"].startswith("seed") else ""
        print(f"| {r['name']} | {r['world']} | {r['epochs']} | {r['train_s']:.1f} | {r['img_s']:,.0f} "
              f"| {r['acc']:.2%} | {ratio} |")
    if seed_final:
        print(f"\nseed recipe: {seed_final['acc']:.2%} binary after {args.seed_epochs} epochs in "
              f"{seed_final['train_s']:.1f}s of training")
        for fast in (r for r in rows if r["name"].startswith("binary")):
            print(f"{fast['name']}: {fast['acc']:.2%} in {fast['train_s']:.1f}s = "
                  f"{seed_final['train_s'] / fast['train_s']:.1f}x less training time "
                  f"({'reaches' if fast['acc'] >= seed_final['acc'] else 'does NOT reach'} the seed's accuracy)")
    digits = [r for r in rows if r["name"].startswith("digits default")]
    print("digits default: " + "; ".join(f"{r['name'].split(', ')[1]} {r['acc']:.2%} in {r['train_s']:.1f}s "
                                         f"({r['img_s']:,.0f} img/s)" for r in digits))


if __name__ == "__main__":
    main()
