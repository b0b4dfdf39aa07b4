"""Each benchmark script, run for real on tiny data (not --help): a script that no longer runs fails here."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def bench(*args: str, timeout: float = 300) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_serve_speed(exported_run: Path, synthetic_data: Path) -> None:
    out = bench("benchmarks/serve_speed.py", "--data-dir", str(synthetic_data), "--model", str(exported_run),
                "--repeat", "1", "--limit", "40")
    assert "40 MNIST test images as PNG" in out
    table, profile = out.split("Where the time goes")
    paths = [line for line in table.splitlines() if line.startswith("| ") and "images/s" not in line]
    int8 = json.loads((exported_run / "manifest.json").read_text())["parity"]["int8"]["passed"]
    assert len(paths) == 3 + int8 and paths[-1].startswith("| naive loop")
    stages = [line for line in profile.splitlines() if line.startswith("| ") and not line.startswith("| stage")]
    assert len(stages) == 10 and all(float(line.split("|")[2]) > 0 for line in stages), profile
    scaling = re.search(r"two processes do (\d+\.\d+)x the work of one", profile)
    assert scaling and 0.3 < float(scaling.group(1)) < 2.5, profile  # two processes: at most 2x, and some noise


def test_flops() -> None:
    out = bench("benchmarks/flops.py", "--device", "cpu", "--images-per-second", "1000")
    assert "fp32 matmul peak (cpu" in out and "fastnet at 1,000 images/s" in out


def test_train_speed(synthetic_data: Path) -> None:
    out = bench("benchmarks/train_speed.py", "--data-dir", str(synthetic_data), "--only-seeds", "--seeds", "0",
                "--recipe", "--epochs 1 --val-size 0 --model mlp --device cpu",
                "--versus", "--epochs 1 --val-size 0 --model slimnet --device cpu")
    assert "floor (torchrun" in out
    rows = [line for line in out.splitlines() if "torchrun x2, seed 0 |" in line]
    assert len(rows) == 4 and sum("slimnet" in row for row in rows) == 2  # both recipes, digits and binary


def test_profile_step_at_two_ranks(synthetic_data: Path) -> None:
    out = bench("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "benchmarks/profile_step.py",
                "--warmup", "1", "--steps", "3", "--data-dir", str(synthetic_data), "--val-size", "64",
                "--model", "fastnet", "--device", "cpu")
    assert "rank 0 of 2" in out and "rank 1 of 2" in out and "| DDP all-reduce (gloo/NCCL) |" in out


def test_elastic(tmp_path: Path) -> None:
    from conftest import write_synthetic_mnist
    data = write_synthetic_mnist(tmp_path / "data", n_train=3064, n_test=100)  # 47 steps of 64 an epoch
    out = bench("benchmarks/elastic.py", "--data-dir", str(data), "--kill-at", "20", "--", "--model", "mlp",
                "--val-size", "64", "--epochs", "3", "--checkpoint-every-steps", "5")
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row[0] for row in rows] == ["| 2 ranks x 32", "| 1 rank x 32, accumulating 2", "| 2 nodes, uninterrupted",
                                        "| 2 nodes, one lost after step 20"]
    assert {row[2] for row in rows} == {"141"} and {row[3] for row in rows} == {"9,000"}  # the same steps, images
    assert int(rows[3][6]) >= 20
