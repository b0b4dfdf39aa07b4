"""Training speed and time-to-accuracy: the seed recipe, re-created, against this project's recipes.

    python benchmarks/train_speed.py --data-dir data            # about 4 minutes on 2 CPU cores
    python benchmarks/train_speed.py --data-dir data --skip-seed
    python benchmarks/train_speed.py --data-dir data --only-seeds   # floor + the time-to-99% rows (3 seeds)

Every row runs in this one invocation on the same machine. "whole command s" is Enter to prompt, as a
shell measures it; "over floor" subtracts the floor: `torchrun --nproc_per_node=2 -m distributed.train --help`. Our rows are the real CLI
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
           "args": " ".join(args) + (f" (torchrun x{nproc})" if nproc else ""),
           "phases": ", ".join(f"{k} {v:.1f}s" for k, v in m.get("phase_seconds", {}).items())}
    print(f"  {name}: {row['acc']:.2%} in {row['train_s']:.1f}s ({row['img_s']:,.0f} img/s)", flush=True)
    return row


def floor(nproc: int = 2) -> float:
    """The start-up no code of ours can cut: torchrun and its workers importing torch, then argparse's --help."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "distributed.train", "--help"]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, capture_output=True, check=True)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default="data")
    p.add_argument("--seed-epochs", type=int, default=3)
    p.add_argument("--skip-seed", action="store_true", help="leave out the seed recipe (about 90 s)")
    p.add_argument("--seeds", default="0,1,2", help="seeds of the time-to-99%% rows (default recipe, 2 ranks)")
    p.add_argument("--nproc", type=int, default=2, help="ranks of the time-to-99%% rows (the floor uses as many)")
    p.add_argument("--only-seeds", action="store_true", help="only the floor and the time-to-99%% rows")
    p.add_argument("--recipe", default="", help="flags added to the time-to-99%% rows, e.g. '--epochs 1 --val-size 0'")
    p.add_argument("--versus", default="", help="a second recipe's flags: its time-to-99%% rows run beside the first's, "
                                                "seed by seed, in the same invocation")
    args = p.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")

    floor_s = floor(args.nproc)
    print(f"  floor: torchrun x{args.nproc} ... --help took {floor_s:.1f}s", flush=True)
    rows = [] if args.skip_seed or args.only_seeds else seed_recipe(args.data_dir, args.seed_epochs)
    if not args.only_seeds:
        binary_fast = ["--task", "binary", "--model", "samnet", "--batch-size", "256", "--lr", "1e-2", "--epochs", "1",
                       "--label-smoothing", "0", "--val-size", "5000"]
        rows.append(ours("binary samnet, fast recipe", args.data_dir, binary_fast))
        binary_mlp = ["--task", "binary", "--model", "mlp4", "--batch-size", "256", "--lr", "1e-2", "--epochs", "1",
                       "--label-smoothing", "0", "--val-size", "5000"]
        rows.append(ours("binary mlp4, fast recipe", args.data_dir, binary_mlp))
        rows.append(ours("digits default, 1 process", args.data_dir, ["--task", "digits"]))
        rows.append(ours("digits default, torchrun x1", args.data_dir, ["--task", "digits"], nproc=1))
        rows.append(ours("digits, channels-last off", args.data_dir, ["--task", "digits", "--no-channels-last"]))
    recipes = [args.recipe] + ([args.versus] if args.versus else [])
    for task in ("digits", "binary"):
        for seed in args.seeds.split(","):
            for recipe in recipes:  # side by side: both recipes see the machine in the same minute
                rows.append(ours(f"{task} {recipe or 'default'}, torchrun x{args.nproc}, seed {seed}", args.data_dir,
                                 ["--task", task, "--seed", seed, *recipe.split()], nproc=args.nproc))

    print(f"\nfloor (torchrun --standalone --nproc_per_node={args.nproc} -m distributed.train --help): {floor_s:.1f}s")
    print("\n| recipe | world | epochs | train s | img/s | test acc | whole command s | over floor s | time vs seed |")
    print("|---|---|---|---|---|---|---|---|---|")
    seed_final = rows[args.seed_epochs - 1] if not (args.skip_seed or args.only_seeds) else None
    for r in rows:
        ratio = f"{seed_final['train_s'] / r['train_s']:.1f}x less" if seed_final and r is not seed_final \
            and not r["name"].startswith("seed") else ""
        whole = f"{r['wall_s']:.1f} | {r['wall_s'] - floor_s:+.1f}" if "wall_s" in r else " | "
        print(f"| {r['name']} | {r['world']} | {r['epochs']} | {r['train_s']:.1f} | {r['img_s']:,.0f} "
              f"| {r['acc']:.2%} | {whole} | {ratio} |")
    if seed_final:
        print(f"\nseed recipe: {seed_final['acc']:.2%} binary after {args.seed_epochs} epochs in "
              f"{seed_final['train_s']:.1f}s of training")
        for fast in (r for r in rows if r["name"].startswith("binary") and "fast" in r["name"]):
            print(f"{fast['name']}: {fast['acc']:.2%} in {fast['train_s']:.1f}s = "
                  f"{seed_final['train_s'] / fast['train_s']:.1f}x less training time "
                  f"({'reaches' if fast['acc'] >= seed_final['acc'] else 'does NOT reach'} the seed's accuracy)")
    print(f"\ntime to a 99% model, {args.nproc} rank(s) (target: whole command <= floor + 7 s, >= 99.0% each seed):")
    for r in (r for r in rows if f"torchrun x{args.nproc}, seed" in r["name"]):
        ok = r["acc"] >= 0.99 and r["wall_s"] <= floor_s + 7
        print(f"  {r['name']}: {r['acc']:.2%}, whole command {r['wall_s']:.1f}s = floor {r['wall_s'] - floor_s:+.1f}s"
              f" [{'met' if ok else 'NOT met'}]; {r['phases']}")


if __name__ == "__main__":
    main()
