"""Inference speed over the 10,000 MNIST test images saved as PNG files.

    python benchmarks/serve_speed.py --data-dir data --model runs/digits/export
    python benchmarks/serve_speed.py ... --before /tmp/old-checkout     # the same rows for an older serve_cli

Rows: `serve_cli predict` as a user runs it (whole command, wall clock, each runtime and precision); and the naive
script a user would otherwise write: one file at a time through PIL -> ToTensor -> Normalize -> eager PyTorch
model. Then where the time goes, stage by stage, in one process on one core (CPU seconds per 10,000 images):
start-up, listing, stat + reading, decoding, preprocessing, the model, writing rows. With --before DIR, the
whole command and the stages also run on the serve_cli of that checkout, in the same run.
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

# The stages of `serve_cli predict`, one after the other in one process, on the serve_cli found in argv[1]; prints
# JSON {stage: seconds}. Stages a version lacks (the fast PNG path) are timed as that version does the work.
STAGES = r"""
import io, json, os, sys, time
sys.path.insert(0, sys.argv[1])
from pathlib import Path
folder, model_dir = sys.argv[2], Path(sys.argv[3])
import numpy as np
from PIL import Image
from serve_cli.base import images
from serve_cli.model import load_model
from serve_cli.output import WRITERS
from serve_cli.pool import Chunk
from serve_cli.__main__ import predict_rows
out = {}
def timed(stage, work):
    start = time.perf_counter(); result = work(); out[stage] = time.perf_counter() - start; return result
model = timed("start-up: load the model (manifest, sha256, 1-thread ONNX Runtime session, probe)",
              lambda: load_model(model_dir, "onnxruntime", 1))
paths = timed("listing the folder", lambda: list(images.find_images([folder], False)))
def read():
    blobs = []
    for p in paths:
        size = os.stat(p).st_size
        if hasattr(images, "read_whole"):
            blobs.append(images.read_whole(p, size))
            continue
        with open(p, "rb", buffering=0) as f:
            blobs.append(f.read())
    return blobs
blobs = timed("stat + reading the files", read)
fast = getattr(images, "fast_gray", None)
def decode():
    decoded = []
    for b in blobs:
        pixels = fast(b) if fast else None
        if pixels is None:
            img = Image.open(io.BytesIO(b)); img.load(); pixels = img
        decoded.append(pixels)
    return decoded
decoded = timed("decoding" + (" (libspng for 8-bit gray PNG, else Pillow)" if fast else " (Pillow)"), decode)
to_digit = getattr(images, "digit_of_gray8", None)
digits = timed("preprocessing (to an MNIST-style 28x28 digit)",
               lambda: [to_digit(d) if isinstance(d, np.ndarray) else images.digit_of(d) for d in decoded])
timed("  = digit_bytes per file, as a worker runs it (stat, read, decode, preprocess)",
      lambda: [images.digit_bytes(p) for p in paths])
x = np.stack(digits)[:, None].astype(np.float32) / np.float32(255)
model.run(x[:256])
logits = timed("the model (ONNX Runtime fp32, 1 thread, batches of 256)",
               lambda: np.concatenate([model.run(x[i:i + 256]) for i in range(0, len(x), 256)]))
classes = [str(i) for i in range(logits.shape[1])]
def rows():
    writer = WRITERS["csv"](io.StringIO(), 0)
    for i in range(0, len(paths), 256):
        batch = [str(p) for p in paths[i:i + 256]]
        for row in predict_rows(batch, Chunk([None] * len(batch), logits=logits[i:i + 256]), None, classes, 0):
            writer.write(row)
timed("writing rows (softmax, CSV)", rows)
print(json.dumps(out))
"""


# digit_bytes over the folder three times (the workers' per-file work), started at the wall-clock time argv[3] so
# that two copies overlap from first file to last; prints its seconds.
PER_FILE = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
from serve_cli.base.images import digit_bytes, find_images
paths = list(find_images([sys.argv[2]], False))
time.sleep(max(0.0, float(sys.argv[3]) - time.time()))
start = time.perf_counter()
for _ in range(3):
    [digit_bytes(p) for p in paths]
print(time.perf_counter() - start)
"""


def core_scaling(folder: Path, repeat: int) -> tuple[float, float]:
    """(seconds of the per-file work alone, seconds of the slower of two copies started together), each the
    median of `repeat` tries: how much a second core adds on this machine."""
    def run(copies: int) -> float:
        at = str(time.time() + 1.5)  # after both have started and imported
        cmd = [sys.executable, "-c", PER_FILE, str(ROOT), str(folder), at]
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(copies)]
        return max(float(proc.communicate()[0]) for proc in procs)
    alone, pair = [], []
    for _ in range(repeat):
        alone.append(run(1))
        pair.append(run(2))
    return statistics.median(alone), statistics.median(pair)


def write_pngs(data_dir: str, out: Path, limit: int | None = None) -> int:
    from PIL import Image

    from distributed.datasets import read_mnist
    images, _ = read_mnist(data_dir, train=False)
    images = images[:limit]
    out.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images.numpy()):
        Image.fromarray(img, mode="L").save(out / f"{i:05d}.png")
    return len(images)


def wall(cmd: list[str], repeat: int, code: Path = ROOT) -> list[float]:
    """Seconds of the whole command, Python's start included, each of `repeat` runs, with `code` the checkout
    whose serve_cli runs."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=code, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        times.append(time.perf_counter() - start)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr[-1000:]}")
    return times


def stages(code: Path, folder: Path, model_dir: Path, repeat: int) -> dict[str, float]:
    """Each stage's best time over `repeat` runs, plus the import of serve_cli (the start-up before any work)."""
    bare = wall([sys.executable, "-c", "pass"], max(3, repeat), code)
    imports = wall([sys.executable, "-c", "import serve_cli.__main__"], max(3, repeat), code)
    best: dict[str, float] = {"start-up: python alone (start and exit)": min(bare),
                              "start-up: python and the imports of serve_cli": min(imports)}
    for _ in range(repeat):
        proc = subprocess.run([sys.executable, "-c", STAGES, str(code), str(folder), str(model_dir.resolve())],
                              capture_output=True, text=True, check=True)
        for stage, seconds in json.loads(proc.stdout).items():
            best[stage] = min(best.get(stage, float("inf")), seconds)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default="data")
    p.add_argument("--model", default="runs/digits/export")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--limit", type=int, default=None, help="only the first N test images (a smoke run)")
    p.add_argument("--before", type=Path, help="a checkout of an earlier serve_cli to measure beside this one")
    args = p.parse_args()
    model_dir = Path(args.model).resolve()
    manifest = json.loads((model_dir / "manifest.json").read_text())
    print(f"{platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    versions = {"this checkout": ROOT, **({f"before ({args.before})": args.before.resolve()} if args.before else {})}
    profiles: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "png"
        n = write_pngs(args.data_dir, folder, args.limit)
        serve = [sys.executable, "-m", "serve_cli", "predict", str(folder), "--model", str(model_dir), "--format", "csv"]
        commands = []  # (row name, command, checkout)
        for label, code in versions.items():
            runs = [("--runtime onnxruntime", ["--runtime", "onnxruntime"])]
            if label == "this checkout":
                if "onnx_int8" in manifest["artifacts"]:
                    runs.append(("--runtime onnxruntime --precision int8", ["--runtime", "onnxruntime", "--precision",
                                                                            "int8"]))
                runs.append(("--runtime torchscript", ["--runtime", "torchscript"]))
            commands += [(f"serve_cli predict {name} (whole command), {label}", serve + extra, code)
                         for name, extra in runs]
        # Round robin, one run of each command in turn: this machine's speed drifts by tens of percent over a
        # minute, and every command then sees the same drift.
        times: dict[str, list[float]] = {name: [] for name, _, _ in commands}
        for _ in range(args.repeat):
            for name, cmd, code in commands:
                times[name] += wall(cmd, 1, code)
        rows = [(name, n / statistics.median(t), f"{min(t):.2f}-{max(t):.2f} s") for name, t in times.items()]
        for label, code in versions.items():
            profiles[label] = stages(code, folder, model_dir, args.repeat)
        t = wall([sys.executable, "-c", NAIVE, str(folder), manifest["source"]["checkpoint"]], 1)
        naive = n / t[0]
        rows.append(("naive loop: one file at a time, eager PyTorch (whole command)", naive, f"{t[0]:.2f} s"))
        alone, pair = core_scaling(folder, max(3, args.repeat // 2))
    print(f"\n{n:,} MNIST test images as PNG, model {args.model}, median of {args.repeat} runs\n")
    print("| path | images/s | wall | vs naive |\n|---|---|---|---|")
    for name, rate, spread in rows:
        print(f"| {name} | {rate:,.0f} | {spread} | {rate / naive:.1f}x |")
    scale = 10_000 / n
    print(f"\nWhere the time goes: CPU seconds per 10,000 images, one process, one core (best of {args.repeat})\n")
    print("| stage | " + " | ".join(profiles) + " |\n|---|" + "---|" * len(profiles))
    names = list({s.split(" (")[0]: s for profile in reversed(profiles.values()) for s in profile}.values())
    for stage in names:
        cells = []
        for profile in profiles.values():
            match = stage if stage in profile else next((s for s in profile if s.split(" (")[0] == stage.split(" (")[0]),
                                                        None)
            seconds = profile.get(match) if match else None
            fixed = stage.startswith("start-up")
            cells.append("-" if seconds is None else f"{seconds if fixed else seconds * scale:.3f}")
        print(f"| {stage} | " + " | ".join(cells) + " |")
    print(f"\nTwo cores at once: the per-file work (digit_bytes over the folder, 3 times) takes {alone:.3f} s alone "
          f"and {pair:.3f} s for the slower of two copies started together: two processes do {2 * alone / pair:.2f}x "
          f"the work of one here (2.00x on two whole cores)")


if __name__ == "__main__":
    main()
