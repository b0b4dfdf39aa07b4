"""Accuracy on the real MNIST, where the four files are available (skipped otherwise)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, torchrun

pytestmark = pytest.mark.slow


def test_two_ranks_one_epoch_default_digits_recipe(real_data: Path, tmp_path: Path) -> None:
    proc = subprocess.run(torchrun(2, "--data-dir", str(real_data), "--run-dir", str(tmp_path), "--epochs", "1"),
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["test_count"] == 10000 and metrics["world_size"] == 2
    assert metrics["test_accuracy"] >= 0.985, metrics["test_accuracy"]
