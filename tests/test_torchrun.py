"""Real `torchrun --nproc_per_node=2` runs (gloo on CPU) on tiny synthetic MNIST."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import ROOT, torchrun
from distributed import checkpoint
from distributed.data import TASKS, eval_shard, load_splits
from distributed.dist import DistEnv
from distributed.engine import evaluate
from distributed.models import build_model, to_device

pytestmark = pytest.mark.slow


def test_two_ranks_end_with_identical_weights(ddp_run: Path) -> None:
    metrics = json.loads((ddp_run / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    hashes = metrics["replica_weight_sha256"]
    assert len(hashes) == 2 and hashes[0] == hashes[1]
    # 576 training images, 64 per rank per step -> ceil(288 / 64) = 5 steps an epoch
    assert checkpoint.load(ddp_run / "checkpoints" / "last.pt")["run"]["step"] == 10
    assert metrics["train_images"] == 2 * 576


def test_two_rank_eval_equals_single_process_eval(synthetic_data, ddp_run: Path) -> None:
    state = checkpoint.load(ddp_run / "checkpoints" / "last.pt")
    cpu = torch.device("cpu")
    model = to_device(build_model(state["config"]["model"], 10), cpu, state["config"]["channels_last"])
    model.load_state_dict(state["model"])
    _, _, test = load_splits(synthetic_data, TASKS["digits"], 64, 0, cpu)
    single = evaluate(model, test, eval_shard(len(test), 0, 1, cpu), 1000, 10, None, DistEnv(0, 0, 1, 1, cpu))
    metrics = json.loads((ddp_run / "metrics.json").read_text())
    assert metrics["test_count"] == single.count == 200
    assert metrics["test_accuracy"] == single.accuracy  # exactly, not approximately
    assert metrics["test_loss"] == pytest.approx(single.loss, rel=1e-6)


def test_two_ranks_missing_data_fail_together(tmp_path: Path) -> None:
    proc = subprocess.run(torchrun(2, "--data-dir", str(tmp_path / "absent"), "--run-dir", str(tmp_path / "r")),
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "MNIST not found" in errors[0]
