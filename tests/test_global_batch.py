"""Issue 21: --global-batch-size makes a run's steps independent of its world size (real torchrun ranks, gloo)."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import ROOT, torchrun, write_synthetic_mnist
from distributed import checkpoint

pytestmark = pytest.mark.slow

# 296 - 64 validation = 232 training images: steps of 64, 64, 64 and a short last one of 40.
SMALL = {"n_train": 296, "n_test": 100}
NO_NOISE = ["--model", "mlp", "--amp", "off", "--val-size", "64", "--epochs", "1", "--global-batch-size", "64",
            "--optimizer", "sgd", "--lr", "0.05"]


def torchrun_ok(nproc: int, *args: str, launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    proc = subprocess.run(torchrun(nproc, *args, launcher=launcher), cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_one_two_and_three_ranks_take_the_same_steps(tmp_path: Path) -> None:
    """2 ranks x 32, 1 rank accumulating 2 x 32, 3 ranks with unequal shares (22/21/21, 14/13/13 in the last
    step) in micro-batches of at most 16: the same images in the same steps, so the same weights.

    SGD, not Adam: Adam divides by the gradient's running RMS, so a gradient off by a constant factor (micro-
    batch means summed instead of one mean: 2x at one rank) would change its weights by only 1e-5. Tolerance
    1e-6: the three sum the same per-image gradients in another order (over micro-batches, then ranks), which
    moved the weights by at most 7e-9 here after 4 steps; that summing error moves them by 5e-3."""
    data = write_synthetic_mnist(tmp_path / "data", **SMALL)
    runs = {"2x32": (2, "32"), "1x32x2": (1, "32"), "3x16": (3, "16")}
    states = {}
    for name, (nproc, micro) in runs.items():
        torchrun_ok(nproc, "--data-dir", str(data), "--run-dir", str(tmp_path / name), *NO_NOISE, "--batch-size", micro)
        states[name] = checkpoint.load(tmp_path / name / "checkpoints" / "last.pt")
    reference = states["2x32"]
    for name, state in states.items():
        assert state["world_size"] == runs[name][0] and state["config"]["global_batch_size"] == 64
        assert state["run"]["step"] == 4 and state["run"]["train_images"] == 232, name
        assert state["scheduler"]["last_epoch"] == 4
        assert state["optimizer"]["param_groups"][0]["lr"] == reference["optimizer"]["param_groups"][0]["lr"]
        for key, value in reference["model"].items():
            torch.testing.assert_close(state["model"][key], value, rtol=0, atol=1e-6, msg=f"{name}: {key}")
        # the epoch's train loss is the mean over every rank's images, not rank 0's share of them
        assert state["run"]["history"][-1]["train_loss"] == pytest.approx(
            reference["run"]["history"][-1]["train_loss"], rel=1e-5), name


COUNT_ALLREDUCES = """
import json, sys
import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from distributed import comms
from distributed.config import parse_args
from distributed.timing import Phases
from distributed.train import StopRequest, Trainer

cfg = parse_args(sys.argv[2:])
env = comms.setup("cpu")
trainer = Trainer.build(cfg, env, StopRequest(), Phases())
buckets, forwards = [], []

def counting(state, bucket):
    buckets.append((trainer.parts.run.step, bucket.index()))
    return allreduce_hook(state, bucket)

trainer.parts.net.register_comm_hook(None, counting)
trainer.parts.model.register_forward_pre_hook(lambda m, a: forwards.append(1) if torch.is_grad_enabled() else None)
trainer.fit()
trainer.close()
if env.is_main:
    with open(sys.argv[1], "w") as f:
        json.dump({"buckets": buckets, "forwards": len(forwards), "steps": trainer.parts.run.step}, f)
comms.teardown(peers_in_step=True)
"""


@pytest.mark.parametrize("micro,passes", [("64", 1), ("16", 4)])
def test_accumulation_all_reduces_once_per_step(tmp_path: Path, micro: str, passes: int) -> None:
    """DDP's communication hook runs once per bucket per optimiser step, however many micro-batches the step
    accumulates (4 per rank here): no_sync really skips the all-reduce of the first three."""
    data = write_synthetic_mnist(tmp_path / "data", **SMALL)
    script = tmp_path / "count.py"
    script.write_text(COUNT_ALLREDUCES)
    out = tmp_path / "calls.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(out), "--data-dir", str(data), "--run-dir", str(tmp_path / "run"), "--device", "cpu",
           "--model", "mlp", "--val-size", "64", "--epochs", "1", "--global-batch-size", "128", "--batch-size", micro,
           "--log-every", "0"]  # DDP takes one comm hook: the step metrics' timed all-reduce stays out
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    calls = json.loads(out.read_text())
    steps = calls["steps"]
    assert steps == 2  # 232 images in steps of 128: 128 and 104 (52 per rank: 4 micro-batches of 13)
    assert calls["forwards"] == passes * steps
    per_step = {}
    for step, bucket in calls["buckets"]:
        per_step.setdefault(step, []).append(bucket)
    buckets = sorted(set(per_step[0]))
    assert sorted(per_step) == list(range(steps)) and all(sorted(b) == buckets for b in per_step.values())


def wait_for(last: Path, done: Callable[[dict], bool], proc: subprocess.Popen, timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "training ended before it could be interrupted"
        if last.exists():
            state = checkpoint.load(last)
            if done(state):
                return state
        time.sleep(0.05)
    raise AssertionError(f"{last} never reached the expected step within {timeout}s")


BIGGER = {"n_train": 3064, "n_test": 100}  # 3000 training images: 94 steps of 32 an epoch
LONG = ["--model", "mlp", "--val-size", "64", "--epochs", "2", "--batch-size", "16", "--log-every", "1",
        "--checkpoint-every-steps", "5"]


def lr_curve(run_dir: Path) -> dict[int, float]:
    return {e.step: e.value for e in EventAccumulator(str(run_dir)).Reload().Scalars("train/lr")}


def test_sigterm_mid_epoch_resumes_at_one_and_at_three_ranks(tmp_path: Path) -> None:
    """A 2-rank run stopped by SIGTERM in its first epoch goes on at 1 rank and at 3 from the step it saved:
    the same steps, images and learning rates as the uninterrupted run, and TensorBoard curves without a gap
    or a repeated step."""
    data = write_synthetic_mnist(tmp_path / "data", **BIGGER)
    common = ["--data-dir", str(data), *LONG]
    whole = tmp_path / "whole"
    torchrun_ok(2, *common, "--run-dir", str(whole))
    expected = json.loads((whole / "metrics.json").read_text())
    assert expected["steps"] == 2 * 94 and expected["train_images"] == 2 * 3000

    stopped = tmp_path / "stopped"
    proc = subprocess.Popen(torchrun(2, *common, "--run-dir", str(stopped)), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for(stopped / "checkpoints" / "last.pt", lambda s: s["run"]["step"] >= 10, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert "stopped by signal 15" in err, err[-3000:]
    at_stop = checkpoint.load(stopped / "checkpoints" / "last.pt")["run"]
    assert at_stop["epoch"] == 0 and 0 < at_stop["step_in_epoch"] < 94  # mid-epoch

    for nproc in (1, 3):
        resumed = tmp_path / f"resumed_at_{nproc}"
        shutil.copytree(stopped, resumed)
        out = torchrun_ok(nproc, *common, "--run-dir", str(resumed)).stdout
        assert f"resuming at world size {nproc} (checkpoint: 2): the same 32 images per step, from the same step" \
            in out
        assert f"at epoch 0 + {at_stop['step_in_epoch']} steps, step {at_stop['step']}" in out
        metrics = json.loads((resumed / "metrics.json").read_text())
        assert metrics["steps"] == expected["steps"] and metrics["train_images"] == expected["train_images"]
        assert [h["step"] for h in metrics["history"]] == [h["step"] for h in expected["history"]]
        assert lr_curve(resumed) == lr_curve(whole)  # every step logged once, with the uninterrupted run's rate
        steps = [e.step for e in EventAccumulator(str(resumed)).Reload().Scalars("train/loss")]
        assert steps == list(range(1, expected["steps"] + 1))
        assert metrics["test_accuracy"] >= expected["test_accuracy"] - 0.05


def benchmark(name: str):
    """A script of benchmarks/ as a module (they are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_elastic_job_that_loses_a_node_continues_from_its_last_step(tmp_path: Path) -> None:
    """launch/multinode.sh with NNODES=1:2 on loopback, as benchmarks/elastic.py runs it: kill one node (its
    agent and worker) mid-epoch; the survivor's agent restarts its worker at world size 1, which continues from
    the last checkpoint's step (not from the epoch's start) and finishes with every step and image of the run."""
    data = write_synthetic_mnist(tmp_path / "data", n_train=12064, n_test=100)  # 375 steps an epoch: seconds
    flags = ["--data-dir", str(data), "--device", "cpu", *LONG]
    _, resumed_from = benchmark("elastic").two_nodes(flags, tmp_path / "run", kill_at=60)
    output = (tmp_path / "run.log").read_text()  # the surviving node's
    assert "resuming at world size 1 (checkpoint: 2)" in output, output[-3000:]
    # the survivor's worker said why it stopped in one line, not with gloo's traceback
    assert "error: another rank stopped during a collective" in output and "Traceback" not in output, output[-3000:]
    resumed = re.findall(r"at epoch (\d+) \+ (\d+) steps, step (\d+)", output)
    assert resumed, output[-3000:]  # mid-epoch: "+ N steps"
    epoch, in_epoch, step = map(int, resumed[-1])
    assert step == resumed_from >= 60 and in_epoch > 0 and step == epoch * 375 + in_epoch
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["world_size"] == 1 and metrics["steps"] == 2 * 375 and metrics["train_images"] == 2 * 12000
