"""Step metrics, progress lines and --profile-steps: a real 2-rank torchrun run on tiny data, read back as
TensorBoard reads it; the gradient norm against one computed from the ranks' gathered gradients."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import ROOT, free_port, torchrun
from distributed.engine import StepSetup, train_step
from distributed.metrics import PEAK_TFLOPS, device_peak_flops, job_peak_flops, training_flops_per_image
from distributed.models import build_model
from distributed.train import main

PEAK = 1e12  # --peak-flops: far above what 2 cores reach, so the MFU is a small fraction


@pytest.fixture(scope="module")
def metrics_run(synthetic_data, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """2 ranks, 5 steps an epoch (640 images, global batch 128), 2 epochs, a window every 2 steps, stdout a pipe."""
    run_dir = tmp_path_factory.mktemp("metrics")
    proc = subprocess.run(torchrun(2, "--data-dir", str(synthetic_data), "--run-dir", str(run_dir), "--epochs", "2",
                                   "--log-every", "2", "--progress-every", "0", "--peak-flops", str(PEAK),
                                   "--profile-steps", "2:3"),
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return run_dir, proc


def scalars(run_dir: Path) -> dict[str, list]:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()
    return {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}


def test_windows_are_plausible_and_add_up(metrics_run) -> None:
    run_dir, _ = metrics_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    logged = {1: [2, 4], 2: [6, 8, 10]}
    for record in metrics["history"]:
        summary = record["steps_logged"]
        assert summary["windows"] == len(logged[record["epoch"]])
        # a window opens with each epoch: steps 1-4 in the first (step 5 is not logged), 6-10 in the second
        steps = {1: 4, 2: 5}[record["epoch"]]
        assert summary["steps"] == steps and summary["images"] == steps * 128
        # the windows' rate is the epoch's within the noise of 2 cores (the epoch also holds its checks)
        assert summary["images_per_second"] == pytest.approx(summary["images"] / summary["seconds"])
        assert 0.5 < summary["images_per_second"] / record["images_per_second"] < 2.0
        assert summary["seconds"] <= record["epoch_seconds"]
        flops = training_flops_per_image(build_model(metrics["model"], 10), (1, 28, 28), 10)
        assert summary["flops_per_second"] == pytest.approx(flops * summary["images_per_second"], rel=1e-6)
        assert summary["mfu"] == pytest.approx(summary["flops_per_second"] / (PEAK * 1), rel=1e-6)  # one node
        assert 0 < summary["mfu"] <= 1
        assert 0 < summary["data_ms"] < summary["step_ms"] and summary["allreduce_ms"] > 0
        assert summary["memory_gib"] > 0.05  # a process with torch in it: peak RSS, not zero or bytes
        assert summary["grad_norm"] > 0


def test_tensorboard_has_the_step_curves_and_each_rank(metrics_run) -> None:
    run_dir, _ = metrics_run
    curves = scalars(run_dir)
    for tag in ("train/loss", "train/lr", "train/grad_norm", "perf/step/images_per_second", "perf/step/ms",
                "perf/step/data_ms", "perf/step/compute_ms", "perf/step/allreduce_ms", "perf/step/tflops",
                "perf/step/mfu", "perf/memory/peak_gib", "perf/rank/data_ms/rank0", "perf/rank/data_ms/rank1",
                "perf/rank/memory_gib/rank0", "perf/rank/memory_gib/rank1"):
        assert [e.step for e in curves[tag]] == [2, 4, 6, 8, 10], tag
    assert "train/loss_scale" not in curves and "perf/memory/reserved_gib" not in curves  # fp32 on the CPU
    metrics = json.loads((run_dir / "metrics.json").read_text())
    last = metrics["history"][-1]["steps_logged"]
    assert curves["train/grad_norm"][-1].value == pytest.approx(last["grad_norm"], rel=1e-6)
    assert all(0 < e.value <= 1 for e in curves["perf/step/mfu"])


def test_plain_progress_lines_under_a_pipe(metrics_run) -> None:
    _, proc = metrics_run
    lines = [line for line in proc.stdout.splitlines() if "  step " in line]
    assert len(lines) == 10  # --progress-every 0: one per step, in order, the run's 10 steps
    assert lines[0].startswith("epoch 1/2  step 1/10 (10%)  elapsed ") and " ETA " in lines[0]
    assert lines[-1].startswith("epoch 2/2  step 10/10 (100%)")
    assert " img/s " in lines[3] and " loss " in lines[3] and "MFU " in lines[3]  # after the first window
    assert "\r" not in proc.stdout + proc.stderr and "\x1b[" not in proc.stdout + proc.stderr


def test_profile_steps_write_each_ranks_trace_and_table(metrics_run) -> None:
    run_dir, _ = metrics_run
    for rank in (0, 1):
        trace = json.loads(gzip.decompress((run_dir / "profile" / f"rank{rank}.trace.json.gz").read_bytes()))
        names = {e.get("name", "") for e in trace["traceEvents"]}
        assert any("convolution" in n for n in names) and any("Optimizer.step" in n for n in names)
        table = (run_dir / "profile" / f"rank{rank}.operators.txt").read_text()
        assert table.startswith(f"rank {rank} of 2, steps 2:3: 2 steps,") and "| conv forward |" in table
    assert not [p for p in (run_dir / "profile").iterdir() if p.name.startswith(".")]  # no temp files left


def test_metrics_change_no_weight(metrics_run, synthetic_data, tmp_path) -> None:
    """The same run without step metrics (no comm hook, no gradient norm, no profile) ends bit-identical."""
    run_dir, _ = metrics_run
    proc = subprocess.run(torchrun(2, "--data-dir", str(synthetic_data), "--run-dir", str(tmp_path), "--epochs", "2",
                                   "--log-every", "0"), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with_metrics, without = (json.loads((d / "metrics.json").read_text()) for d in (run_dir, tmp_path))
    assert with_metrics["replica_weight_sha256"] == without["replica_weight_sha256"]
    assert "steps_logged" not in without["history"][0] and "  step " not in proc.stdout  # no windows, no lines


def test_no_mfu_without_a_peak_on_the_cpu_and_no_metrics_at_log_every_0(synthetic_data, tmp_path) -> None:
    base = ["--data-dir", str(synthetic_data), "--epochs", "1", "--model", "mlp", "--device", "cpu"]
    assert main([*base, "--run-dir", str(tmp_path / "a"), "--log-every", "1"]) == 0
    curves = scalars(tmp_path / "a")
    assert "perf/step/tflops" in curves and "perf/step/mfu" not in curves
    assert not [t for t in curves if t.startswith("perf/rank/")]  # one rank: nothing to compare
    assert "mfu" not in json.loads((tmp_path / "a" / "metrics.json").read_text())["history"][0]["steps_logged"]
    assert main([*base, "--run-dir", str(tmp_path / "b"), "--log-every", "0"]) == 0
    assert not [t for t in scalars(tmp_path / "b") if t.startswith(("train/", "perf/step", "perf/memory"))]
    assert "steps_logged" not in json.loads((tmp_path / "b" / "metrics.json").read_text())["history"][0]


def test_peak_table_and_job_peak() -> None:
    assert device_peak_flops(torch.device("cpu"), None) is None
    assert job_peak_flops(None, torch.device("cpu"), None, 4, 2) is None
    assert job_peak_flops(5e10, torch.device("cpu"), None, 4, 2) == 1e11  # per node, two nodes
    assert PEAK_TFLOPS["H100"]["bf16"] == 989.0  # dense, not the 1,979 quoted with sparsity


def test_flops_per_image_are_the_hand_count() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 26 * 26, 10))
    conv = 26 * 26 * 4 * 9 * 2  # multiply-adds of one forward
    linear = 4 * 26 * 26 * 10 * 2
    # forward; backward: the conv's weight gradient only (the image needs none), the linear's two
    assert training_flops_per_image(model, (1, 28, 28), 10) == 2 * conv + 3 * linear
    assert model[0].weight.grad is None  # counted on a copy


def grad_norm_worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = build_model("mlp", 10)
        reference = build_model("mlp", 10)
        reference.load_state_dict(model.state_dict())
        torch.manual_seed(1 + rank)  # each rank its own batch
        x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
        weight = 1 / 32
        # the reference: this rank's own gradient, no DDP; gathered, averaged as DDP does, then its norm
        (F.cross_entropy(reference(x), y, reduction="sum") * weight).backward()
        local = torch.cat([p.grad.flatten() for p in reference.parameters()])
        gathered = [torch.empty_like(local) for _ in range(2)]
        dist.all_gather(gathered, local)
        expected = torch.linalg.vector_norm(sum(gathered) / 2).item()
        net = torch.nn.parallel.DistributedDataParallel(model)
        setup = StepSetup(net, torch.optim.SGD(model.parameters(), lr=0.1), None,
                          torch.amp.GradScaler("cpu", enabled=False), None, 0.0)
        _, norm = train_step(setup, [(x, y)], weight, grad_norm=True)
        out[rank] = (norm.item(), expected)
    finally:
        dist.destroy_process_group()


def test_grad_norm_is_the_all_reduced_gradients_norm_on_every_rank() -> None:
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(grad_norm_worker, args=(free_port(), out), nprocs=2)
        (norm0, expected0), (norm1, expected1) = out[0], out[1]
    assert expected0 == pytest.approx(expected1, rel=1e-6)
    assert norm0 == norm1 == pytest.approx(expected0, rel=1e-5)


def test_a_terminal_gets_one_live_line_and_no_plain_lines(synthetic_data, tmp_path) -> None:
    """Under a pseudo-terminal (10 steps an epoch at one rank): tqdm's line (carriage returns redrawing one line), the epoch line printed above
    it, and no plain progress lines."""
    import pty
    import select
    import sys
    import fcntl
    import struct
    import termios
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 150, 0, 0))  # a new pty is 0 x 0: no bar
    cmd = [sys.executable, "-m", "distributed.train", "--data-dir", str(synthetic_data), "--run-dir", str(tmp_path),
           "--epochs", "2", "--model", "mlp", "--device", "cpu", "--log-every", "1", "--progress-every", "0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=secondary, stdout=secondary, stderr=secondary)
    os.close(secondary)
    out = b""
    while True:
        ready, _, _ = select.select([primary], [], [], 120)
        try:
            chunk = os.read(primary, 65536) if ready else b""
        except OSError:  # the child closed the terminal
            chunk = b""
        if not chunk:
            break
        out += chunk
    assert proc.wait(timeout=60) == 0, out.decode(errors="replace")[-2000:]
    text = out.decode(errors="replace")
    import re
    assert re.search(r"\repoch 1/2: +\d+%\|[^|]*\| *\d+/20 \[", text)  # tqdm's line, redrawn with \r
    # redrawn after the epoch line printed above it, with the last window's figures
    assert re.search(r"\| *\d+/20 \[[^\]]*step/s, [\d,]+ img/s +[\d.]+ ms/step +loss [\d.]+ ", text)
    assert "  step 1/20 (5%)" not in text  # the plain line's form
    assert text.count("epoch 1/2  train loss") == 1
