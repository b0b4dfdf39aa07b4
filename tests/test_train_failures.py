"""The trainer's failures and stops, each one line and the right exit code: divergence, a full disk, a missing
compiler, a stop during the decoding of a folder or the last evaluation; the work of a stopped run counted."""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, big_digit_folder, decode_workers, folder_args, one_error_line, run, snapshot, train_args
from distributed import checkpoint
from distributed.train import main as train

pytestmark = pytest.mark.slow


def test_diverging_loss_stops_with_a_clear_error(synthetic_data, tmp_path: Path, capsys) -> None:
    assert train(train_args(synthetic_data, tmp_path, "--optimizer", "sgd", "--lr", "1e6", "--schedule", "none")) == 1
    one_error_line(capsys.readouterr().err, "became NaN or infinite")
    assert not (tmp_path / "checkpoints" / "last.pt").exists()  # nothing non-finite was saved
    assert not (tmp_path / "metrics.json").exists()


def test_full_disk_during_checkpoint_keeps_the_previous_one(synthetic_data, tmp_path: Path) -> None:
    assert train(train_args(synthetic_data, tmp_path)) == 0
    before = snapshot(tmp_path / "checkpoints")

    def small_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    proc = run("-m", "distributed.train", *train_args(synthetic_data, tmp_path, "--model", "fastnet", "--no-resume"),
               preexec_fn=small_disk)
    assert proc.returncode == 1
    one_error_line(proc.stderr, "cannot write", "the previous last.pt is kept")
    assert snapshot(tmp_path / "checkpoints") == before


def test_metrics_count_the_work_of_a_stopped_and_resumed_run(synthetic_data, tmp_path: Path) -> None:
    from distributed import comms
    from distributed.config import parse_args
    from distributed.train import Preempted, StopRequest, run
    cfg = parse_args(train_args(synthetic_data, tmp_path, "--batch-size", "16"))
    with pytest.raises(Preempted):
        run(cfg, comms.setup("cpu"), stop=StopRequest(signal=15))  # stops at step 10 of 36
    stopped = checkpoint.load(tmp_path / "checkpoints" / "last.pt")["run"]
    assert stopped["train_images"] == 10 * 16 and stopped["train_seconds"] > 0
    assert train(train_args(synthetic_data, tmp_path, "--batch-size", "16")) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["train_images"] == 576  # 10 batches before the stop + 26 after, each image once
    assert metrics["train_seconds"] > stopped["train_seconds"]
    whole = metrics["history"][0]
    assert whole["step"] == 36 and np.isfinite(whole["train_loss"]) and whole["train_loss"] > 0


def test_compile_without_a_compiler_is_one_line(synthetic_data: Path, tmp_path: Path) -> None:
    # inductor needs a C++ compiler on the CPU: a machine without one gets the fix, not dynamo's traceback
    proc = run("-m", "distributed.train", *train_args(synthetic_data, tmp_path / "run"), "--overfit-batches", "1",
               "--compile", timeout=300,
               env={**os.environ, "CXX": str(tmp_path / "no-such-g++")})
    assert proc.returncode == 1
    one_error_line(proc.stderr, "--compile failed", "run without --compile")


@pytest.mark.parametrize("launcher,signum", [("python", signal.SIGTERM), ("torchrun", signal.SIGINT)])
def test_a_signal_while_a_folder_is_decoded_is_one_line(tmp_path: Path, launcher: str, signum: int) -> None:
    from conftest import torchrun
    folder = big_digit_folder(tmp_path / "pics", 1500)
    before = snapshot(folder)
    args = folder_args(folder, tmp_path / "run", 1)
    cmd = torchrun(2, *args) if launcher == "torchrun" else [sys.executable, "-m", "distributed.train", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 120
    while not decode_workers(proc.pid):
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.3)
    if launcher == "torchrun":
        os.killpg(proc.pid, signum)  # Ctrl-C: the whole foreground process group
    else:
        proc.send_signal(signum)  # kill PID: the trainer alone
    out, err = proc.communicate(timeout=60)
    # torchrun prints its own SignalException traceback; none may come from a worker or its decoding pool
    ours = [f"distributed/{name}.py" for name in ("train", "folder", "data")]
    assert "KeyboardInterrupt" not in err and "BrokenProcessPool" not in err and not any(o in err for o in ours), err
    assert launcher == "torchrun" or "Traceback" not in err, err
    stops = [line for line in err.splitlines() if "stopped by signal" in line]
    assert stops == [f"stopped by signal {signum} before training began; nothing new was saved: run the "
                     f"same command again to start"], err
    if launcher == "python":
        assert proc.returncode == 128 + signum
    else:
        assert proc.returncode != 0
    assert snapshot(folder) == before  # no cache, no temp file
    assert not decode_workers(proc.pid)


def test_a_signal_during_the_last_evaluation_stops_with_the_epochs_checkpoint(synthetic_data: Path, tmp_path: Path,
                                                                             monkeypatch) -> None:
    from distributed import checkpoint, comms
    from distributed.config import parse_args
    from distributed.train import Preempted, StopRequest, Trainer, run
    stop = StopRequest()
    score_all = Trainer.score_all

    def signalled(self, **kwargs):  # SIGTERM arrives while the test set is scored
        stop(signal.SIGTERM, None)
        return score_all(self, **kwargs)
    monkeypatch.setattr(Trainer, "score_all", signalled)
    cfg = parse_args(["--data-dir", str(synthetic_data), "--run-dir", str(tmp_path), "--val-size", "64",
                      "--epochs", "1", "--model", "mlp", "--device", "cpu"])
    with pytest.raises(Preempted, match="stopped by signal 15 at epoch 1"):
        run(cfg, comms.setup("cpu"), stop=stop)
    run = checkpoint.load(tmp_path / "checkpoints" / "last.pt")["run"]
    assert run["epoch"] == 1 and run["step_in_epoch"] == 0 and not (tmp_path / "metrics.json").exists()
