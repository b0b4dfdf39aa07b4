"""What a GPU user hits before any kernel runs (issue 18), proven on the CPU: the suite pinned to the CPU on a
one-GPU host, one line for a launch error, and a lone failure that ends every rank at once."""
from __future__ import annotations

import os
import resource
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, torchrun

pytestmark = pytest.mark.slow

# A one-GPU host as the trainer's device choice sees it, in every Python process started with this on its path:
# torch tells distributed.comms that one CUDA device is there (torch's own internals still see none).
FAKE_ONE_GPU = """\
import sys
import torch
real_available, real_count = torch.cuda.is_available, torch.cuda.device_count
def asked_by_us():
    return sys._getframe(2).f_globals.get("__name__") == "distributed.comms"
torch.cuda.is_available = lambda: True if asked_by_us() else real_available()
torch.cuda.device_count = lambda: 1 if asked_by_us() else real_count()
"""


def worker_tracebacks(stderr: str) -> bool:
    """Whether a worker printed a traceback (torchrun prints its own ChildFailedError one, which names none of ours)."""
    return any(f"distributed/{name}.py" in stderr for name in ("train", "dist", "data", "checkpoint", "files")) \
        or "Error: " in stderr.replace("ChildFailedError: ", "")


def test_the_suites_helpers_pin_the_cpu_on_a_one_gpu_host(synthetic_data: Path, tmp_path: Path, monkeypatch) -> None:
    """Bug 1: --device auto made every 2-rank torchrun test fail there ("2 processes ... only 1 GPU(s)")."""
    import conftest
    import test_launch
    import test_train
    from distributed.config import parse_args
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FAKE_ONE_GPU)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(torchrun(2, "--data-dir", str(synthetic_data), "--run-dir", str(tmp_path / "run"),
                                   "--val-size", "64", "--epochs", "1", "--model", "mlp"),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for helper in (test_train.args, conftest.train_args, test_launch.train_args):
        assert parse_args(helper(synthetic_data, tmp_path)).device == "cpu", helper


def test_a_launch_error_is_printed_once(synthetic_data: Path, tmp_path: Path) -> None:
    """Bug 7: an error before the process group exists was printed by every rank."""
    proc = subprocess.run(torchrun(3, "--data-dir", str(synthetic_data), "--run-dir", str(tmp_path), "--device",
                                   "cuda"), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert not worker_tracebacks(proc.stderr), proc.stderr[-3000:]


def test_a_full_disk_on_rank_0_ends_every_rank_at_once(synthetic_data: Path, tmp_path: Path) -> None:
    """Bug 6: rank 0 failing alone in a save left the others in the next collective until torchrun killed them."""
    def small_files() -> None:  # every process: files over 1 MB cannot be written (the checkpoint is ~2.6 MB)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    start = time.perf_counter()
    proc = subprocess.run(torchrun(2, "--data-dir", str(synthetic_data), "--run-dir", str(tmp_path), "--val-size",
                                   "64", "--epochs", "2", "--model", "fastnet"),
                          cwd=ROOT, capture_output=True, text=True, timeout=300, preexec_fn=small_files)
    seconds = time.perf_counter() - start
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot write" in errors[0] and "is the disk full?" in errors[0], proc.stderr[-3000:]
    assert not worker_tracebacks(proc.stderr), proc.stderr[-3000:]
    # both workers left through our own error path: exit 1 each, not torchrun's SIGTERM/SIGKILL after a wait
    assert "exitcode  : 1" in proc.stderr and "Signal" not in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "checkpoints" / "last.pt").exists()
    assert seconds < 120
