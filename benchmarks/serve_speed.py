"""Inference speed over the 10,000 MNIST test images saved as PNG files.

    python benchmarks/serve_speed.py --data-dir data --model runs/digits/export

Rows: `serve_cli predict` as a user runs it (whole command, wall clock, both runtimes); its parts in
one process (decode + preprocess, each model runtime on ready arrays); and the naive script a user
would otherwise write: one file at a time through PIL -> ToTensor -> Normalize -> eager PyTorch model.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NAIVE = """
import sys, glob, torch
from PIL import Image
from torchvision import transforms
from distributed.models import build_model
state = torch.load(sys.argv[2], weights_only=True)
model = build_model(state["config"]["model"], len(state["classes"]))
model.load_state_dict(state["model"]); model.eval()
tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
with torch.no_grad():
    for path in sorted(glob.glob(sys.argv[1] + "/*.png")):
        print(path, int(model(tf(Image.open(path))[None]).argmax()))
"""


def write_pngs(data_dir: str, out: Path, limit: int | None = None) -> int:
    from PIL import Image

    from distributed.datasets import read_mnist
    images, _ = read_mnist(data_dir, train=False)
    images = images[:limit]
    out.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images.numpy()):
        Image.fromarray(img, mode="L").save(out / f"{i:05d}.png")
    return len(images)


def wall(cmd: list[str], repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        times.append(time.perf_counter() - start)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr[-1000:]}")
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default="data")
    p.add_argument("--model", default="runs/digits/export")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--limit", type=int, default=None, help="only the first N test images (a smoke run)")
    args = p.parse_args()
    import numpy as np

    from serve_cli.pool import process_batch, worker_pool
    from serve_cli.base.images import find_images
    from serve_cli.model import load_model

    model_dir = Path(args.model)
    checkpoint = json.loads((model_dir / "manifest.json").read_text())["source"]["checkpoint"]
    print(f"{platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "png"
        n = write_pngs(args.data_dir, folder, args.limit)
        serve = [sys.executable, "-m", "serve_cli", "predict", str(folder), "--model", str(model_dir)]
        for runtime in ("onnxruntime", "torchscript"):
            t = wall(serve + ["--runtime", runtime, "--format", "csv"], args.repeat)
            rows.append((f"serve_cli predict --runtime {runtime} (whole command)", n / statistics.median(t)))
        paths = list(find_images([str(folder)], False))
        start = time.perf_counter()
        with worker_pool(os.cpu_count() or 1, runtime=None) as pool:  # serve_cli's workers, without the model
            batches = [paths[i:i + 256] for i in range(0, n, 256)]
            x = np.concatenate([chunk.images for chunk in pool.map(process_batch, batches)])
        rows.append(("decode + preprocess only (serve_cli's process pool)", n / (time.perf_counter() - start)))
        for runtime in ("onnxruntime", "torchscript"):
            model = load_model(model_dir, runtime)
            model.run(x[:256])
            start = time.perf_counter()
            for i in range(0, n, 256):
                model.run(x[i:i + 256])
            rows.append((f"{runtime} model only, batch 256", n / (time.perf_counter() - start)))
        t = wall([sys.executable, "-c", NAIVE, str(folder), checkpoint], 1)
        naive = n / t[0]
        rows.append(("naive loop: one file at a time, eager PyTorch (whole command)", naive))
    print(f"\n{n:,} MNIST test images as PNG, model {model_dir}\n")
    print("| path | images/s | vs naive |\n|---|---|---|")
    for name, rate in rows:
        print(f"| {name} | {rate:,.0f} | {rate / naive:.1f}x |")


if __name__ == "__main__":
    main()
