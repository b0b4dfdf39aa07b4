"""BatchNorm never trains on one image: refused flags, left-out single images, at one rank and at two."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, one_error_line
from distributed.train import main as train

pytestmark = pytest.mark.slow


def test_batchnorm_model_refuses_batch_size_one(capsys) -> None:
    from distributed.config import parse_args
    with pytest.raises(SystemExit) as e:
        parse_args(["--model", "recordnet", "--batch-size", "1", "--device", "cpu"])
    assert e.value.code == 2 and "BatchNorm" in capsys.readouterr().err
    assert parse_args(["--model", "mlp", "--batch-size", "1", "--device", "cpu"]).batch_size == 1


@pytest.mark.parametrize("images,steps,trained", [(129, 1, 128), (131, 2, 131)])
def test_batchnorm_model_never_trains_on_one_image_at_two_ranks(synthetic_data: Path, tmp_path: Path, images: int,
                                                                 steps: int, trained: int) -> None:
    """Global batch 128 at 2 ranks. 129 images: the last step would be one image, left out. 131: the last step's
    3 images cannot give each rank two, so rank 0 takes them and rank 1 makes an idle pass (the same
    forwards and backwards on both ranks, or DDP would hang)."""
    from conftest import torchrun
    run_dir = tmp_path / "run"
    proc = subprocess.run(torchrun(2, "--data-dir", str(synthetic_data), "--run-dir", str(run_dir), "--model",
                                   "recordnet", "--val-size", str(640 - images), "--epochs", "1", "--device", "cpu"),
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("recordnet has BatchNorm" in proc.stdout and "(1 of 129 images)" in proc.stdout) == (images == 129)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == steps and metrics["train_images"] == trained
    assert len(set(metrics["replica_weight_sha256"])) == 1


def test_batchnorm_needs_two_training_images(synthetic_data: Path, tmp_path: Path, capsys) -> None:
    assert train(["--data-dir", str(synthetic_data), "--run-dir", str(tmp_path), "--model", "recordnet",
                  "--val-size", "639", "--epochs", "1", "--device", "cpu"]) == 1
    one_error_line(capsys.readouterr().err, "needs at least 2 training images, and mnist leaves 1")
