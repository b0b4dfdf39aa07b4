"""Real torchrun runs (gloo on CPU, 2 and 3 ranks) on tiny synthetic MNIST: every README recipe at world size 2."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import ROOT, torchrun, write_synthetic_mnist
from distributed import checkpoint
from distributed.config import SEED_RECIPE
from distributed.data import TASKS, load_splits
from distributed.sampling import eval_shard
from distributed.comms import DistEnv
from distributed.evaluation import evaluate
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


def assert_eval_equals_one_process(data: Path, run_dir: Path) -> None:
    """The run's sharded, all-reduced test metrics equal one process evaluating the saved last.pt."""
    state = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    config, cpu = state["config"], torch.device("cpu")
    task = TASKS[config["task"]]
    model = to_device(build_model(config["model"], task.num_classes), cpu, config["channels_last"])
    model.load_state_dict(state["model"])
    _, _, test, _ = load_splits(data, task, config["val_size"], config["seed"], cpu)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    dtype = {"off": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[metrics["amp"]]  # as the run did
    single = evaluate(model, test, eval_shard(len(test), 0, 1, cpu), 1000, task.num_classes, dtype,
                      DistEnv(0, 0, 1, 1, cpu))
    assert metrics["test_count"] == single.count == len(test)
    assert metrics["test_accuracy"] == single.accuracy  # exactly, not approximately
    assert metrics["test_loss"] == pytest.approx(single.loss, rel=1e-5)


def test_two_rank_eval_equals_single_process_eval(synthetic_data, ddp_run: Path) -> None:
    assert_eval_equals_one_process(synthetic_data, ddp_run)


def train_torchrun(nproc: int, data: Path, run_dir: Path, *flags: str) -> dict:
    proc = subprocess.run(torchrun(nproc, "--data-dir", str(data), "--run-dir", str(run_dir), *flags),
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == nproc
    assert len(set(metrics["replica_weight_sha256"])) == 1  # bit-identical replicas, BatchNorm buffers included
    return metrics


# Every recipe and flag the README documents, at world size 2 (640 synthetic training images).
RECIPES = {
    "record": ["--model", "recordnet", "--augment", "--label-smoothing", "0.1", "--val-size", "0",
               "--batch-size", "32", "--epochs", "2"],
    "seed_recipe": [*SEED_RECIPE, "--task", "binary", "--model", "samnet", "--val-size", "64", "--epochs", "1"],
    "flags": ["--optimizer", "adamw", "--weight-decay", "0.01", "--schedule", "cosine", "--no-channels-last",
              "--amp", "bf16", "--model", "dropcnn", "--val-size", "1", "--epochs", "1"],
    "step_fp16": ["--schedule", "step", "--amp", "fp16", "--checkpoint-every-steps", "2", "--model", "mlp",
                  "--val-size", "64", "--epochs", "2"],
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_readme_recipes_at_world_size_two(synthetic_data, tmp_path: Path, recipe: str) -> None:
    flags = RECIPES[recipe]
    metrics = train_torchrun(2, synthetic_data, tmp_path, *flags)
    epochs = int(flags[flags.index("--epochs") + 1])
    val_size = int(flags[flags.index("--val-size") + 1])
    assert metrics["train_images"] == epochs * (640 - val_size)  # each image once per epoch, no padding counted
    assert metrics["epochs"] == epochs
    assert_eval_equals_one_process(synthetic_data, tmp_path)


def test_overfit_batches_under_torchrun(synthetic_data, tmp_path: Path) -> None:
    metrics = train_torchrun(2, synthetic_data, tmp_path, "--task", "binary", "--overfit-batches", "1",
                             "--epochs", "30", "--schedule", "none", "--lr", "2e-3", "--val-size", "64",
                             "--label-smoothing", "0")
    assert metrics["test_count"] == 2 * 64 and metrics["train_images"] == 30 * 128
    assert metrics["test_accuracy"] == 1.0 and metrics["test_loss"] < 0.1


def test_three_ranks_uneven_split_and_a_val_split_smaller_than_the_world(tmp_path: Path) -> None:
    # 640 training images over 3 ranks: the sampler pads two; 1 validation image: ranks 1 and 2 have none.
    data = write_synthetic_mnist(tmp_path / "data", n_train=641, n_test=200)
    metrics = train_torchrun(3, data, tmp_path / "run", "--val-size", "1", "--epochs", "2", "--batch-size", "32")
    assert metrics["train_images"] == 2 * 640
    assert metrics["val_accuracy"] in (0.0, 1.0)
    assert_eval_equals_one_process(data, tmp_path / "run")


def test_resume_from_two_ranks_to_one_keeps_the_global_batch_and_refits_more_epochs(synthetic_data, tmp_path: Path,
                                                                                    capsys) -> None:
    from distributed.train import main
    train_torchrun(2, synthetic_data, tmp_path, "--val-size", "64", "--epochs", "1")
    assert checkpoint.load(tmp_path / "checkpoints" / "last.pt")["run"]["step"] == 5  # ceil(576 / (2 x 64))
    assert main(["--data-dir", str(synthetic_data), "--run-dir", str(tmp_path), "--val-size", "64",
                 "--epochs", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "resuming at world size 1 (checkpoint: 2): the same 128 images per step" in out
    assert "resuming with --epochs 1 -> 2: schedule re-fitted to the new length" in out
    state = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert state["config"]["global_batch_size"] == 128 and state["world_size"] == 1
    assert state["run"]["step"] == 5 + 5  # the second epoch: the same 5 steps of 128, two micro-batches each
    assert state["run"]["train_images"] == 2 * 576
    assert [h["epoch"] for h in state["run"]["history"]] == [1, 2]
    # the schedule was re-fitted to 2 epochs of 5 steps and fast-forwarded by one epoch: it ends where a fresh
    # 10-step run's does (not fast-forwarded it would be half-way; the old 5-step one could not step 5 more times)
    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1e-2)
    fresh = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=2 * 5)
    for _ in range(2 * 5):
        opt.step()
        fresh.step()
    assert state["scheduler"]["last_epoch"] == 2 * 5
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)


def test_two_ranks_missing_data_fail_together(tmp_path: Path) -> None:
    proc = subprocess.run(torchrun(2, "--data-dir", str(tmp_path / "absent"), "--run-dir", str(tmp_path / "r")),
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "MNIST not found" in errors[0]
