"""launch/: killed workers, SIGTERM and SIGHUP, two nodes on one machine, and run.sh end to end (CPU, gloo, loopback)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import ROOT, final_weights, free_port, torchrun, write_synthetic_mnist
from distributed import checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bigger_data(tmp_path_factory) -> Path:
    """Enough images that an epoch lasts long enough to kill a worker inside it."""
    return write_synthetic_mnist(tmp_path_factory.mktemp("bigger"), n_train=3064, n_test=200)


def script_env(**extra: str) -> dict[str, str]:
    """launch/ scripts on the interpreter running the tests, without building another venv."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return {**os.environ, "SKIP_SETUP": "1", "PATH": path, **extra}


def train_args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--data-dir", str(data), "--run-dir", str(run_dir), "--val-size", "64", "--batch-size", "16",
            "--epochs", "3", "--log-every", "5", "--device", "cpu", *extra]


def wait_for_step(last: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "training ended before it could be interrupted"
        if last.exists():
            reached = checkpoint.load(last)["run"]["step"]
            if reached >= step:
                return reached
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint at step {step} within {timeout}s")


def worker_pid(agent: int, rank: int) -> int:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        if ppid == agent and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"no rank {rank} worker under torchrun {agent}")


@pytest.fixture(scope="module")
def uninterrupted(bigger_data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    proc = subprocess.run(torchrun(2, *train_args(bigger_data, run_dir)), cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return run_dir


def test_killed_worker_is_restarted_and_resumes(bigger_data, uninterrupted: Path, tmp_path: Path) -> None:
    cmd = torchrun(2, *train_args(bigger_data, tmp_path, "--checkpoint-every-steps", "5"),
                   launcher=("--max-restarts=2",))
    log = (tmp_path / "log.txt").open("w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_step(tmp_path / "checkpoints" / "last.pt", 120, proc)  # well inside epoch 2 of 3
        os.kill(worker_pid(proc.pid, 0), signal.SIGKILL)  # rank 0: the one that writes checkpoints
        assert proc.wait(timeout=300) == 0
    finally:
        proc.kill()
        log.close()
    output = (tmp_path / "log.txt").read_text()
    assert "resumed from" in output, output[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    steps = [e.step for e in EventAccumulator(str(tmp_path)).Reload().Scalars("train/loss")]
    assert steps == sorted(set(steps)) == list(range(5, metrics["steps"] + 1, 5))  # none duplicated, rewound, lost
    for name in ("last.pt", "best.pt"):
        checkpoint.load(tmp_path / "checkpoints" / name)
    assert not list((tmp_path / "checkpoints").glob(".*"))  # the killed save's temp file was cleaned up
    a, b = final_weights(uninterrupted), final_weights(tmp_path)
    assert all(torch.equal(a[k], b[k]) for k in a)  # mid-epoch resume is exact: data order, RNG, optimiser


def test_checkpoint_survives_kill_during_save(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    writer = ("import sys, torch; from pathlib import Path; from distributed import checkpoint\n"
              "big = {'w': torch.randn(4_000_000)}\n"
              "print('ready', flush=True)\n"
              "for i in range(10_000):\n"
              "    checkpoint.save(Path(sys.argv[1]), {'model': big, 'config': {}, 'run': {'epoch': i}})\n")
    for delay in (0.3, 0.6, 0.9, 1.2):
        proc = subprocess.Popen([sys.executable, "-c", writer, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"  # torch imported, saves begin
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if path.exists():
            assert checkpoint.load(path)["model"]["w"].shape == (4_000_000,)
    assert path.exists()


# SIGTERM is what SLURM and Kubernetes send; SIGHUP what a closed terminal or ssh session sends (torchrun's
# agent passes the signal it got on to the workers).
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_saves_a_checkpoint_and_rerun_resumes(bigger_data, tmp_path: Path, signum: int) -> None:
    cmd = torchrun(2, *train_args(bigger_data, tmp_path))
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = wait_for_step(tmp_path / "checkpoints" / "last.pt", 1, proc)  # epoch 1 done
    time.sleep(0.3)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0  # torchrun's own status; each worker's 128 + signum is checked without torchrun
    assert f"stopped by signal {signum}" in err and "run the same command again to resume" in err, err[-3000:]
    stopped_at = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert stopped_at["run"]["step"] > first  # saved at the stop, not only the epoch-1 checkpoint
    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    assert f"step {stopped_at['run']['step']}" in rerun.stdout
    assert json.loads((tmp_path / "metrics.json").read_text())["epochs"] == 3


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_exits_128_plus_its_number(bigger_data, tmp_path: Path, signum: int) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "distributed.train", *train_args(bigger_data, tmp_path)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = wait_for_step(tmp_path / "checkpoints" / "last.pt", 1, proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err[-3000:]  # 143 for SIGTERM, 129 for SIGHUP, as documented
    assert err.strip().splitlines()[-1].startswith(f"stopped by signal {signum}")
    # at a step of epoch 2, or at the end of epoch 1's evaluation if the signal came during it
    assert checkpoint.load(tmp_path / "checkpoints" / "last.pt")["run"]["step"] >= first


def test_a_closed_terminal_saves_a_checkpoint(bigger_data, tmp_path: Path) -> None:
    """The terminal itself goes away (not a kill): the kernel sends SIGHUP, and every later write to the
    terminal fails (EIO). The run must still save and exit 129, not die on its own progress line."""
    import fcntl
    import select
    import termios
    import threading
    master, slave = os.openpty()

    def controlling_terminal() -> None:  # after start_new_session's setsid: the pty becomes the session's tty
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen([sys.executable, "-m", "distributed.train", *train_args(bigger_data, tmp_path)], cwd=ROOT,
                            stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                            preexec_fn=controlling_terminal)
    os.close(slave)
    reading = threading.Event()
    reading.set()

    def drain() -> None:  # a terminal shows what it is sent; a full pty buffer would block the trainer
        while reading.is_set():
            if select.select([master], [], [], 0.05)[0]:
                try:
                    os.read(master, 65536)
                except OSError:
                    return
    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        first = wait_for_step(tmp_path / "checkpoints" / "last.pt", 1, proc)
    finally:
        reading.clear()
        reader.join()
        os.close(master)  # the window closes: hangup
    assert proc.wait(timeout=120) == 128 + signal.SIGHUP
    assert checkpoint.load(tmp_path / "checkpoints" / "last.pt")["run"]["step"] >= first


def test_two_nodes_on_one_machine(synthetic_data, tmp_path: Path) -> None:
    env = script_env(NNODES="2", NPROC_PER_NODE="1", RDZV_ENDPOINT=f"127.0.0.1:{free_port()}",
                     RDZV_ID="two-nodes-test", MAX_RESTARTS="0")
    args = ["bash", "launch/multinode.sh", "--data-dir", str(synthetic_data), "--run-dir", str(tmp_path),
            "--val-size", "64", "--epochs", "1", "--device", "cpu"]
    nodes = [subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and len(set(metrics["replica_weight_sha256"])) == 1


def test_slurm_sbatch_runs_the_train_image_through_pyxis(synthetic_data, tmp_path: Path) -> None:
    """CONTAINER_IMAGE=... sbatch launch/slurm.sbatch: there is no pyxis here, so a stand-in srun records its own
    options and the program it was given, then runs that on this machine, as pyxis would inside the image
    (whose PATH has torchrun). No venv is set up: the image has everything."""
    bin_dir, recorded = tmp_path / "bin", tmp_path / "srun-options"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do echo "$1" >> "$SRUN_OPTIONS"; '
                                  'shift; done\necho "program $1" >> "$SRUN_OPTIONS"\nexec "$@"\n')
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho 127.0.0.1\n")
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    run_dir = tmp_path / "shared" / "run"
    env = script_env(CONTAINER_IMAGE="registry.example.com#mnist-ddp:train", SRUN_OPTIONS=str(recorded),
                     SLURM_SUBMIT_DIR=str(ROOT), SLURM_JOB_NODELIST="node0", SLURM_JOB_NUM_NODES="1",
                     SLURM_GPUS_ON_NODE="2", SLURM_JOB_ID="42", SLURM_JOB_NAME="mnist-ddp", RDZV_PORT=str(free_port()),
                     RUN_DIR=str(run_dir), DATA_DIR=str(synthetic_data), VENV=str(tmp_path / "no-venv"))
    env.pop("SKIP_SETUP")  # a setup.sh the container branch ran would build a venv in VENV
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    proc = subprocess.run(["bash", str(ROOT / "launch" / "slurm.sbatch"), "--val-size", "64", "--epochs", "1",
                           "--device", "cpu"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert recorded.read_text().splitlines() == [
        "--kill-on-bad-exit=1", "--container-image=registry.example.com#mnist-ddp:train",
        f"--container-mounts={ROOT}:/work,{run_dir}:{run_dir},{synthetic_data}:{synthetic_data}",
        "--container-workdir=/work", "program torchrun"]
    assert not (tmp_path / "no-venv").exists()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and len(set(metrics["replica_weight_sha256"])) == 1


def test_run_sh_trains_exports_verifies_and_predicts(synthetic_data, tmp_path: Path) -> None:
    proc = subprocess.run(["bash", "launch/run.sh", "--data-dir", str(synthetic_data), "--run-dir", str(tmp_path),
                           "--val-size", "64", "--epochs", "1", "--device", "cpu"], cwd=ROOT, env=script_env(NPROC="2"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "verified" in proc.stdout and "launch/samples/mnist_7.png" in proc.stdout
    assert (tmp_path / "export" / "manifest.json").is_file()
    assert "13 images, 0 failed" in proc.stderr


def test_run_sh_stops_at_the_first_failing_step(tmp_path: Path) -> None:
    proc = subprocess.run(["bash", "launch/run.sh", "--data-dir", str(tmp_path / "none"), "--run-dir",
                           str(tmp_path / "run"), "--device", "cpu"], cwd=ROOT, env=script_env(NPROC="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "run.sh: training failed" in proc.stderr and "==> export" not in proc.stderr


def test_scaling_recipes_use_torchrun_rendezvous() -> None:
    for name in ("multinode.sh", "slurm.sbatch"):
        text = (ROOT / "launch" / name).read_text()
        assert "torchrun" in text and "--rdzv-backend=c10d" in text and "--rdzv-endpoint" in text
        assert subprocess.run(["bash", "-n", str(ROOT / "launch" / name)]).returncode == 0
    job = (ROOT / "launch" / "k8s" / "pytorchjob.yaml").read_text()
    assert "kind: PyTorchJob" in job and "rdzvBackend: c10d" in job and "distributed.train" in job


def test_gpu_check_rehearsal_runs_its_plumbing(synthetic_data, tmp_path: Path) -> None:
    """launch/gpu_check.sh --rehearse: every step's plumbing on the CPU, so that the script cannot rot unseen."""
    out = tmp_path / "check"
    proc = subprocess.run(["bash", "launch/gpu_check.sh", "--rehearse", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**script_env(), "PYTHON": sys.executable,
                                                       "DATA_DIR": str(synthetic_data)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in summary.splitlines()
            if line.startswith("| ") and not line.startswith("| step") and line.count("|") == 5}
    assert rows == {"environment": "passed", "gpu-tests": "skipped: no GPU (rehearsal)", "cpu-suite": "passed",
                    "benchmark": "passed"}, summary
    assert "| mlp | off | 64 | no | 1 |" in summary  # the benchmark's table reached the summary
    assert {p.name for p in out.iterdir()} == {"summary.md", "environment.log", "cpu-suite.log", "benchmark.log"}


def test_run_sh_exports_the_run_dir_the_trainer_used(tmp_path: Path) -> None:
    """Issue 20: `launch/run.sh --dataset kmnist` trained into runs/kmnist and exported runs/digits."""
    from test_datasets import write_dataset
    copy = tmp_path / "clone"  # run.sh works from its checkout's root: default run dirs land in runs/ there
    for part in ("distributed", "export", "serve_cli", "launch"):
        shutil.copytree(ROOT / part, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
    data = write_dataset(tmp_path / "data", "kmnist", n_train=200, n_test=60)
    proc = subprocess.run(["bash", "launch/run.sh", "--dataset", "kmnist", "--data-dir", str(data), "--val-size",
                           "20", "--epochs", "1", "--model", "mlp", "--device", "cpu"], cwd=copy,
                          env=script_env(NPROC="1"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "==> export: runs/kmnist/checkpoints/best.pt -> runs/kmnist/export" in proc.stderr
    assert (copy / "runs" / "kmnist" / "export" / "manifest.json").is_file() and not (copy / "runs" / "digits").exists()
